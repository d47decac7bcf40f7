"""Names from untrusted or hand-written files that become one path component.

Manifest components (``<out>/<name>.bin``), ``--input NAME=...`` names and sweep run names
(``<output_root>/<name>/checkpoints``) are joined onto a directory the tool owns. A name that
is ``.`` / ``..``, holds a path separator, NUL or a line break, starts with ``-`` (read as an
option by the next tool) or is empty could leave that directory, make the tool delete or
overwrite what it did not create, or inject extra arguments where names are passed one per
line (slurm/ham.sbatch reads the sweep's arguments with ``mapfile``). ``check_name`` refuses
them with a ValueError naming where the name came from.
"""
from __future__ import annotations

import os

_FORBIDDEN = {"/": "a '/'", "\\": "a '\\'", "\0": "a NUL byte", "\n": "a line break",
              "\r": "a carriage return"}


def check_name(name, where: str) -> str:
    """``name`` unchanged when it is safe as one path component; else ValueError naming ``where``
    (e.g. ``"manifest.yaml: components[2].name"``) and the rule broken."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: expected a non-empty string, got {name!r}")
    if name in (".", ".."):
        raise ValueError(f"{where}: {name!r} is not allowed (it names a directory, not an entry of one)")
    for ch, what in _FORBIDDEN.items():
        if ch in name:
            raise ValueError(f"{where}: {name!r} contains {what}; use letters, digits, '-', '_' or '.'")
    if os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"{where}: {name!r} contains a path separator")
    if name.startswith("-"):
        raise ValueError(f"{where}: {name!r} starts with '-' (it would read as an option)")
    if not name.isprintable():
        raise ValueError(f"{where}: {name!r} contains a control character")
    return name
