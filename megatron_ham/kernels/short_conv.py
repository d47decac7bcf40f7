"""GPU depthwise causal short conv + SiLU: fla 0.6.0's Triton kernels.

What ``megatron_ham.ops.causal_conv_silu(impl="auto")`` runs for CUDA bf16/fp16 inputs without
padding (the reference there is the definition; tests/test_kernels_gpu.py checks the two agree):

* forward: fla's ``causal_conv1d`` (``activation="silu"``, or none with ``silu=False``): one
  kernel, tiles of 64 tokens x a block of channels, the W taps loaded from x through its strides, so a strided x (the q, k, v
  section of the in-projection's output, a view) is read in place;
* backward: fla's: one kernel for dx and per-tile partial weight gradients, summed in fp32. With
  the SiLU, fla first recomputes the pre-activation (a second forward, written out) and that
  kernel reads it at every tap; the mixers therefore ask for the conv alone (``silu=False``)
  and apply the SiLU with the q/k norms (``ops.qkv_activations``), whose backward hands this one
  dL/dpre.

The weight convention is ours: ``weight [C, W]``, tap W-1 the current token. Documents are
``cu_seqlens`` over one packed row (B == 1): the taps restart at every boundary. The chunk
indices fla walks come from ``kernels.chunk_indices`` with the same arguments as
``megatron_ham.kernels.gdn``'s: built once per forward for all layers, on the host when the
boundaries' host copy is given (no sync), else on the device (one sync).
"""
from __future__ import annotations

from typing import Optional

import torch

from .gdn import CHUNK  # importing .gdn also checks fla's version (0.6.0 only)
from fla.modules.causal_conv1d import causal_conv1d  # noqa: E402

from .chunk_indices import chunk_indices as varlen_chunk_indices  # noqa: E402

__all__ = ["causal_conv_silu_fla"]


def causal_conv_silu_fla(x: torch.Tensor, weight: torch.Tensor,
                         cu_seqlens: Optional[torch.Tensor] = None,
                         cu_seqlens_cpu: Optional[torch.Tensor] = None,
                         silu: bool = True) -> torch.Tensor:
    """x ``[B,T,C]`` (any strides with unit channel stride), weight ``[C,W]``, cu_seqlens int
    ``[N+1]`` (B == 1) or None, cu_seqlens_cpu its host copy or None -> SiLU(causal depthwise
    conv) ``[B,T,C]`` contiguous, x's dtype (the conv alone with ``silu=False``)."""
    chunks = None if cu_seqlens is None else varlen_chunk_indices(cu_seqlens, CHUNK, cu_seqlens_cpu)
    y, _ = causal_conv1d(x, weight, activation="silu" if silu else None, backend="triton",
                         cu_seqlens=cu_seqlens, chunk_indices=chunks)
    return y
