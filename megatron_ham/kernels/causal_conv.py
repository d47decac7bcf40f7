"""GPU depthwise causal short conv + SiLU: our Triton kernels, one pass each way.

The op and its reference are ``megatron_ham.ops.causal_conv_silu`` (impl "triton" runs this):

    p[b, t, c] = sum_{j=0}^{W-1} weight[c, W-1-j] * x[b, t-j, c]     (taps before the row's
                                                                    start or in another document: 0)
    y          = silu(p)

Backward, with gp = dy * silu'(p), silu'(p) = s (1 + p (1 - s)), s = sigmoid(p):

    dx[b, t, c]     = sum_j weight[c, W-1-j] * gp[b, t+j, c]        (t+j in t's document)
    dweight[c, W-1-j] = sum_{b,t} gp[b, t, c] * x[b, t-j, c]        (t-j in t's document)

One program per tile of BT tokens x BC channels. The forward reads the W shifted tiles of x (the
shifts hit L1/L2, not HBM) and writes y. The backward recomputes p in registers for the W rows
t..t+W-1 each token's dx needs (W x W shifted loads of x, again from cache), so it reads x and dy
once from memory and writes dx: nothing is saved from the forward but its inputs, and no
pre-activation tensor is written (fla's backward first recomputes and stores it in x's dtype).
The weight gradient is summed per tile in fp32 into ``[B * tiles, C, W]`` and then over tiles
(deterministic, no atomics). Accumulation is fp32 throughout.

x ``[B, T, C]`` may be any view with unit channel stride (the q, k, v section of the
in-projection's output, read in place); weight ``[C, W]``; documents as int ids ``[B, T]``
(the mixers' ``cached_document_ids``, computed once per forward) or None.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["causal_conv_silu_triton"]

#: tile (tokens x channels) and warps of both kernels
BT, BC, WARPS = 64, 64, 4


@triton.jit
def _tap_mask(doc, t, t_ref, T, HAS_DOC: tl.constexpr):
    """Rows t of this tile that hold a token of row t_ref's document (t in [0, T))."""
    m = (t >= 0) & (t < T)
    if HAS_DOC:
        m = m & (tl.load(doc + t, mask=m, other=-1) == tl.load(doc + t_ref, mask=(t_ref >= 0) & (t_ref < T), other=-2))
    return m


