"""Persistent compilation caches: `train.compile_cache_dir` and `train.compile_cache_local`.

The first training step compiles: Inductor (the `model.fusions` graphs, FlexAttention), Triton
(fla's GDN kernels, our staircase kernels, Inductor's generated kernels, their autotuning) and
TileLang (fla's gated backward on Hopper). All three keep on-disk caches; pointing them at one
directory that survives the job makes a requeued or resumed job skip the work:

    <compile_cache_dir>/inductor   TORCHINDUCTOR_CACHE_DIR (FX graph + AOTAutograd + autotune caches on)
    <compile_cache_dir>/triton     TRITON_CACHE_DIR (TRITON_CACHE_AUTOTUNING=1: autotune results kept)
    <compile_cache_dir>/tilelang   TILELANG_CACHE_DIR

`configure()` sets these environment variables. ham-train calls it right after the recipe is
loaded: loading a recipe imports torch but none of Inductor, Triton, TileLang or megatron (a
test checks that), and all three read their cache variables when they first compile. The
Inductor/AOTAutograd switches are also set on their config modules when those are already
imported, so the order cannot silently disable them.

`compile_cache_local` (optional) is a node-local directory (e.g. /tmp/ham-compile-cache): at
start every rank copies the entries of the shared directory that the local one lacks (one rank
of a node at a time, under an flock; the others then find nothing to copy), uses the local copy,
and at exit copies its new entries back. Entries are files named by content hashes, written
through a temporary name + os.replace, so nodes syncing into the shared directory at the same
time never leave a half-written entry. Only regular files are copied (no symlinks followed).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

#: environment variable -> subdirectory of the cache
CACHE_DIRS = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton",
              "TILELANG_CACHE_DIR": "tilelang"}
#: switches: Inductor's FX graph cache and AOTAutograd cache (on by default in torch 2.4+,
#: forced here), Triton's persisted autotuning results (off by default)
SWITCHES = {"TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
            "TRITON_CACHE_AUTOTUNING": "1"}
_SYNC_PREFIX = ".ham-sync"  # our lock and temporary files: never copied


@dataclass
class CacheState:
    """What `configure` found and did (recorded in metrics.jsonl by the loop)."""

    dir: Optional[str] = None  # the directory the compilers use (the local copy, when one is set)
    shared: Optional[str] = None  # train.compile_cache_dir
    local: Optional[str] = None  # train.compile_cache_local
    files_at_start: int = 0
    bytes_at_start: int = 0
    copied_in: int = 0
    copied_back: int = 0
    env: Dict[str, str] = field(default_factory=dict)

    @property
    def warm(self) -> bool:
        return self.files_at_start > 0

    def summary(self) -> dict:
        return {"dir": self.dir, "shared": self.shared, "local": self.local, "warm": self.warm,
                "files_at_start": self.files_at_start, "bytes_at_start": self.bytes_at_start,
                "copied_in": self.copied_in}

    def describe(self) -> str:
        if self.dir is None:
            return "[compile-cache] none (train.compile_cache_dir unset: the compilers' own defaults)"
        where = self.dir if self.local is None else (
            f"{self.dir} (node-local copy of {self.shared}: {self.copied_in} entries copied in)")
        state = (f"warm: {self.files_at_start} files, {self.bytes_at_start / 2**20:.1f} MiB"
                 if self.warm else "cold: empty")
        return f"[compile-cache] {where}; {state}"


_STATE = CacheState()


def current() -> CacheState:
    """The state of this process's `configure` call (an empty state when it was not called)."""
    return _STATE


def configure(shared: Optional[str], local: Optional[str] = None) -> CacheState:
    """Point Inductor, Triton and TileLang at `shared` (or at `local`, a node-local copy of it).

    Creates the directories; raises OSError when one cannot be created or written. Call it
    before the first compilation (ham-train: after the recipe is loaded, before megatron is
    imported)."""
    global _STATE
    if shared is None:
        _STATE = CacheState()
        return _STATE
    shared = os.path.abspath(shared)
    os.makedirs(shared, exist_ok=True)
    st = CacheState(dir=shared, shared=shared)
    if local is not None:
        st.local = st.dir = os.path.abspath(local)
        os.makedirs(st.local, exist_ok=True)
        st.copied_in = copy_missing(shared, st.local)
    st.files_at_start, st.bytes_at_start = tree_size(st.dir)
    for var, sub in CACHE_DIRS.items():
        st.env[var] = os.path.join(st.dir, sub)
        os.makedirs(st.env[var], exist_ok=True)
    st.env.update(SWITCHES)
    os.environ.update(st.env)
    if "torch._inductor.config" in sys.modules:  # imported already: its switches were read
        sys.modules["torch._inductor.config"].fx_graph_cache = True
        sys.modules["torch._inductor.config"].autotune_local_cache = True
    if "torch._functorch.config" in sys.modules:
        sys.modules["torch._functorch.config"].enable_autograd_cache = True
    _STATE = st
    return st


def sync_back(st: Optional[CacheState] = None) -> int:
    """Copy the new entries of the node-local cache into the shared one (nothing without a
    local copy). Returns how many files were copied."""
    st = st or _STATE
    if st.local is None or st.shared is None:
        return 0
    n = copy_missing(st.local, st.shared, lock_dir=st.local)
    st.copied_back += n
    return n


def tree_size(root: str) -> Tuple[int, int]:
    """(regular files, bytes) under `root`, our own lock/temporary files excluded."""
    files = size = 0
    for _, rel, full in _entries(root):
        files += 1
        size += os.path.getsize(full)
    return files, size


def copy_missing(src: str, dst: str, lock_dir: Optional[str] = None) -> int:
    """Copy every regular file under `src` that `dst` lacks (same relative path), each through
    a temporary name + os.replace. Ranks of one node serialise on an flock in `lock_dir`
    (default `dst`): the first copies, the others then find nothing missing."""
    lock_dir = lock_dir or dst
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(lock_dir, f"{_SYNC_PREFIX}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            n = 0
            for _, rel, full in _entries(src):
                target = os.path.join(dst, rel)
                if os.path.lexists(target):
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                tmp = os.path.join(os.path.dirname(target), f"{_SYNC_PREFIX}-{os.getpid()}-{os.path.basename(rel)}")
                try:
                    shutil.copyfile(full, tmp)
                    os.replace(tmp, target)
                finally:
                    if os.path.lexists(tmp):
                        os.remove(tmp)
                n += 1
            return n
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _entries(root: str):
    """(dirpath, relative path, full path) of the regular files under root; symlinks (files or
    directories) are skipped, as are our own lock and temporary files."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        for name in filenames:
            full = os.path.join(dirpath, name)
            if name.startswith(_SYNC_PREFIX) or os.path.islink(full) or not os.path.isfile(full):
                continue
            yield dirpath, os.path.relpath(full, root), full


def counters() -> Dict[str, int]:
    """Inductor's and AOTAutograd's cache hits/misses in this process so far ({} when nothing
    was compiled: torch._dynamo not imported)."""
    if "torch._dynamo.utils" not in sys.modules:
        return {}
    c = sys.modules["torch._dynamo.utils"].counters
    out = {f"fxgraph_cache_{k}": int(c["inductor"][f"fxgraph_cache_{k}"]) for k in ("hit", "miss", "bypass")}
    out.update({f"autograd_cache_{k}": int(c["aot_autograd"][f"autograd_cache_{k}"])
                for k in ("hit", "miss", "bypass")})
    return out
