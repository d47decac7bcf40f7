"""GPU cross entropy of the language model's (vocab-parallel) logits: our Triton kernels.

The op and its reference are ``megatron_ham.ops.cross_entropy.vocab_parallel_cross_entropy``
(impl "triton" runs this). Rows are tokens; this rank holds the vocabulary ids
``[vocab_start, vocab_start + V)`` of every row (all of them without tensor parallelism)::

    loss_i = log sum_j exp(x_ij) - x_i,t_i        (j over the whole vocabulary, fp32 inside)
    dL/dx_ij = g_i (softmax_ij - [j == t_i])      (g = the loss's gradient)

Forward, one program per row: one pass over the row (online max and sum of exponentials, the
target's logit where this rank holds it), three fp32 numbers out. Across tensor-parallel ranks
the op combines them (all-reduce MAX of the maxima, SUM of the rescaled sums and of the target
logits: ``[N]`` tensors). Backward, one program per (row, block of the vocabulary): the
gradient in the logits' dtype, from the logits and the row's log-sum-exp.

What this replaces, and why (docs/benchmarks.md, issue #15): megatron-core's fused cross entropy
(compiled) converts the bf16 logits to fp32, keeps their fp32 softmax for the backward (2 GiB for
16k tokens x 32k ids) and runs five kernels. Here the forward reads the logits once, the backward
reads them once and writes the gradient once, and the backward keeps the bf16 logits (half the
bytes of an fp32 softmax) and ``lse`` [N].
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl

__all__ = ["vocab_parallel_cross_entropy_triton"]

#: vocabulary ids per inner step (forward) and per program (backward)
BLOCK = 4096


@triton.jit
def _fwd_kernel(X, TGT, MAX, SUMEXP, XT, stride, V, vocab_start, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    t = tl.load(TGT + row) - vocab_start
    here = (t >= 0) & (t < V)
    xt = tl.load(x_row + tl.where(here, t, 0), mask=here, other=0.0).to(tl.float32)
    tl.store(MAX + row, m)
    tl.store(SUMEXP + row, s)
    tl.store(XT + row, xt)


@triton.jit
def _bwd_kernel(X, TGT, LSE, G, DX, stride, stride_dx, V, vocab_start, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < V
    x = tl.load(X + row * stride + offs, mask=ok, other=0.0).to(tl.float32)
    p = tl.exp(x - tl.load(LSE + row))                                        # softmax
    p = tl.where(offs == tl.load(TGT + row) - vocab_start, p - 1.0, p)
    g = tl.load(G + row).to(tl.float32)
    tl.store(DX + row * stride_dx + offs, (p * g).to(DX.dtype.element_ty), mask=ok)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, vocab_start, group):
        N, V = x.shape
        stats = torch.empty(3, N, device=x.device, dtype=torch.float32)   # max, sum exp, x_t
        if N:
            _fwd_kernel[(N,)](x, target, stats[0], stats[1], stats[2], x.stride(0), V, vocab_start,
                              BLOCK=BLOCK, num_warps=8)
        m, s, xt = stats
        if group is not None:
            M = m.clone()
            dist.all_reduce(M, op=dist.ReduceOp.MAX, group=group)
            s_xt = torch.stack((s * torch.exp(m - M), xt))
            dist.all_reduce(s_xt, op=dist.ReduceOp.SUM, group=group)
            m, (s, xt) = M, s_xt
        lse = m + torch.log(s)
        ctx.save_for_backward(x, target, lse)
        ctx.vocab_start = vocab_start
        return lse - xt

    @staticmethod
    def backward(ctx, g):
        x, target, lse = ctx.saved_tensors
        N, V = x.shape
        dx = torch.empty_like(x)
        if N:
            _bwd_kernel[(N, triton.cdiv(V, BLOCK))](x, target, lse, g.contiguous(), dx, x.stride(0),
                                                   dx.stride(0), V, ctx.vocab_start, BLOCK=BLOCK,
                                                   num_warps=8)
        return dx, None, None, None


def vocab_parallel_cross_entropy_triton(logits: torch.Tensor, target: torch.Tensor,
                                        vocab_start: int = 0,
                                        group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """logits ``[..., V]`` (this rank's vocabulary ids ``[vocab_start, vocab_start + V)``; any
    float dtype, unit stride in the last dim), target int ``[...]`` (global ids) -> loss fp32
    ``[...]``; differentiable in logits (the gradient in their dtype). ``group``: the ranks
    holding the rest of the vocabulary (None: all of it is here). Arguments are assumed validated
    by the op."""
    V = logits.shape[-1]
    x = logits.reshape(-1, V)
    if x.stride(-1) != 1:
        x = x.contiguous()
    t = target.reshape(-1).contiguous()
    return _CrossEntropy.apply(x, t, int(vocab_start), group).view(target.shape)
