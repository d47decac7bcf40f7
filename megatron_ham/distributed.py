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

    apply_cpu_shims() -> bool
        The small patches Megatron-Core needs without a GPU (applied by initialize() only when
        CUDA is unavailable; idempotent; returns True when they are active):
          1. torch.cuda.current_device() -> torch.device("cpu"): Megatron allocates the
             sequence-parallel all-gather buffers and RoPE frequencies on current_device().
          2. The CUDA RNG tracker (model_parallel_cuda_manual_seed, tracker.fork()) is replaced by
             one keeping CPU generator states, with the same names and seeds.
          3. torch.cuda.synchronize() becomes a no-op (dist_checkpointing's torch_dist save calls it).
          4. megatron.core.transformer.utils.get_default_causal_mask builds its mask on the CPU
             (it hard-codes device="cuda"; used by Megatron's own DotProductAttention).
          5. megatron.core.pipeline_parallel.schedules sees a `torch` whose zeros/ones/empty/
             tensor map device="cuda" to the CPU (its token counter is allocated on "cuda");
             nothing else in that module changes.
          6. tensor_parallel.random._get_cuda_rng_state / _set_cuda_rng_state (used by
             activation recomputation's CheckpointFunction) read / ignore the CPU generator
             (its state is saved and restored alongside by the same code).
        WrappedTorchNorm is NOT patched: megatron-ham's specs use their own norm
        (megatron_ham.layers.norm.HAMNorm), which supports sequence parallelism on any device by
        tagging its parameters `.sequence_parallel = True`.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["initialize", "destroy", "apply_cpu_shims", "DistInfo"]


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
    applied first (see apply_cpu_shims). Seeds: torch default generator gets `seed + 100*pp_rank`
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
        apply_cpu_shims()

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


# ----------------------------------------------------------------------------- CPU shims

_SHIMS_APPLIED = False


class CpuRNGStatesTracker:
    """Drop-in for Megatron's CudaRNGStatesTracker keeping CPU generator states.

    Same interface (reset, is_initialized, get_states, set_states, add, fork); `fork(name)` swaps
    the default CPU generator's state for the named one and restores it on exit.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()
        self._current_state_name = "default-rng"

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        g = torch.Generator()
        g.manual_seed(seed)
        self.states_[name] = g.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        prev_name = self._current_state_name
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)
            self._current_state_name = prev_name


def apply_cpu_shims() -> bool:
    """Patch the CUDA-only spots of Megatron-Core for CPU runs. No-op when CUDA is available."""
    global _SHIMS_APPLIED
    if torch.cuda.is_available():
        return False
    if _SHIMS_APPLIED:
        return True
    import megatron.core.tensor_parallel.random as mrandom
    import megatron.core.transformer.utils as mutils

    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]

    # RNG tracker: every accessor goes through initialize_rng_tracker(); pre-install ours.
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    orig_init = mrandom.initialize_rng_tracker

    def _init_tracker(*args, force_reset: bool = False, **kwargs):
        if force_reset or not mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED:
            mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
            mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mrandom.initialize_rng_tracker = _init_tracker
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    mrandom._orig_initialize_rng_tracker = orig_init

    def _cpu_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    mutils.get_default_causal_mask = _cpu_causal_mask
    try:
        import megatron.core.fusions.fused_softmax as mfs

        mfs.get_default_causal_mask = _cpu_causal_mask
    except Exception:  # pragma: no cover - module layout differs between versions
        pass
    try:
        import megatron.core.pipeline_parallel.schedules as msched

        msched.torch = _CpuDeviceTorch(torch)
    except Exception:  # pragma: no cover
        pass
    _SHIMS_APPLIED = True
    return True


class _CpuDeviceTorch:
    """`torch` seen by Megatron's pipeline schedules on CPU: factory calls with a CUDA device
    are made on the CPU; every other attribute is torch's own."""

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full")

    def __init__(self, mod):
        self._mod = mod

    def __getattr__(self, name):
        attr = getattr(self._mod, name)
        if name not in self._FACTORIES:
            return attr

        def factory(*args, **kwargs):
            dev = kwargs.get("device")
            if dev is not None and "cuda" in str(dev):
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory
