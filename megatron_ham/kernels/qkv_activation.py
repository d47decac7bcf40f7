"""GPU SiLU + per-head L2 norm of the conv's q, k, v: our Triton kernels, one pass each way.

The op and its reference are ``megatron_ham.ops.gdn_activations.qkv_activations`` (``silu=True``;
impl "triton" runs this). For every token and head, on rows of the conv's pre-activation x::

    q = normalize(silu(x_q)),  k = normalize(silu(x_k)),  v = silu(x_v)
    normalize(s) = s / max(||s||, eps)                    (F.normalize, eps 1e-6; fp32 inside)

Backward, with s = silu(x), n = ||s||, r = max(n, eps), u = s / r, silu'(x) = sig(x) (1 + x (1 - sig(x)))::

    ds = (du - u <u, du>) / r    (n > eps; else du / eps),      dx = ds * silu'(x)   (dv: dx = dv * silu'(x))

One program per tile of BT tokens x one head segment (q heads, then k heads, then v heads of x's
row, ``[B*T, H*(2K+V)]`` contiguous). The backward recomputes s, n and u from x in registers: only
x is kept for it (the compiled PyTorch version kept the SiLU's output, or q, k before their norms,
as well), and it writes dx in one piece, the conv backward's input (no concatenation of dq, dk,
dv). Both directions read and write each element once: memory-bound, no reductions across tiles.

With ``branches=2`` the forward also returns q, k, v a second time, as views of the first (HAM's
two memories read the same q, k, v): each copy receives its own gradient and the backward kernel
adds the two while it reads them, instead of autograd adding them in a pass of their own.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

__all__ = ["qkv_activations_triton", "EPS"]

#: F.normalize's eps in gdn_activations
EPS = 1e-6
#: tokens per program
BT = 32


@triton.jit
def _tile(X, N, H, C, K: tl.constexpr, V: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
    """This program's tile of x, in fp32: tokens [i_t*BT, +BT) x head segment j (q heads 0..H-1,
    k heads H..2H-1, v heads 2H..3H-1). Returns (j, rows, d, col = the segment's first column
    in x, is_qk = normalised or not, mask, x)."""
    i_t, j = tl.program_id(0), tl.program_id(1)
    rows = (i_t * BT + tl.arange(0, BT)).to(tl.int64)
    d = tl.arange(0, BD)
    is_qk = j < 2 * H
    col = tl.where(is_qk, j * K, 2 * H * K + (j - 2 * H) * V)
    m = (rows < N)[:, None] & (d < tl.where(is_qk, K, V))[None, :]
    x = tl.load(X + rows[:, None] * C + col + d[None, :], mask=m, other=0.0).to(tl.float32)
    return j, rows, d, col, is_qk, m, x


@triton.jit
def _qkv_act_fwd_kernel(X, Q, Kt, Vt, N, H, C, eps,
                        K: tl.constexpr, V: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
    j, rows, d, col, is_qk, m, x = _tile(X, N, H, C, K, V, BD, BT)
    s = x * tl.sigmoid(x)                                                     # [BT, BD]
    if is_qk:
        r = tl.maximum(tl.sqrt(tl.sum(s * s, 1)), eps)                        # [BT]
        y = s / r[:, None]
        if j < H:
            tl.store(Q + rows[:, None] * (H * K) + j * K + d[None, :], y.to(Q.dtype.element_ty), mask=m)
        else:
            tl.store(Kt + rows[:, None] * (H * K) + (j - H) * K + d[None, :], y.to(Kt.dtype.element_ty),
                     mask=m)
    else:
        tl.store(Vt + rows[:, None] * (H * V) + (j - 2 * H) * V + d[None, :], s.to(Vt.dtype.element_ty),
                 mask=m)


@triton.jit
def _grad_tile(D1, D2, offs, m, TWO: tl.constexpr):
    """One output's gradient tile in fp32: D1's, plus D2's (the second branch) when TWO."""
    g = tl.load(D1 + offs, mask=m, other=0.0).to(tl.float32)
    if TWO:
        g += tl.load(D2 + offs, mask=m, other=0.0).to(tl.float32)
    return g


