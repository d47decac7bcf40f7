"""GPU depthwise causal short conv (no activation): our Triton kernels.

What ``megatron_ham.ops.causal_conv_silu(impl="triton")`` runs (the op applies the SiLU on top
when asked; the mixers ask for the conv alone). For x ``[B,T,C]`` and weight ``[C,W]`` (tap W-1
the current token), within each document::

    y[t, c] = sum_{j < W, t-j >= dstart(t)} w[c, W-1-j] * x[t-j, c]

    dx[t, c] = sum_{j < W, t+j < dend(t)} w[c, W-1-j] * dy[t+j, c]
    dw[c, W-1-j] = sum_t [t+j < dend(t)] dy[t+j, c] * x[t, c]

dstart / dend are the start / end of t's document (0 / T without ``cu_seqlens``).

* Forward: one program per (tile of BT tokens, block of BD channels, batch row); the W taps are
  W loads of x shifted by one row (the second to W-th hit L1/L2). x may be strided (the q, k, v
  section of the in-projection's output): only the channel stride must be 1.
* Backward: one pass. A fixed number of programs per channel block (``PROGRAMS`` in all,
  about 4 per SM), each walking every P-th token tile: dx of the tile from W shifted loads of
  dy, and its share of dw in fp32 registers, stored once as one row of a ``[P, C, W]`` fp32
  buffer that a torch sum reduces. fla 0.6.0's kernel (``kernels.short_conv``) writes a partial
  dw per 64-token tile instead (``[B x T/64, C, W]``, summed after).

Memory-bound both ways: the forward reads x and writes y once, the backward reads x and dy and
writes dx once.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["causal_conv_triton", "document_bounds"]

#: tokens per tile, channels per block, warps (the interpreter uses the same)
BT, BD, WARPS = 64, 128, 4
#: backward programs per SM (over all channel blocks)
PROGRAMS_PER_SM = 4


@triton.jit
def _fwd_kernel(X, Wt, Y, DSTART, T, C, s_xb, s_xt, s_yb, s_yt,
                W: tl.constexpr, BW: tl.constexpr, HAS_DOC: tl.constexpr,
                BT: tl.constexpr, BD: tl.constexpr):
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = (i_t * BT + tl.arange(0, BT)).to(tl.int64)                     # [BT]
    cols = i_d * BD + tl.arange(0, BD)                                     # [BD]
    r_ok, c_ok = rows < T, cols < C
    if HAS_DOC:
        ds = tl.load(DSTART + rows, mask=r_ok, other=0).to(tl.int64)
    else:
        ds = tl.zeros([BT], dtype=tl.int64)
    taps = tl.arange(0, BW)
    w = tl.load(Wt + cols[:, None] * W + taps[None, :], mask=c_ok[:, None] & (taps < W)[None, :],
                other=0.0).to(tl.float32)                                  # [BD, BW]
    xb = X + i_b * s_xb
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for j in tl.static_range(W):
        src = rows - j
        ok = r_ok & (src >= ds)
        x = tl.load(xb + src[:, None] * s_xt + cols[None, :], mask=ok[:, None] & c_ok[None, :],
                    other=0.0).to(tl.float32)                              # x[t-j]  [BT, BD]
        w_j = tl.sum(tl.where(taps[None, :] == W - 1 - j, w, 0.0), 1)      # w[:, W-1-j]  [BD]
        acc += x * w_j[None, :]
    tl.store(Y + i_b * s_yb + rows[:, None] * s_yt + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=r_ok[:, None] & c_ok[None, :])


@triton.jit
def _bwd_kernel(X, Wt, DY, DX, DW_PART, DEND, T, C, NT, NTILES,
                s_xb, s_xt, s_dyb, s_dyt, s_dxb, s_dxt,
                W: tl.constexpr, BW: tl.constexpr, HAS_DOC: tl.constexpr,
                BT: tl.constexpr, BD: tl.constexpr):
    i_d, pid = tl.program_id(0), tl.program_id(1)
    P = tl.num_programs(1)
    cols = i_d * BD + tl.arange(0, BD)
    c_ok = cols < C
    taps = tl.arange(0, BW)
    w = tl.load(Wt + cols[:, None] * W + taps[None, :], mask=c_ok[:, None] & (taps < W)[None, :],
                other=0.0).to(tl.float32)                                  # [BD, BW]
    dw = tl.zeros([BD, BW], dtype=tl.float32)
    for tile in range(pid, NTILES, P):                                     # tiles of all rows
        i_b = (tile // NT).to(tl.int64)
        rows = ((tile % NT) * BT + tl.arange(0, BT)).to(tl.int64)
        r_ok = rows < T
        if HAS_DOC:
            de = tl.load(DEND + rows, mask=r_ok, other=0).to(tl.int64)
        else:
            de = tl.zeros([BT], dtype=tl.int64) + T
        m = r_ok[:, None] & c_ok[None, :]
        x = tl.load(X + i_b * s_xb + rows[:, None] * s_xt + cols[None, :], mask=m,
                    other=0.0).to(tl.float32)                              # [BT, BD]
        dyb = DY + i_b * s_dyb
        dx = tl.zeros([BT, BD], dtype=tl.float32)
        for j in tl.static_range(W):
            dst = rows + j
            ok = r_ok & (dst < de)
            dy = tl.load(dyb + dst[:, None] * s_dyt + cols[None, :], mask=ok[:, None] & c_ok[None, :],
                         other=0.0).to(tl.float32)                         # dy[t+j]  [BT, BD]
            tap = taps[None, :] == W - 1 - j
            dx += dy * tl.sum(tl.where(tap, w, 0.0), 1)[None, :]
            dw += tl.where(tap, tl.sum(dy * x, 0)[:, None], 0.0)
        tl.store(DX + i_b * s_dxb + rows[:, None] * s_dxt + cols[None, :],
                 dx.to(DX.dtype.element_ty), mask=m)
    tl.store(DW_PART + pid.to(tl.int64) * C * W + cols[:, None] * W + taps[None, :], dw,
             mask=c_ok[:, None] & (taps < W)[None, :])


def document_bounds(cu_seqlens: torch.Tensor, T: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """cu_seqlens int ``[N+1]`` -> (dstart, dend) int32 ``[T]``: the start and end of the document
    of every position (on the device, no sync)."""
    cu = cu_seqlens.to(torch.int64)
    doc = torch.searchsorted(cu[1:], torch.arange(T, device=cu.device), right=True)
    return cu[doc].to(torch.int32), cu[doc + 1].to(torch.int32)


def _programs(x: torch.Tensor, n_d: int, tiles: int) -> int:
    """Backward programs per channel block: about PROGRAMS_PER_SM per SM over all blocks (3 for
    the interpreter), at most one per tile."""
    if not x.is_cuda:
        return max(1, min(3, tiles))
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, n_d), tiles))


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, cu_seqlens):
        B, T, C = x.shape
        W = weight.shape[1]
        y = torch.empty(B, T, C, device=x.device, dtype=x.dtype)
        ds, de = document_bounds(cu_seqlens, T) if cu_seqlens is not None else (None, None)
        meta = dict(W=W, BW=triton.next_power_of_2(W), HAS_DOC=ds is not None, BT=BT, BD=BD,
                    num_warps=WARPS)
        if y.numel():
            _fwd_kernel[(triton.cdiv(T, BT), triton.cdiv(C, BD), B)](
                x, weight, y, ds, T, C, x.stride(0), x.stride(1), y.stride(0), y.stride(1), **meta)
        ctx.save_for_backward(x, weight, de)
        ctx.meta = meta
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, de = ctx.saved_tensors
        B, T, C = x.shape
        W = weight.shape[1]
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx = torch.empty(B, T, C, device=x.device, dtype=x.dtype)
        nt, n_d = triton.cdiv(T, BT), triton.cdiv(C, BD)
        P = _programs(x, n_d, B * nt)
        dw_part = torch.zeros(P, C, W, device=x.device, dtype=torch.float32)
        if dx.numel():
            _bwd_kernel[(n_d, P)](x, weight, dy, dx, dw_part, de, T, C, nt, B * nt,
                                  x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
                                  dx.stride(0), dx.stride(1), **ctx.meta)
        return dx, dw_part.sum(0).to(weight.dtype), None


def causal_conv_triton(x: torch.Tensor, weight: torch.Tensor,
                       cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x ``[B,T,C]`` (any strides with a unit channel stride), weight ``[C,W]``, cu_seqlens int
    ``[N+1]`` (B == 1) or None -> the causal depthwise conv ``[B,T,C]`` contiguous in x's dtype,
    no activation; differentiable in x and weight. Arguments are assumed validated by the op."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _CausalConv.apply(x, weight.contiguous(), cu_seqlens)
