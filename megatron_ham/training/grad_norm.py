"""Gradient norm and clipping on torch's foreach kernels, for megatron-core without apex / TE.

Megatron's optimizer computes the gradient norm and applies clipping through apex's or
Transformer Engine's multi-tensor kernels. Neither installs on our machines, and megatron-core
0.19's fallbacks (``megatron.core.utils.local_multi_tensor_l2_norm`` / ``_scale``) are slow in a
way the profile shows: the norm converts every tensor's norm to a Python float, i.e. one device
sync per parameter tensor (311 per optimizer step for the 800M models), and the scale launches
two kernels per tensor. The drop-ins here keep the fallbacks' signatures and results:

    foreach_l2_norm   ||[g_1, ..., g_n]||_2 = || (||g_1||_2, ..., ||g_n||_2) ||_2, one fp32 [1]
                      tensor on the gradients' device, no sync (Megatron reads it once, after
                      its all-reduce)
    foreach_scale     dst_i = src_i * scale, one foreach launch

:func:`install` puts them into ``megatron.core.optimizer.clip_grads`` where, and only where, that
module runs on the fallbacks (with apex or TE present nothing changes).
"""
from __future__ import annotations

from typing import List

import torch

__all__ = ["foreach_l2_norm", "foreach_scale", "install"]


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists: List[List[torch.Tensor]], per_tensor, *args):
    """Drop-in for ``local_multi_tensor_l2_norm``: (fp32 [1] norm of every tensor of
    tensor_lists[0] together, None). per_tensor norms are not supported (Megatron asks for none)."""
    if per_tensor:
        raise NotImplementedError("foreach_l2_norm: per-tensor norms are not supported")
    tensors = tensor_lists[0]
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)  # each accumulated in fp32
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists: List[List[torch.Tensor]], scale):
    """Drop-in for ``local_multi_tensor_scale``: tensor_lists[1][i] = tensor_lists[0][i] * scale."""
    src, dst = tensor_lists
    if len(src) != len(dst):
        raise ValueError(f"foreach_scale: {len(src)} sources for {len(dst)} destinations")
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def install() -> bool:
    """Use the drop-ins in megatron-core's gradient clipping when it is on its local fallbacks.
    Idempotent; returns True when they are (now) in use."""
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads

    swapped = False
    if clip_grads.l2_norm_impl in (mutils.local_multi_tensor_l2_norm, foreach_l2_norm):
        clip_grads.l2_norm_impl = foreach_l2_norm
        swapped = True
    if clip_grads.multi_tensor_scale_impl in (mutils.local_multi_tensor_scale, foreach_scale):
        clip_grads.multi_tensor_scale_impl = foreach_scale
    return swapped
