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
