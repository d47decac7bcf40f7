"""Multi-process helper for the parallel tests: real torch.distributed (gloo on CPU, NCCL on
GPU) via torch.multiprocessing.spawn; each process imports megatron once, so group many checks
into one world."""
from __future__ import annotations

import os
import socket
import warnings

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, args):
    warnings.filterwarnings("ignore")
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
    finally:
        from megatron_ham import distributed as D

        D.destroy()


def run_world(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) in `world` spawned processes; re-raises a worker's failure."""
    mp.spawn(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True)


def subprocess_env() -> dict:
    """The environment of a test's subprocess: the repo on PYTHONPATH, one thread, no warnings,
    and without the rendezvous variables an in-process test may have set (its process group
    still holds that MASTER_PORT): the subprocess starts its own world."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def run_worker(script: str, out_dir, timeout: int = 600) -> dict:
    """Run tests/<script> OUT_DIR in a fresh process (Megatron's global state, one thread, the
    repo on PYTHONPATH, no inherited rendezvous variables) and return its OUT_DIR/result.json;
    AssertionError with the worker's stderr when it fails."""
    import json
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, os.path.join(repo, "tests", script), str(out_dir)],
                       env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    with open(os.path.join(str(out_dir), "result.json"), encoding="utf-8") as f:
        return json.load(f)
