"""Rotary position embedding (RoPE) of the attention layers: Megatron's non-interleaved form.

One implementation for the Megatron layers (megatron_ham.layers.SDPACoreAttention, compiled into
one kernel per tensor with model.fusions) and the exported Hugging Face model.

    inv_freq_j = base^(-2j / d),  j < d/2          angle_{t,j} = t * inv_freq_j
    cos_t = cos([angle_t, angle_t]),  sin_t = sin([angle_t, angle_t])           (d entries)
    rope(x)_t = x_t * cos_t + [-x2_t, x1_t] * sin_t,   x_t = [x1_t, x2_t] (halves of the head dim)
"""
from __future__ import annotations

from typing import Tuple

import torch


def rope_cos_sin(head_dim: int, base: float, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 `[*positions.shape, head_dim]` for integer `positions` (any shape);
    head_dim even. The frequencies as Megatron's RotaryEmbedding (repeated as [f, f])."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim}")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                            device=positions.device) / head_dim))
    angle = positions.to(torch.float32)[..., None] * inv_freq                   # [..., d/2]
    emb = torch.cat([angle, angle], dim=-1)                                      # [..., d]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[..., d]` rotated by cos / sin (float32, broadcastable to x); computed in float32,
    returned in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