@triton.jit
def _qkv_act_bwd_kernel(X, DQ, DK, DV, DQ2, DK2, DV2, DX, N, H, C, eps,
                        K: tl.constexpr, V: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
                        TWO: tl.constexpr):
    j, rows, d, col, is_qk, m, x = _tile(X, N, H, C, K, V, BD, BT)
    sig = tl.sigmoid(x)
    s = x * sig
    dsilu = sig * (1.0 + x * (1.0 - sig))
    if is_qk:
        if j < H:
            du = _grad_tile(DQ, DQ2, rows[:, None] * (H * K) + j * K + d[None, :], m, TWO)
        else:
            du = _grad_tile(DK, DK2, rows[:, None] * (H * K) + (j - H) * K + d[None, :], m, TWO)
        n = tl.sqrt(tl.sum(s * s, 1))                                         # [BT]
        r = tl.maximum(n, eps)
        u = s / r[:, None]
        proj = tl.where(n > eps, tl.sum(u * du, 1), 0.0)                      # <u, du>, 0 if clamped
        ds = (du - u * proj[:, None]) / r[:, None]
    else:
        ds = _grad_tile(DV, DV2, rows[:, None] * (H * V) + (j - 2 * H) * V + d[None, :], m, TWO)
    tl.store(DX + rows[:, None] * C + col + d[None, :], (ds * dsilu).to(DX.dtype.element_ty), mask=m)


def _launch(kernel, N, H, K, V, *args, **meta):
    BD = max(16, triton.next_power_of_2(max(K, V)))
    kernel[(triton.cdiv(N, BT), 3 * H)](*args, K=K, V=V, BD=BD, BT=BT,
                                       num_warps=4 if BD <= 128 else 8, **meta)


class _QKVActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, H, K, V, branches):
        B, T, C = x.shape
        N = B * T
        q = torch.empty(B, T, H, K, device=x.device, dtype=x.dtype)
        k = torch.empty_like(q)
        v = torch.empty(B, T, H, V, device=x.device, dtype=x.dtype)
        if N:
            _launch(_qkv_act_fwd_kernel, N, H, K, V, x, q, k, v, N, H, C, EPS)
        ctx.save_for_backward(x)
        ctx.dims = (H, K, V)
        if branches == 2:  # the second branch: views of the first, with gradients of their own
            return q, k, v, q.view_as(q), k.view_as(k), v.view_as(v)
        return q, k, v

    @staticmethod
    def backward(ctx, *grads):  # dq, dk, dv (, dq2, dk2, dv2)
        (x,) = ctx.saved_tensors
        H, K, V = ctx.dims
        B, T, C = x.shape
        zeros = lambda g, D: (torch.zeros(B, T, H, D, device=x.device, dtype=x.dtype)  # noqa: E731
                              if g is None else g.contiguous())
        grads = [zeros(g, D) for g, D in zip(grads, (K, K, V) * 2)]
        two = len(grads) == 6
        dx = torch.empty_like(x)
        if B * T:
            _launch(_qkv_act_bwd_kernel, B * T, H, K, V, x, *grads[:3], *(grads[3:] if two else grads), dx,
                    B * T, H, C, EPS, TWO=two)
        return dx, None, None, None, None


def qkv_activations_triton(x: torch.Tensor, H: int, K: int, V: int, branches: int = 1
                           ) -> Tuple[torch.Tensor, ...]:
    """x ``[B,T,H*(2K+V)]`` (the conv's pre-activation; made contiguous) -> q, k ``[B,T,H,K]``
    (SiLU then L2-normalised per head), v ``[B,T,H,V]`` (SiLU), contiguous, x's dtype;
    differentiable in x; ``branches=2``: then q, k, v again (views; their gradients are added in
    the backward kernel). Arguments are assumed validated by the op."""
    return _QKVActivation.apply(x.contiguous(), int(H), int(K), int(V), int(branches))
