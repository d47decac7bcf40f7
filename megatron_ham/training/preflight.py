"""Start-up checks of the checkpoint dir, before any training time is spent (rank 0).

    check_writable(root)                     creates it and proves it writable (a probe file)
    check_free_space(root, need_bytes)       requires `need_bytes` free; ConfigError names the path
    checkpoint_bytes(root, params, dtype)    what one checkpoint takes: the newest complete one's
                                             size, else weights + fp32 main weights + Adam moments

ham-train asks for two checkpoints' worth of free space (the one being written and the last
complete one, which must survive a failed save). A read-only or full file system is thus found
at start-up, not at the first save hours later.
"""
from __future__ import annotations

import os
import shutil

from .config import ConfigError

PROBE = ".ham_write_probe"  # created and removed at once; the pid makes it unique


def checkpoint_bytes(root: str, params: int, dtype: str) -> int:
    from .checkpoint import complete_checkpoints

    ckpts = complete_checkpoints(root)
    if ckpts:
        path = ckpts[-1][1]
        return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
                   if os.path.isfile(os.path.join(path, n)))
    weight_bytes = 4 if dtype == "fp32" else 2
    return int(params * (weight_bytes + 12) * 1.1) + (1 << 20)


def check_writable(root: str) -> None:
    """ConfigError (naming `root`) unless it can be created and a file written in it."""
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f"{PROBE}.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok\n")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"checkpoint.dir {root}: not writable ({e.strerror or e}); nothing was "
                          "trained. Point checkpoint.dir at a writable directory") from None


def check_free_space(root: str, need_bytes: int) -> None:
    """ConfigError (naming `root`) unless `need_bytes` are free there."""
    free = shutil.disk_usage(root).free
    if free < need_bytes:
        raise ConfigError(
            f"checkpoint.dir {root}: {free / 2**20:.1f} MiB free, but two checkpoints need about "
            f"{need_bytes / 2**20:.1f} MiB (the one being written and the last complete one); "
            "free space there or point checkpoint.dir elsewhere")
