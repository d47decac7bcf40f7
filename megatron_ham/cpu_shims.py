"""Megatron-Core on a machine without a GPU: the few CUDA-only spots, redirected to the CPU.

Nothing here is active when CUDA is available; both installers are idempotent. Real megatron
classes then run unchanged under gloo (CI, tests, the CPU demo).

Part 1, `install_model_parallel_shims()` (called by megatron_ham.distributed.initialize):
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
       activation recomputation's CheckpointFunction) read / set the CPU generator's state.
  WrappedTorchNorm is NOT patched: megatron-ham's specs use their own norm
  (megatron_ham.layers.norm.HAMNorm), which supports sequence parallelism on any device by
  tagging its parameters `.sequence_parallel = True`.

Part 2, `install_training_shims()` (called by the training loop before DDP / the optimizer; it
installs part 1 too): Megatron-Core's gradient buffers, optimizers (`device='cuda'` literals,
`param.type() == 'torch.cuda.FloatTensor'` checks), grad clipping and the torch_dist checkpoint
writer assume a GPU, so a process-wide `TorchFunctionMode` rewrites `device='cuda'`/`cuda:N`/int
devices to `cpu`, makes `Tensor.cuda()` a no-op and reports CPU float tensors' `.type()` under
the `torch.cuda.*` names those checks expect; `torch.cuda.empty_cache()` is a no-op and
`torch.cuda.get_rng_state()` returns the CPU generator's state.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["install_model_parallel_shims", "install_training_shims", "CpuRNGStatesTracker"]

_MP_INSTALLED = False
_TRAINING_INSTALLED = False


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


def install_model_parallel_shims() -> bool:
    """Patch the CUDA-only spots of Megatron-Core's model-parallel code (list in the module
    docstring, part 1). No-op when CUDA is available; idempotent; True when active."""
    global _MP_INSTALLED
    if torch.cuda.is_available():
        return False
    if _MP_INSTALLED:
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
    # activation recomputation saves/restores the 'CUDA' RNG state: it is the CPU generator's
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
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
    _MP_INSTALLED = True
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


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                name = "torch.cuda." + name[len("torch."):]
            return name
        dev = kwargs.get("device")
        if dev is not None and _is_cuda(dev):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.to,) and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def install_training_shims() -> bool:
    """Part 2 (and part 1): the DDP / optimizer / grad-clipping / checkpoint spots. No-op when
    CUDA is available; idempotent; True when active. Call before building DDP / the optimizer."""
    global _TRAINING_INSTALLED
    if _TRAINING_INSTALLED:
        return True
    if torch.cuda.is_available():
        return False
    mode = _CudaToCpu()
    mode.__enter__()  # process-wide, for the life of the process
    install_model_parallel_shims()
    torch.cuda.empty_cache = lambda *a, **k: None
    # activation recomputation (tensor_parallel.checkpoint) saves/restores the 'CUDA' RNG state
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    _TRAINING_INSTALLED = True
    return True
