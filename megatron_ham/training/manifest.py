"""Per-step manifest: every file of a checkpoint with its size and SHA-256, verified before load.

    step_00000100/ham_manifest.json
    {"format": 1, "algorithm": "sha256", "step": 100,
     "files": {".metadata": {"size": 47111, "sha256": "..."}, "__0_0.distcp": {...}, ...}}

Written by the trainer into the temp dir after every file of the step (shards, common.pt,
metadata.json, config.yaml, train_state.json) is on disk and before the dir is renamed into
place: each rank hashes its share of the files right after the collective save
(`hash_files(..., rank, world)`), rank 0 gathers the shares and writes the manifest atomically.
`check_sizes` (stat only) and `check_hashes` (reads; split over ranks the same way) name the
first bad file: missing, truncated / grown, or changed. Checkpoints without a manifest (saved
before it existed) are still accepted; safe_checkpoint's checks apply to them as to all.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional

from .atomic import atomic_write_text
from .safe_checkpoint import CorruptCheckpoint

MANIFEST = "ham_manifest.json"
_CHUNK = 8 << 20


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                return h.hexdigest()
            h.update(b)


def hash_files(step_dir: str, rank: int = 0, world: int = 1) -> Dict[str, dict]:
    """{name: {size, sha256}} for this rank's share (every world-th file, sorted by name) of the
    regular files in `step_dir` (the manifest itself excluded)."""
    names = sorted(n for n in os.listdir(step_dir)
                   if n != MANIFEST and os.path.isfile(os.path.join(step_dir, n)))
    out = {}
    for n in names[rank::world]:
        p = os.path.join(step_dir, n)
        out[n] = {"size": os.path.getsize(p), "sha256": sha256_file(p)}
    return out


def write_manifest(step_dir: str, step: int, files: Dict[str, dict]) -> None:
    doc = {"format": 1, "algorithm": "sha256", "step": int(step), "files": dict(sorted(files.items()))}
    atomic_write_text(os.path.join(step_dir, MANIFEST), json.dumps(doc, indent=1) + "\n")


def read_manifest(step_dir: str) -> Optional[Dict[str, dict]]:
    """The manifest's {name: {size, sha256}}, or None for a checkpoint saved without one."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.lexists(path):
        return None
    try:
        if os.path.getsize(path) > (64 << 20):
            raise ValueError("larger than 64 MiB")
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        files = doc["files"]
        ok = doc.get("algorithm") == "sha256" and isinstance(files, dict) and all(
            isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("size"), int)
            and isinstance(v.get("sha256"), str) for k, v in files.items())
        if not ok:
            raise ValueError("unexpected structure")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{path}: unreadable manifest ({e})") from None
    return files


def check_sizes(step_dir: str, files: Dict[str, dict]) -> None:
    """Every listed file exists with its recorded size (cheap: stat only)."""
    for name, rec in sorted(files.items()):
        p = os.path.join(step_dir, name)
        if os.path.basename(name) != name or not os.path.isfile(p) or os.path.islink(p):
            raise CorruptCheckpoint(f"{p}: missing (listed in {MANIFEST})")
        size = os.path.getsize(p)
        if size != rec["size"]:
            how = "truncated" if size < rec["size"] else "grown"
            raise CorruptCheckpoint(f"{p}: {size} bytes, the manifest says {rec['size']} ({how})")


def check_hashes(step_dir: str, files: Dict[str, dict], rank: int = 0, world: int = 1) -> List[str]:
    """This rank's share of the SHA-256 comparison; returns the names it checked."""
    names = sorted(files)[rank::world]
    for name in names:
        p = os.path.join(step_dir, name)
        if sha256_file(p) != files[name]["sha256"]:
            raise CorruptCheckpoint(f"{p}: contents changed since the save (SHA-256 differs from "
                                    f"{MANIFEST})")
    return names
