"""Publishing an output directory that was built under a temporary name.

Exporters (``ham-convert-hf``, ``ham-prep-data --wds-out``) build the whole directory in a temp
dir next to the destination, give it normal permissions and rename it into place, so a killed
run never leaves a complete-looking output. Replacing an earlier output is allowed only when
the caller recognises it as its own (its marker file lists what it wrote), and then only the
files it lists are deleted: a user's file that was put into the directory survives (the old
directory is kept, under a name that says so, with a warning).
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Iterable, Optional

log = logging.getLogger(__name__)


def temp_dir_for(output: str) -> str:
    """A new empty directory ``.tmp_<name>_XXXX`` next to ``output`` (same filesystem, so the
    final rename is atomic)."""
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".tmp_{os.path.basename(os.path.abspath(output))}_", dir=parent)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(root: str) -> None:
    """Directories 0777 and files 0666 minus the umask (0755 / 0644 under umask 022) under
    ``root``: ``mkdtemp`` creates 0700, which would make an export unreadable to other users."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for d, dirs, files in os.walk(root):
        for n in dirs:
            os.chmod(os.path.join(d, n), 0o777 & ~mask)
        for n in files:
            p = os.path.join(d, n)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def publish_dir(tmp: str, output: str, own_files: Optional[Iterable[str]], overwrite: bool,
                what: str) -> None:
    """Rename ``tmp`` to ``output``. An existing ``output`` is replaced only with ``overwrite``
    and when ``own_files`` (the names the earlier run wrote, from its marker file) is not None;
    only those names are deleted from it. ``what`` names the option in errors (``--output``).
    Raises ValueError naming the path."""
    output = os.path.abspath(output)
    normal_permissions(tmp)
    if not os.path.lexists(output):
        os.rename(tmp, output)
        return
    if not os.path.isdir(output) or os.path.islink(output):
        raise ValueError(f"{what} {output}: exists and is not a directory")
    if own_files is None and os.listdir(output):
        raise ValueError(f"{what} {output}: exists and was not written by this tool (no marker file of "
                         "an earlier export); choose a new or empty directory")
    if own_files is not None and not overwrite:
        raise ValueError(f"{what} {output}: exists; pass --overwrite to replace it")
    old = tempfile.mkdtemp(prefix=f".old_{os.path.basename(output)}_", dir=os.path.dirname(output))
    os.rmdir(old)  # a fresh name; the rename below takes it
    os.rename(output, old)
    os.rename(tmp, output)
    for name in set(own_files or ()):
        p = os.path.join(old, name)
        if os.path.basename(name) == name and name not in (".", "..") and \
                (os.path.isfile(p) or os.path.islink(p)):
            os.remove(p)
    try:
        os.rmdir(old)
    except OSError:
        log.warning("%s: the replaced output held files this tool did not write; they are kept in %s",
                    output, old)
