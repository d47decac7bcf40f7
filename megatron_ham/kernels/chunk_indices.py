"""fla's chunk indices of packed documents, from the boundaries' host copy when there is one.

fla's varlen kernels walk ``chunk_indices [NT, 2]`` (cu_seqlens' dtype): row i is (document n,
chunk c of that document) of the i-th ``chunk_size``-token chunk, documents in order. fla derives
them from a CUDA ``cu_seqlens`` on the device, which reads a count back to the host: one sync,
the host waiting for all queued GPU work, once per new boundaries tensor (every micro-batch).
Given the same boundaries on the host (``cu_seqlens_cpu``, fla's name for it), they are computed
there and reach the device through pinned memory without the host waiting.

Cached by argument identity (fla's ``tensor_cache``): the layers of one forward pass the same
tensors, so the indices are built once per forward and reused by its backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from fla.ops.utils.index import prepare_chunk_indices
from fla.utils import tensor_cache

__all__ = ["chunk_indices"]


@tensor_cache
def chunk_indices(cu_seqlens: torch.Tensor, chunk_size: int,
                  cu_seqlens_cpu: Optional[torch.Tensor] = None) -> torch.Tensor:
    """cu_seqlens int ``[N+1]`` (any device), cu_seqlens_cpu its host copy or None ->
    ``[NT, 2]`` on cu_seqlens' device and dtype, equal to fla's ``prepare_chunk_indices``."""
    if cu_seqlens_cpu is None:
        return prepare_chunk_indices(cu_seqlens, chunk_size)  # on the device: one sync
    lens = cu_seqlens_cpu.to(torch.int64).diff()                          # (N,)
    counts = (lens + chunk_size - 1) // chunk_size                        # (N,) chunks per document
    doc = torch.repeat_interleave(torch.arange(counts.numel()), counts)   # (NT,) document of each chunk
    first = torch.cumsum(counts, 0) - counts                              # (N,) index of its first chunk
    within = torch.arange(doc.numel()) - first[doc]                       # (NT,) chunk within its document
    host = torch.stack([doc, within], 1).to(cu_seqlens.dtype)
    if not cu_seqlens.is_cuda:
        return host.to(cu_seqlens.device)
    return host.pin_memory().to(cu_seqlens.device, non_blocking=True)
