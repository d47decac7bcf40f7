"""Cross entropy of the language model's logits, split over the vocabulary (tensor parallelism).

Rows are tokens; this rank holds the logits of vocabulary ids ``[vocab_start, vocab_start + V)``
(all of them without tensor parallelism, ``group=None``)::

    loss = logsumexp_j(x_j) - x_t          (j over the whole vocabulary, t the target; fp32)

Across ranks: each takes its own maximum, sum of exponentials and (where it holds the target) the
target's logit; the maxima are all-reduced (MAX), the sums rescaled to the global maximum and
all-reduced (SUM), the target logits too. Every rank then holds the same loss; its backward gives
each rank the gradient of its own logits (softmax - one-hot, times the loss's gradient).
Megatron's vocab-parallel cross entropy computes the same; this one is ours so that the GPU runs
our kernels (megatron_ham.kernels.cross_entropy, ``impl="auto"``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ._checks import check_tensor
from ._kernels import load_kernels, resolve_kernel_impl

IMPLS = ("auto", "reference", "triton")


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *,
                                 vocab_start: int = 0, group: Optional[dist.ProcessGroup] = None,
                                 impl: str = "auto") -> torch.Tensor:
    """logits ``[..., V]`` (ids ``[vocab_start, vocab_start + V)`` of the vocabulary), target int
    ``[...]`` (ids of the whole vocabulary) -> loss fp32 ``[...]``, differentiable in logits.
    ``group``: the ranks that hold the rest of the vocabulary (None or one rank: none).
    ``impl``: "reference" (PyTorch, below), "triton" (our kernels: CUDA logits; the backward
    keeps the logits and a log-sum-exp per row), "auto" (triton where it runs)."""
    check_tensor("logits", logits, [None] * logits.dim(), "[..., V]")
    if logits.dim() < 1 or tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"target must have logits' shape without its last dim "
                         f"{list(logits.shape[:-1])}, got {list(target.shape)}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer token ids, got dtype {target.dtype}")
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    if cross_entropy_impl(logits, impl) == "triton":
        return load_kernels("cross_entropy").vocab_parallel_cross_entropy_triton(
            logits, target, vocab_start, group)
    return _reference(logits, target, vocab_start, group)


def cross_entropy_impl(logits: torch.Tensor, impl: str = "auto") -> str:
    """The implementation :func:`vocab_parallel_cross_entropy` runs: THE single dispatch point.
    "auto" is "triton" for CUDA logits when megatron_ham.kernels.cross_entropy imports, else
    "reference"; "triton" asked for where it cannot run raises ValueError."""
    return resolve_kernel_impl("vocab_parallel_cross_entropy", impl, IMPLS, "triton", logits.is_cuda,
                               "cross_entropy", f"CUDA logits; logits are on {logits.device}")


class _SumOverRanks(torch.autograd.Function):
    """All-reduce SUM in forward, identity in backward: every rank back-propagates its own copy
    of the (same) loss, so each gets the gradient of its own logits."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def _reference(logits, target, vocab_start: int, group):
    x = logits.float()                                                # [..., V]
    V = x.shape[-1]
    t = target.long() - vocab_start
    here = (t >= 0) & (t < V)
    x_t = torch.where(here, x.gather(-1, t.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1), 0.0)
    m = x.detach().amax(-1)                                           # [...]
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    sum_exp = torch.exp(x - m.unsqueeze(-1)).sum(-1)
    if group is not None:
        sum_exp, x_t = _SumOverRanks.apply(sum_exp, group), _SumOverRanks.apply(x_t, group)
    return m + torch.log(sum_exp) - x_t
