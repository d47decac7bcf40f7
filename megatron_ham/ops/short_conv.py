"""Depthwise causal short convolution + SiLU (the q/k/v pre-mixing of Gated DeltaNet and HAM).

    y[b, t, c] = silu( sum_{j=0}^{W-1} weight[c, W-1-j] * x[b, t-j, c] ),   taps with t-j < 0 or
                 in another document than t contribute 0

Layout `[B,T,C]` (C = this tensor-parallel rank's channels), weight `[C,W]`, tap W-1 is the
current token (nn.Conv1d's depthwise weight `[C,1,W]` with its middle dim squeezed).
Padding (`mask` False: a token that is not there) is no tap: the j-th tap of a token is the j-th
real token before it, so a row's real tokens give what they give without the padding; a padding
position's output is 0.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import check_tensor


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor,
                     doc: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x `[B,T,C]`, weight `[C,W]`, doc int `[B,T]` document ids (None = one document per row),
    mask bool `[B,T]` (None = every token is there; False = padding, skipped).
    Returns SiLU(depthwise causal conv) `[B,T,C]` in x's dtype."""
    check_tensor("x", x, [None, None, None], "[B,T,C]")
    B, T, C = x.shape
    check_tensor("weight", weight, [C, None], "[C,W]")
    if doc is not None:
        check_tensor("doc", doc, [B, T], "[B,T]", floating=False)
    if mask is None:
        return _conv(x, weight, doc)
    check_tensor("mask", mask, [B, T], "[B,T]", floating=False)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape [B,T], got dtype {mask.dtype}")
    # each row's real tokens moved to its front, in order (the padding after them): the conv runs
    # over them as one sequence, and the outputs go back to their positions
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # [B,T]
    idx = order[..., None].expand(B, T, C)
    y = _conv(x.gather(1, idx), weight, doc.gather(1, order) if doc is not None else None)
    y = torch.zeros_like(y).scatter(1, idx, y)
    return y * mask[..., None].to(y.dtype)


def _conv(x: torch.Tensor, weight: torch.Tensor, doc: Optional[torch.Tensor]) -> torch.Tensor:
    B, T, C = x.shape
    W = weight.shape[1]
    y = x * weight[:, W - 1]
    for j in range(1, min(W, T)):
        shifted = F.pad(x[:, : T - j], (0, 0, j, 0))
        if doc is not None:
            same = F.pad(doc[:, j:] == doc[:, : T - j], (j, 0), value=False)
            shifted = shifted * same[..., None].to(x.dtype)
        y = y + shifted * weight[:, W - 1 - j]
    return F.silu(y)
