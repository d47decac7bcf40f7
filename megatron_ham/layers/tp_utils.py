"""Tensor-parallel helpers of the megatron-ham layers (no state; work with gloo and NCCL).

- `all_reduce_backward(x, group)`: identity forward, gradient all-reduced (SUM) over `group` in
  backward. Applied to a *replicated* parameter or activation that acts on this rank's TP-split
  heads (the per-head output-norm weight, the learned router's output), so each rank's gradient
  becomes the full gradient, identical on every TP rank, with no help from finalize_model_grads
  (Megatron-Core's GatedDeltaNet misses this for its out_norm weight: Megatron-LM issue 7452).
- `split_tensor_sections` / `SectionSplitFactory`: a dist-checkpointing factory that saves a
  fused TP-sharded tensor (rows = concatenated per-rank sections) as named sections, each its own
  TP-sharded ShardedTensor, so the checkpoint does not depend on the TP layout.
"""
from __future__ import annotations

from dataclasses import replace
from typing import List, Sequence

import torch
import torch.distributed as dist


class _AllReduceBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_backward(x: torch.Tensor, group) -> torch.Tensor:
    """Identity in forward; sums the gradient over `group` in backward (no-op for size-1/None)."""
    if group is None or dist.get_world_size(group) == 1 or not torch.is_grad_enabled():
        return x
    return _AllReduceBackward.apply(x, group)


def section_factory(sh_ten, sections: Sequence[int], names: Sequence[str], dim: int = 0):
    """Wrap ShardedTensor `sh_ten` (this rank's fused rows) into a ShardedTensorFactory saving
    `len(sections)` pieces, keys `<key>.<name>`, each TP-sharded along `dim` like the original.

    `sections` are this rank's local widths along `dim`; they must add up to the local size.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if not isinstance(sh_ten, ShardedTensor):
        raise TypeError(f"section_factory expects a ShardedTensor, got {type(sh_ten).__name__}")
    base = sh_ten.without_data()
    if sum(sections) != base.local_shape[dim]:
        raise ValueError(
            f"sections {list(sections)} do not cover the local size {base.local_shape[dim]} "
            f"of {sh_ten.key} along dim {dim}"
        )
    sections = list(sections)
    names = list(names)

    @torch.no_grad()
    def build(key, t, replica_id, flattened_range):
        whole = replace(
            base, key=key, data=t, dtype=t.dtype, replica_id=replica_id,
            flattened_range=flattened_range,
        )
        out: List = []
        start = 0
        for width, name in zip(sections, names):
            for piece in whole.narrow(dim, start, width):
                piece.key = f"{piece.key}.{name}"
                out.append(piece)
            start += width
        return out

    @torch.no_grad()
    def merge(pieces):
        return torch.cat(pieces, dim=dim)

    return ShardedTensorFactory(sh_ten.key, sh_ten.data, build, merge, sh_ten.replica_id)
