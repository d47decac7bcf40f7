"""The hidden-state norm of every layer: RMSNorm or LayerNorm over the last dim.

One function for the Megatron layers (megatron_ham.layers.norm.HAMNorm, `local` backend) and the
exported Hugging Face model, so both compute the same numbers (torch's fused rms_norm /
layer_norm: fp32 statistics inside). :func:`hidden_norm_with_residual` is the same norm for a
pre-norm block, which also hands out its input as the block's residual branch: on CUDA (RMSNorm)
our Triton kernels (megatron_ham.kernels.rms_norm) then add the residual's gradient inside the
norm's backward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._checks import check_tensor
from ._kernels import load_kernels, resolve_kernel_impl

IMPLS = ("auto", "reference", "triton")


def hidden_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                eps: float) -> torch.Tensor:
    """x [..., h] -> RMSNorm(x) * weight when `bias` is None, else LayerNorm(x) * weight + bias
    (weight, bias [h]); output in x's dtype."""
    h = x.shape[-1]
    if bias is None:
        return F.rms_norm(x, (h,), weight, eps)
    return F.layer_norm(x, (h,), weight, bias, eps)


def hidden_norm_with_residual(x: torch.Tensor, weight: torch.Tensor,
                              bias: Optional[torch.Tensor] = None, *, eps: float,
                              impl: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """(hidden_norm(x, weight, bias), x): a pre-norm block's normalised input and its residual
    branch. The numbers are hidden_norm's. ``impl``: "reference" (the residual is x itself;
    autograd adds the two branches' gradients), "triton" (our kernels, CUDA RMSNorm: the
    residual is a view of x owned by the norm's autograd node, whose backward kernel computes
    dx = norm'(dy) + d_residual and the weight's gradient in one pass), "auto" (triton where it
    runs, see :func:`norm_impl`)."""
    check_tensor("weight", weight, [x.shape[-1]], "[h]")
    if norm_impl(x, weight, bias, impl) == "triton":
        return load_kernels("rms_norm").rms_norm_with_residual_triton(x, weight, eps)
    return hidden_norm(x, weight, bias, eps=eps), x


def norm_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
              impl: str = "auto") -> str:
    """The implementation :func:`hidden_norm_with_residual` runs: THE single dispatch point.
    "auto" is "triton" for an RMSNorm (no bias) of CUDA bf16/fp16/fp32 x with a weight of x's
    dtype or fp32 when megatron_ham.kernels.rms_norm imports, else "reference"; "triton" asked
    for where it cannot run raises ValueError."""
    floats = (torch.bfloat16, torch.float16, torch.float32)
    runnable = (x.is_cuda and bias is None and x.dtype in floats
                and weight.dtype in (x.dtype, torch.float32))
    return resolve_kernel_impl(
        "hidden_norm_with_residual", impl, IMPLS, "triton", runnable, "rms_norm",
        f"a CUDA RMSNorm (no bias) of bf16/fp16/fp32 x; x is {x.dtype} on {x.device}, "
        f"bias {'given' if bias is not None else 'None'}")
