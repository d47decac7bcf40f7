"""Depthwise causal short convolution + SiLU (the q/k/v pre-mixing of Gated DeltaNet and HAM).

    y[b, t, c] = silu( sum_{j=0}^{W-1} weight[c, W-1-j] * x[b, t-j, c] ),   taps with t-j < 0 or
                 in another document than t contribute 0

Layout `[B,T,C]` (C = this tensor-parallel rank's channels), weight `[C,W]`, tap W-1 is the
current token (nn.Conv1d's depthwise weight `[C,1,W]` with its middle dim squeezed).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import check_tensor


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor,
                     doc: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x `[B,T,C]`, weight `[C,W]`, doc int `[B,T]` document ids (None = one document per row).
    Returns SiLU(depthwise causal conv) `[B,T,C]` in x's dtype."""
    check_tensor("x", x, [None, None, None], "[B,T,C]")
    B, T, C = x.shape
    check_tensor("weight", weight, [C, None], "[C,W]")
    if doc is not None:
        check_tensor("doc", doc, [B, T], "[B,T]", floating=False)
    W = weight.shape[1]
    y = x * weight[:, W - 1]
    for j in range(1, min(W, T)):
        shifted = F.pad(x[:, : T - j], (0, 0, j, 0))
        if doc is not None:
            same = F.pad(doc[:, j:] == doc[:, : T - j], (j, 0), value=False)
            shifted = shifted * same[..., None].to(x.dtype)
        y = y + shifted * weight[:, W - 1 - j]
    return F.silu(y)
