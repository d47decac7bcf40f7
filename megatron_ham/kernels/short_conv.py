"""GPU short convolution: fla's Triton causal_conv1d with SiLU, for ``ops.causal_conv_silu``.

Same contract as :func:`megatron_ham.ops.short_conv.causal_conv_silu` without a padding mask:
x ``[B,T,C]`` (any strides with a unit last one: a view of the fused in-projection is read in
place), weight ``[C,W]`` with tap W-1 the current token (fla's convention too), documents as
``cu_seqlens`` over the flattened tokens (B == 1). One forward and one backward kernel (dx and the
per-chunk dw, then a sum) instead of Inductor's shifted-copy kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
from fla.modules.causal_conv1d import causal_conv1d

__all__ = ["causal_conv_silu_fla"]


def causal_conv_silu_fla(x: torch.Tensor, weight: torch.Tensor,
                         cu_seqlens: Optional[torch.Tensor] = None,
                         cu_seqlens_cpu: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SiLU(depthwise causal conv) ``[B,T,C]`` in x's dtype; documents restart the taps at each
    ``cu_seqlens`` boundary (``cu_seqlens_cpu``: the same on the host, saves fla a device sync)."""
    y, _ = causal_conv1d(x, weight, activation="silu", backend="triton", cu_seqlens=cu_seqlens,
                         cu_seqlens_cpu=cu_seqlens_cpu)
    return y