@triton.jit
def _fwd_kernel(x, w, doc, y, T, C, s_xb, s_xt, s_db,
                W: tl.constexpr, HAS_DOC: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    x_b = x + i_b * s_xb
    doc_b = doc + i_b * s_db
    p = tl.zeros((BT, BC), dtype=tl.float32)
    for j in tl.static_range(W):  # tap W-1-j reads x[t-j]
        m = _tap_mask(doc_b, o_t - j, o_t, T, HAS_DOC)
        xs = tl.load(x_b + (o_t - j)[:, None] * s_xt + o_c[None, :], mask=m[:, None] & m_c[None, :], other=0.0)
        wj = tl.load(w + o_c * W + (W - 1 - j), mask=m_c, other=0.0)
        p += xs.to(tl.float32) * wj.to(tl.float32)[None, :]
    out = p * tl.sigmoid(p)
    m_out = (o_t < T)[:, None] & m_c[None, :]
    tl.store(y + (i_b * T + o_t)[:, None] * C + o_c[None, :], out.to(y.dtype.element_ty), mask=m_out)


@triton.jit
def _bwd_kernel(x, w, doc, dy, dx, dw_part, T, C, NT, s_xb, s_xt, s_db, s_dyb, s_dyt,
                W: tl.constexpr, HAS_DOC: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    x_b = x + i_b * s_xb
    doc_b = doc + i_b * s_db
    dx_acc = tl.zeros((BT, BC), dtype=tl.float32)
    for j in tl.static_range(W):  # dx[t] += weight[W-1-j] * gp[u], u = t + j
        u = o_t + j
        p = tl.zeros((BT, BC), dtype=tl.float32)
        for i in tl.static_range(W):  # p[u], tap W-1-i reads x[u-i]
            m = _tap_mask(doc_b, u - i, u, T, HAS_DOC)
            xs = tl.load(x_b + (u - i)[:, None] * s_xt + o_c[None, :], mask=m[:, None] & m_c[None, :], other=0.0)
            wi = tl.load(w + o_c * W + (W - 1 - i), mask=m_c, other=0.0)
            p += xs.to(tl.float32) * wi.to(tl.float32)[None, :]
        m_u = _tap_mask(doc_b, u, o_t, T, HAS_DOC)  # u exists and is in t's document
        g = tl.load(dy + i_b * s_dyb + u[:, None] * s_dyt + o_c[None, :], mask=m_u[:, None] & m_c[None, :], other=0.0)
        s = tl.sigmoid(p)
        gp = g.to(tl.float32) * s * (1.0 + p * (1.0 - s))
        wj = tl.load(w + o_c * W + (W - 1 - j), mask=m_c, other=0.0)
        dx_acc += gp * wj.to(tl.float32)[None, :]
        if j == 0:  # this tile's tokens' share of the weight gradient
            part = dw_part + ((i_b * NT + i_t) * C + o_c) * W
            for i in tl.static_range(W):
                m = _tap_mask(doc_b, o_t - i, o_t, T, HAS_DOC)
                xs = tl.load(x_b + (o_t - i)[:, None] * s_xt + o_c[None, :], mask=m[:, None] & m_c[None, :], other=0.0)
                tl.store(part + (W - 1 - i), tl.sum(gp * xs.to(tl.float32), axis=0), mask=m_c)
    m_out = (o_t < T)[:, None] & m_c[None, :]
    tl.store(dx + (i_b * T + o_t)[:, None] * C + o_c[None, :], dx_acc.to(dx.dtype.element_ty), mask=m_out)


def _doc_args(doc: Optional[torch.Tensor], x: torch.Tensor):
    if doc is None:
        return x, 0, False  # a placeholder pointer, never read
    return doc, doc.stride(0), True


class _ConvSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, doc):
        B, T, C = x.shape
        W = weight.shape[1]
        d, s_db, has_doc = _doc_args(doc, x)
        y = torch.empty(B, T, C, device=x.device, dtype=x.dtype)
        grid = (triton.cdiv(T, BT), triton.cdiv(C, BC), B)
        _fwd_kernel[grid](x, weight, d, y, T, C, x.stride(0), x.stride(1), s_db,
                          W=W, HAS_DOC=has_doc, BT=BT, BC=BC, num_warps=WARPS)
        ctx.save_for_backward(x, weight, doc)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, doc = ctx.saved_tensors
        B, T, C = x.shape
        W = weight.shape[1]
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        d, s_db, has_doc = _doc_args(doc, x)
        NT = triton.cdiv(T, BT)
        dx = torch.empty(B, T, C, device=x.device, dtype=x.dtype)
        dw_part = torch.empty(B * NT, C, W, device=x.device, dtype=torch.float32)
        grid = (NT, triton.cdiv(C, BC), B)
        _bwd_kernel[grid](x, weight, d, dy, dx, dw_part, T, C, NT, x.stride(0), x.stride(1), s_db,
                          dy.stride(0), dy.stride(1), W=W, HAS_DOC=has_doc, BT=BT, BC=BC, num_warps=WARPS)
        return dx, dw_part.sum(0).to(weight.dtype), None


def causal_conv_silu_triton(x: torch.Tensor, weight: torch.Tensor,
                            doc: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x ``[B,T,C]`` CUDA (unit channel stride), weight ``[C,W]``, doc int ``[B,T]`` document
    ids or None -> SiLU(causal depthwise conv) ``[B,T,C]`` contiguous, x's dtype. Arguments
    are assumed validated by the op (``ops.causal_conv_silu``)."""
    if not x.is_cuda:
        raise ValueError(f"causal_conv_silu_triton needs CUDA tensors, got x on {x.device}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    if doc is not None:
        doc = doc.to(device=x.device).contiguous()
    return _ConvSilu.apply(x, weight, doc)
