"""Weight gradients added into Megatron's main_grad by the GEMM itself (gradient accumulation fusion).

Megatron DDP gives every parameter a ``main_grad`` buffer (fp32 with train.grad_reduce_in_fp32)
that sums the micro-batches' gradients. Without apex, Megatron's tensor-parallel linear layers
compute each weight gradient as a new bf16 tensor (one GEMM), which DDP's hook then adds into
``main_grad`` (one more fp32 elementwise pass over every weight, per micro-batch). Megatron's
``gradient_accumulation_fusion`` does both in one GEMM, through apex's
``fused_weight_gradient_mlp_cuda``: cuBLAS with beta = 1 and an fp32 C, i.e.

    main_grad[out, in] += grad_output[N, out]^T @ input[N, in]      (bf16 inputs, fp32 sum)

torch (>= 2.8, CUDA) has that GEMM as ``addmm(..., out_dtype=torch.float32)``. The two
functions below are that product under apex's names and argument order; :func:`enable` gives
them to megatron-core where apex is missing and turns the fusion on for a model's linear layers.
Also more exact than the unfused path: no bf16 rounding of each micro-batch's weight gradient.
"""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["wgrad_gemm_accum_fp32", "wgrad_gemm_accum_fp16", "supported", "enable"]


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor,
                          main_grad: torch.Tensor) -> None:
    """main_grad (fp32 [out, in]) += grad_output [N, out]^T @ total_input [N, in], in one GEMM."""
    torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor,
                          main_grad: torch.Tensor) -> None:
    """The same for a main_grad in the inputs' dtype (bf16 / fp16)."""
    torch.addmm(main_grad, grad_output.t(), total_input, out=main_grad)


def supported(device: torch.device) -> bool:
    """Whether this torch runs :func:`wgrad_gemm_accum_fp32` on `device` and gets the product
    right (a CUDA-only overload; checked once on a small product)."""
    if device.type != "cuda":
        return False
    try:
        x = torch.randn(64, 32, device=device, dtype=torch.bfloat16)
        dy = torch.randn(64, 16, device=device, dtype=torch.bfloat16)
        acc = torch.ones(16, 32, device=device, dtype=torch.float32)
        wgrad_gemm_accum_fp32(x, dy, acc)
        want = 1.0 + dy.float().t() @ x.float()
        return bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


class _AsApex:
    """What megatron-core calls as apex's ``fused_weight_gradient_mlp_cuda`` module."""

    wgrad_gemm_accum_fp32 = staticmethod(wgrad_gemm_accum_fp32)
    wgrad_gemm_accum_fp16 = staticmethod(wgrad_gemm_accum_fp16)


def enable(chunks: Iterable[torch.nn.Module], device: torch.device) -> bool:
    """Turn gradient accumulation fusion on for every Megatron tensor-parallel linear layer of
    the model chunks (each wrapped by, or about to be wrapped by, Megatron DDP: the fused
    backward writes into ``weight.main_grad``). Uses apex where megatron-core found it, else
    the GEMMs above; returns False (nothing changed) where neither runs on `device`."""
    from megatron.core.tensor_parallel import layers

    if not layers._grad_accum_fusion_available:
        if not supported(device):
            return False
        layers.fused_weight_gradient_mlp_cuda = _AsApex
        layers._grad_accum_fusion_available = True
    for chunk in chunks:
        chunk.config.gradient_accumulation_fusion = True
        for m in chunk.modules():
            if isinstance(m, (layers.ColumnParallelLinear, layers.RowParallelLinear)):
                m.gradient_accumulation_fusion = True
    return True
