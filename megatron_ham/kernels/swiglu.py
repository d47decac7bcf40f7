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
    """x ``[..., 2F]`` (gate, up) -> ``[..., F]``, differentiable; arguments validated by the op."""
    return LigerFusedGateUpSiLUMulFunction.apply(x)
