"""Atomic small-file writes: write a temp name in the same dir, fsync, os.replace, fsync the dir.

A reader (or a process killed mid-write) sees either the old file or the new one, never a
partial one. Temp names are `<name>.tmp.<pid>`; checkpoint.remove_stale_temps knows them.
"""
from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
