"""GPU SwiGLU of the MLP: liger-kernel's fused gate-up kernel.

The op and its reference are ``megatron_ham.ops.swiglu.swiglu`` (impl "liger" runs this): x
``[..., 2F]`` holds the gate then the up projection (megatron-core's fc1 layout), and
``silu(gate) * up`` comes out in x's dtype. liger-kernel's ``LigerFusedGateUpSiLUMulFunction``
reads both halves of each row in one pass, keeps only x for the backward, recomputes the SiLU
there and writes the gradient of x in one piece (no chunk copies, no concatenation).
"""
from __future__ import annotations

import torch
from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction

__all__ = ["swiglu_liger"]


def swiglu_liger(x: torch.Tensor) -> torch.Tensor:
    """x ``[..., 2F]`` (gate, up) -> ``[..., F]``, differentiable; arguments validated by the op.
    Rows are flattened first: liger-kernel 0.8.5's backward returns the gradient as [rows, 2F],
    which autograd refuses for a 3-d x (2026-12-03, H200)."""
    out = LigerFusedGateUpSiLUMulFunction.apply(x.reshape(-1, x.shape[-1]))  # [rows, F]
    return out.view(*x.shape[:-1], out.shape[-1])
