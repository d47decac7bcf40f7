"""Helpers (no tests) for the training tests: a learnable IndexedDataset and a multi-process launcher.

Processes are started the way srun does it (one process per rank with RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the environment), so each rank's exit code is seen.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "tiny_cpu.yaml")
VOCAB = 128
EOD = 0


def write_learnable_dataset(out_dir: str, n_docs: int = 400, seed: int = 0) -> str:
    """Documents of arithmetic progressions mod (VOCAB-1) (+1, so 0 stays the EOD id), each
    ending with EOD: the next token is predictable from the previous two. Returns the blend file."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    prefix = os.path.join(out_dir, "arith")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(n_docs):
        length = int(rng.integers(40, 200))
        start, step = int(rng.integers(0, VOCAB - 1)), int(rng.integers(1, 6))
        toks = (start + step * np.arange(length)) % (VOCAB - 1) + 1
        b.add_item(torch.from_numpy(np.append(toks, EOD).astype(np.int32)))
        b.end_document()
    b.finalize(prefix + ".idx")
    blend = os.path.join(out_dir, "blend.json")
    with open(blend, "w") as f:
        json.dump({"blend": [{"prefix": "arith", "weight": 1.0}], "eod_id": EOD, "vocab_size": VOCAB}, f)
    return blend


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_overrides(blend: str, run_dir: str) -> List[str]:
    return [
        f"data.blend={blend}",
        f"checkpoint.dir={run_dir}/checkpoints",
        f"logging.jsonl={run_dir}/metrics.jsonl",
        f"logging.tensorboard_dir={run_dir}/tb",
        f"data.cache_dir={os.path.dirname(blend)}/cache",
        f"model.vocab_size={VOCAB}",
        "data.eod_id=0",
        "logging.interval=1",
    ]


def launch(n: int, overrides: List[str], log_path: str, env: Optional[Dict[str, str]] = None,
           preempt_after: Optional[int] = None, new_session: bool = False):
    """Start `n` ranks of `python -m megatron_ham.train RECIPE overrides`; returns the Popens.
    preempt_after=k: every rank gets SIGUSR1 right after step k (tests/_preempted.py), so the
    run saves and exits 75 there, as a preempted job does. new_session: each rank leads its own
    process group (os.killpg(p.pid, ...) then signals it and every process it started)."""
    cmd = ["-m", "megatron_ham.train"]
    if preempt_after is not None:
        cmd = [os.path.join(REPO, "tests", "_preempted.py"), str(preempt_after)]
    port = str(free_port())
    procs = []
    for r in range(n):
        e = dict(os.environ)
        e.update(env or {})
        e.update(RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
        out = open(f"{log_path}.rank{r}", "w")
        procs.append(subprocess.Popen([sys.executable, *cmd, RECIPE, *overrides],
                                      cwd=REPO, env=e, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=new_session))
    return procs


def wait(procs, timeout: float = 300) -> List[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return codes


def run(n: int, overrides: List[str], log_path: str, timeout: float = 300,
        preempt_after: Optional[int] = None) -> List[int]:
    return wait(launch(n, overrides, log_path, preempt_after=preempt_after), timeout)


def read_metrics(path: str, kind: str = "train") -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in (json.loads(l) for l in f if l.strip()) if r["kind"] == kind]


def logs(log_path: str, n: int) -> str:
    out = []
    for r in range(n):
        p = f"{log_path}.rank{r}"
        if os.path.exists(p):
            with open(p) as f:
                out.append(f"--- rank {r} ---\n" + f.read()[-4000:])
    return "\n".join(out)
