"""The hidden-state norm of every layer: RMSNorm or LayerNorm over the last dim.

One function for the Megatron layers (megatron_ham.layers.norm.HAMNorm, `local` backend) and the
exported Hugging Face model, so both compute the same numbers (torch's fused rms_norm /
layer_norm: fp32 statistics inside).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def hidden_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                eps: float) -> torch.Tensor:
    """x [..., h] -> RMSNorm(x) * weight when `bias` is None, else LayerNorm(x) * weight + bias
    (weight, bias [h]); output in x's dtype."""
    h = x.shape[-1]
    if bias is None:
        return F.rms_norm(x, (h,), weight, eps)
    return F.layer_norm(x, (h,), weight, bias, eps)
