"""SwiGLU of the MLP over megatron-core's fused fc1 output: silu(gate) * up.

    x [..., 2F] = (gate [..., F], up [..., F])  ->  silu(gate) * up  [..., F]   (x's dtype)

The reference is megatron-core's own math (``torch.chunk`` then ``F.silu(gate) * up``). On CUDA
``impl="auto"`` runs liger-kernel's fused gate-up kernel (megatron_ham.kernels.swiglu) where
liger-kernel is installed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._kernels import load_kernels, resolve_kernel_impl

IMPLS = ("auto", "reference", "liger")


def swiglu(x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """x [..., 2F] (gate, up) -> silu(gate) * up [..., F]. ``impl``: "reference", "liger"
    (CUDA; liger-kernel), "auto" (liger where it runs, see :func:`swiglu_impl`)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"swiglu: x must be a tensor [..., 2F] (gate, up), got shape "
                         f"{list(getattr(x, 'shape', []))}")
    if swiglu_impl(x, impl) == "liger":
        return load_kernels("swiglu").swiglu_liger(x)
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


def swiglu_impl(x: torch.Tensor, impl: str = "auto") -> str:
    """The implementation :func:`swiglu` runs: THE single dispatch point. "auto" is "liger" for
    CUDA bf16/fp16/fp32 x when megatron_ham.kernels.swiglu (liger-kernel) imports, else
    "reference"; "liger" asked for where it cannot run raises ValueError."""
    runnable = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    return resolve_kernel_impl("swiglu", impl, IMPLS, "liger", runnable, "swiglu",
                               f"CUDA x and liger-kernel installed; x is {x.dtype} on {x.device}")


def swiglu_available() -> bool:
    """Whether :func:`swiglu` can run liger-kernel's kernel here (CUDA and liger-kernel)."""
    kernels = load_kernels()
    return torch.cuda.is_available() and kernels is not None and kernels.import_error("swiglu") is None
