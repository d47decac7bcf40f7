"""CPU shims for the parts of Megatron-Core's DDP / optimizer / checkpoint stack that hard-code CUDA.

Megatron-Core's gradient buffers (`torch.cuda.current_device()`), its optimizers (`device='cuda'`
literals, `param.type() == 'torch.cuda.FloatTensor'` checks), grad clipping and the torch_dist
checkpoint writer (`torch.cuda.synchronize`) assume a GPU. On a machine without CUDA, `install()`
redirects exactly those calls to the CPU so the real megatron classes run unchanged under gloo:

- a process-wide `TorchFunctionMode` rewrites `device='cuda'`/`cuda:N`/int devices to `cpu`, makes
  `Tensor.cuda()` a no-op, and reports CPU float tensors' `.type()` under the `torch.cuda.*` names
  those type checks expect;
- `torch.cuda.empty_cache()` is a no-op and the 'CUDA' RNG state used by activation
  recomputation is the CPU generator's; the rest (current_device, synchronize, RNG tracker)
  comes from `megatron_ham.distributed.apply_cpu_shims()`, which this calls first.

Never active when CUDA is available. Idempotent. Call before building DDP / the optimizer.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False


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


def install() -> bool:
    """Install the shims when CUDA is unavailable; returns whether they are active."""
    global _INSTALLED
    if _INSTALLED:
        return True
    if torch.cuda.is_available():
        return False
    mode = _CudaToCpu()
    mode.__enter__()  # process-wide, for the life of the process
    from megatron_ham.distributed import apply_cpu_shims

    apply_cpu_shims()  # current_device, synchronize, RNG tracker, causal mask
    torch.cuda.empty_cache = lambda *a, **k: None
    # activation recomputation (tensor_parallel.checkpoint) saves/restores the 'CUDA' RNG state
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _INSTALLED = True
    return True
