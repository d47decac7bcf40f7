"""Process-group and model-parallel set-up for megatron-ham (gloo on CPU, NCCL on GPU).

Public API (stable; used by megatron_ham.training):

    initialize(tp=1, pp=1, *, seed=1234, backend=None, timeout_s=1800) -> DistInfo
        Initialize torch.distributed from the environment, Megatron-Core's model-parallel groups
        and RNG tracker. Idempotent for the same (tp, pp). World size must be divisible by tp*pp;
        the remainder is data parallelism.

        Environment: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (torchrun), or
        SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (srun; MASTER_ADDR/PORT default to
        localhost:29500 when absent). Without any of them: a single process world (rank 0 of 1).

    destroy() -> None
        Tear down the model-parallel groups and the process group (tests, re-initialisation).

    The CPU shims Megatron-Core needs without a GPU are in megatron_ham.cpu_shims
    (install_model_parallel_shims, applied by initialize() only when CUDA is unavailable).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_ham.cpu_shims import install_model_parallel_shims

__all__ = ["initialize", "destroy", "DistInfo"]


@dataclass
class DistInfo:
    """What initialize() set up."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    backend: str
    device: torch.device


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (MASTER_PORT of a one-host rendezvous a tool starts)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env_int(*names: str, default: Optional[int] = None) -> Optional[int]:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError as e:
                raise ValueError(f"environment variable {n} must be an integer, got {v!r}") from e
    return default


def _rank_world_local():
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    return rank, world, local


def initialize(
    tp: int = 1,
    pp: int = 1,
    *,
    seed: int = 1234,
    backend: Optional[str] = None,
    timeout_s: int = 1800,
) -> DistInfo:
    """Initialize torch.distributed, Megatron-Core parallel_state (tp x pp x dp) and RNG seeds.

    `backend`: None picks "nccl" when CUDA is available, else "gloo". On CPU the CPU shims are
    applied first (megatron_ham.cpu_shims). Seeds: torch default generator gets `seed + 100*pp_rank`
    (identical across TP ranks: replicated parameters initialise identically), the model-parallel
    tracker `seed + 2718 + tp_rank` (Megatron's convention).
    """
    from megatron.core import parallel_state, tensor_parallel

    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"initialize: tp must be a positive int, got {tp!r}")
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"initialize: pp must be a positive int, got {pp!r}")
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"initialize: backend must be 'nccl' or 'gloo', got {backend!r}")
    if not cuda:
        install_model_parallel_shims()

    rank, world, local = _rank_world_local()
    if cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(
            f"initialize: world size {world} is not divisible by tp*pp = {tp}*{pp}"
        )
    if parallel_state.model_parallel_is_initialized():
        cur_tp = parallel_state.get_tensor_model_parallel_world_size()
        cur_pp = parallel_state.get_pipeline_model_parallel_world_size()
        if (cur_tp, cur_pp) != (tp, pp):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
        )
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed + 100 * pp_rank)
    tensor_parallel.model_parallel_cuda_manual_seed(seed + 100 * pp_rank)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return DistInfo(
        rank=rank,
        world_size=world,
        local_rank=local,
        tp=tp,
        pp=pp,
        dp=world // (tp * pp),
        backend=backend,
        device=device,
    )


def destroy() -> None:
    """Destroy Megatron's model-parallel groups and the default process group (if any)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
