"""GPU q, k, v activations: SiLU + per-head L2 norm, fused with the short conv before them.

Two ops run these kernels (references in ``megatron_ham.ops.gdn_activations``):

* ``qkv_activations(silu=True, impl="triton")``: from the conv's pre-activation x;
* ``conv_qkv_activations(impl="triton")``: from the conv's INPUT (the in-projection's q, k, v
  columns, read in place): the depthwise causal conv is computed in registers, so its output is
  never written, and the backward writes the whole in-projection's gradient in one buffer.

For every token and head, on rows of the pre-activation x::

    x[t, c] = sum_{i<W} w[c, W-1-i] * u[t-i, c]        (the conv of u; taps of t-i in another
                                                        document or row contribute 0)
    q = normalize(silu(x_q)),  k = normalize(silu(x_k)),  v = silu(x_v)
    normalize(s) = s / max(||s||, eps)                  (F.normalize, eps 1e-6; fp32 inside)

Backward, with s = silu(x), n = ||s||, r = max(n, eps), e = s / r, silu'(x) = sig(x) (1 + x (1 - sig(x)))::

    ds = (de - e <e, de>) / r    (n > eps; else de / eps),      dx = ds * silu'(x)   (dv: dx = dv * silu'(x))
    du[t, c] = sum_{i<W} w[c, W-1-i] * dx[t+i, c]       dw[c, W-1-i] = sum_t dx[t, c] * u[t-i, c]
                                                        (same document, as in the forward)

Forward and the activation backward: one program per tile of BT tokens x one head segment (q
heads, then k heads, then v heads), recomputing x from u with W loads per element (neighbouring
tiles' rows come from the cache). Only u (and w) are kept for the backward. The activation
backward writes dx once (the only intermediate, [B*T, C]); the conv backward reads it and writes
du into the in-projection's gradient (strided: its q, k, v columns) and per-program partial dw in
fp32, summed once. The other in-projection sections are returned as views of it, and their
gradients are copied into that same buffer: no concatenation of the sections' gradients.

With ``branches=2`` the forward also returns q, k, v a second time, as views of the first (HAM's
two memories read the same q, k, v): each copy receives its own gradient and the backward kernel
adds the two while it reads them, instead of autograd adding them in a pass of their own.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["qkv_activations_triton", "conv_qkv_activations_triton", "EPS"]

#: F.normalize's eps in gdn_activations
EPS = 1e-6
#: tokens per program (activations)
BT = 32
#: the activation kernels with the conv (W > 0): tokens per program, warps (None: by head dim)
CONV_ACT_BT, CONV_ACT_WARPS = 16, 4
#: the conv backward: tokens per sub-tile, sub-tiles per program, channels per program, warps
CONV_BT, CONV_SUB, CONV_BC, CONV_WARPS = 64, 1, 64, 2


@triton.jit
def _same_doc(DOC, rows, t, N, T, i, HAS_DOC: tl.constexpr):
    """[BT] bool: token rows - i (i may be negative: a later token) is in rows' row, and in its
    document when HAS_DOC (DOC: document id of every flattened token)."""
    ok = (t - i >= 0) & (t - i < T) & (rows < N)
    if HAS_DOC:
        d0 = tl.load(DOC + rows, mask=rows < N, other=0)
        ok = ok & (tl.load(DOC + rows - i, mask=ok, other=-1) == d0)
    return ok


@triton.jit
def _tile(X, Wt, DOC, N, T, H, sxb, sxt, sw, K: tl.constexpr, V: tl.constexpr, BD: tl.constexpr,
          BT: tl.constexpr, W: tl.constexpr, HAS_DOC: tl.constexpr):
    """This program's tile of the pre-activation x, in fp32: tokens [i_t*BT, +BT) of the
    flattened batch (row b = token // T, position t) x head segment j (q heads 0..H-1, k heads
    H..2H-1, v heads 2H..3H-1). X is x itself (W == 0) or the conv's input u with W taps.
    Returns (j, rows, d, col = the segment's first column, is_qk = normalised or not, mask, x)."""
    i_t, j = tl.program_id(0), tl.program_id(1)
    rows = (i_t * BT + tl.arange(0, BT)).to(tl.int64)
    d = tl.arange(0, BD)
    is_qk = j < 2 * H
    col = tl.where(is_qk, j * K, 2 * H * K + (j - 2 * H) * V)
    dm = d < tl.where(is_qk, K, V)
    m = (rows < N)[:, None] & dm[None, :]
    b, t = rows // T, rows % T
    if W == 0:
        x = tl.load(X + (b * sxb + t * sxt)[:, None] + col + d[None, :], mask=m, other=0.0).to(tl.float32)
    else:
        x = tl.zeros([BT, BD], dtype=tl.float32)
        for i in tl.static_range(W):
            ok = _same_doc(DOC, rows, t, N, T, i, HAS_DOC)
            u = tl.load(X + (b * sxb + (t - i) * sxt)[:, None] + col + d[None, :],
                        mask=m & ok[:, None], other=0.0).to(tl.float32)
            w = tl.load(Wt + (col + d) * sw + (W - 1 - i), mask=dm, other=0.0).to(tl.float32)
            x += u * w[None, :]
    return j, rows, d, col, is_qk, m, x


@triton.jit
def _qkv_act_fwd_kernel(X, Wt, DOC, Q, Kt, Vt, N, T, H, sxb, sxt, sw, eps,
                        K: tl.constexpr, V: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
                        W: tl.constexpr, HAS_DOC: tl.constexpr):
    j, rows, d, col, is_qk, m, x = _tile(X, Wt, DOC, N, T, H, sxb, sxt, sw, K, V, BD, BT, W, HAS_DOC)
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
def _qkv_act_bwd_kernel(X, Wt, DOC, DQ, DK, DV, DQ2, DK2, DV2, DX, N, T, H, C, sxb, sxt, sw, eps,
                        K: tl.constexpr, V: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
                        W: tl.constexpr, HAS_DOC: tl.constexpr, TWO: tl.constexpr):
    """dx [N, C] contiguous (the pre-activation's gradient)."""
    j, rows, d, col, is_qk, m, x = _tile(X, Wt, DOC, N, T, H, sxb, sxt, sw, K, V, BD, BT, W, HAS_DOC)
    sig = tl.sigmoid(x)
    s = x * sig
    dsilu = sig * (1.0 + x * (1.0 - sig))
    if is_qk:
        if j < H:
            de = _grad_tile(DQ, DQ2, rows[:, None] * (H * K) + j * K + d[None, :], m, TWO)
        else:
            de = _grad_tile(DK, DK2, rows[:, None] * (H * K) + (j - H) * K + d[None, :], m, TWO)
        n = tl.sqrt(tl.sum(s * s, 1))                                         # [BT]
        r = tl.maximum(n, eps)
        e = s / r[:, None]
        proj = tl.where(n > eps, tl.sum(e * de, 1), 0.0)                      # <e, de>, 0 if clamped
        ds = (de - e * proj[:, None]) / r[:, None]
    else:
        ds = _grad_tile(DV, DV2, rows[:, None] * (H * V) + (j - 2 * H) * V + d[None, :], m, TWO)
    tl.store(DX + rows[:, None] * C + col + d[None, :], (ds * dsilu).to(DX.dtype.element_ty), mask=m)


@triton.jit
def _conv_bwd_kernel(DX, U, Wt, DOC, DU, DWP, N, T, C, sub, sut, sdb, sdt, sw,
                     W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr, SUB: tl.constexpr,
                     BC: tl.constexpr, HAS_DOC: tl.constexpr):
    """du (written through DU's strides) and this program's partial dw [C, W] (fp32, DWP row
    program_id(0)) from dx [N, C] contiguous: tokens [pid*SUB*BT, +SUB*BT) x channels BC. Each
    tap reads dx shifted by i once, for du[t] (+= w * dx[t+i]) and dw (+= dx[t+i] * u[t])."""
    i_t, i_c = tl.program_id(0), tl.program_id(1)
    c = i_c * BC + tl.arange(0, BC)
    cm = c < C
    tap = tl.arange(0, WP)
    dw = tl.zeros([BC, WP], dtype=tl.float32)
    for sb in range(SUB):
        rows = ((i_t * SUB + sb) * BT + tl.arange(0, BT)).to(tl.int64)
        b, t = rows // T, rows % T
        m = (rows < N)[:, None] & cm[None, :]
        u = tl.load(U + (b * sub + t * sut)[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
        du = tl.zeros([BT, BC], dtype=tl.float32)
        for i in tl.static_range(W):  # the pairs (token t, token t+i) of one document
            w = tl.load(Wt + c * sw + (W - 1 - i), mask=cm, other=0.0).to(tl.float32)
            later = _same_doc(DOC, rows, t, N, T, -i, HAS_DOC)
            dx = tl.load(DX + (rows + i)[:, None] * C + c[None, :], mask=m & later[:, None],
                         other=0.0).to(tl.float32)                           # dx[t+i]
            du += dx * w[None, :]
            dw += tl.where(tap[None, :] == W - 1 - i, tl.sum(dx * u, 0)[:, None], 0.0)
        tl.store(DU + (b * sdb + t * sdt)[:, None] + c[None, :], du.to(DU.dtype.element_ty), mask=m)
    tl.store(DWP + i_t * C * W + c[:, None] * W + tap[None, :], dw, mask=cm[:, None] & (tap < W)[None, :])


def _launch(kernel, N, H, K, V, *args, bt=BT, warps=None, **meta):
    BD = max(16, triton.next_power_of_2(max(K, V)))
    kernel[(triton.cdiv(N, bt), 3 * H)](*args, K=K, V=V, BD=BD, BT=bt,
                                       num_warps=warps or (4 if BD <= 128 else 8), **meta)


def _outputs(x, H, K, V):
    B, T = x.shape[:2]
    q = torch.empty(B, T, H, K, device=x.device, dtype=x.dtype)
    return q, torch.empty_like(q), torch.empty(B, T, H, V, device=x.device, dtype=x.dtype)


def _branch_grads(grads, like, H, K, V):
    """dq, dk, dv (, dq2, dk2, dv2) contiguous, zeros for an output without a gradient; TWO."""
    B, T = like.shape[:2]
    full = [torch.zeros(B, T, H, D, device=like.device, dtype=like.dtype) if g is None else g.contiguous()
            for g, D in zip(grads, (K, K, V) * 2)]
    two = len(full) == 6
    return full[:3] + (full[3:] if two else full[:3]), two


class _QKVActivation(torch.autograd.Function):
    """qkv_activations: x [B, T, C] contiguous (the pre-activation)."""

    @staticmethod
    def forward(ctx, x, H, K, V, branches):
        B, T, C = x.shape
        q, k, v = _outputs(x, H, K, V)
        if B * T:
            _launch(_qkv_act_fwd_kernel, B * T, H, K, V, x, x, x, q, k, v, B * T, T, H, T * C, C, 0, EPS,
                    W=0, HAS_DOC=False)
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
        g, two = _branch_grads(grads, x, H, K, V)
        dx = torch.empty_like(x)
        if B * T:
            _launch(_qkv_act_bwd_kernel, B * T, H, K, V, x, x, x, *g, dx, B * T, T, H, C, T * C, C, 0, EPS,
                    W=0, HAS_DOC=False, TWO=two)
        return dx, None, None, None, None


class _ConvQKVActivation(torch.autograd.Function):
    """conv_qkv_activations: u [B, T, C + sum(sections)] (any strides, unit channel stride),
    weight [C, W], doc [B, T] int or None."""

    @staticmethod
    def forward(ctx, u, weight, doc, H, K, V, branches, sections):
        B, T = u.shape[:2]
        C, W = weight.shape
        q, k, v = _outputs(u, H, K, V)
        if B * T:
            _launch(_qkv_act_fwd_kernel, B * T, H, K, V, u, weight, u if doc is None else doc, q, k, v,
                    B * T, T, H, u.stride(0), u.stride(1), weight.stride(0), EPS, W=W, HAS_DOC=doc is not None,
                    bt=CONV_ACT_BT, warps=CONV_ACT_WARPS)
        ctx.save_for_backward(u, weight, doc)
        ctx.dims = (H, K, V, C, tuple(sections))
        offs = [C + sum(sections[:i]) for i in range(len(sections))]
        rest = tuple(u.narrow(-1, o, w) for o, w in zip(offs, sections))
        qkv = (q, k, v, q.view_as(q), k.view_as(k), v.view_as(v)) if branches == 2 else (q, k, v)
        return qkv + rest

    @staticmethod
    def backward(ctx, *grads):
        u, weight, doc = ctx.saved_tensors
        H, K, V, C, sections = ctx.dims
        B, T = u.shape[:2]
        W = weight.shape[1]
        n_qkv = len(grads) - len(sections)
        g, two = _branch_grads(grads[:n_qkv], u, H, K, V)
        du = torch.empty_like(u)  # u's strides: the in-projection's gradient, one buffer
        n_prog = triton.cdiv(B * T, CONV_BT * CONV_SUB)
        dw_part = torch.empty(n_prog, C, W, device=u.device, dtype=torch.float32)
        docs = u if doc is None else doc
        if B * T:
            dx = torch.empty(B * T, C, device=u.device, dtype=u.dtype)
            _launch(_qkv_act_bwd_kernel, B * T, H, K, V, u, weight, docs, *g, dx, B * T, T, H, C,
                    u.stride(0), u.stride(1), weight.stride(0), EPS, W=W, HAS_DOC=doc is not None, TWO=two,
                    bt=CONV_ACT_BT, warps=CONV_ACT_WARPS)
            _conv_bwd_kernel[(n_prog, triton.cdiv(C, CONV_BC))](
                dx, u, weight, docs, du, dw_part, B * T, T, C, u.stride(0), u.stride(1), du.stride(0),
                du.stride(1), weight.stride(0), W=W, WP=triton.next_power_of_2(W), BT=CONV_BT, SUB=CONV_SUB,
                BC=CONV_BC, HAS_DOC=doc is not None, num_warps=CONV_WARPS)
        off = C
        for width, gr in zip(sections, grads[n_qkv:]):
            part = du.narrow(-1, off, width)
            part.zero_() if gr is None else part.copy_(gr)
            off += width
        dw = dw_part.sum(0).to(weight.dtype)
        return du, dw, None, None, None, None, None, None


def qkv_activations_triton(x: torch.Tensor, H: int, K: int, V: int, branches: int = 1
                           ) -> Tuple[torch.Tensor, ...]:
    """x ``[B,T,H*(2K+V)]`` (the conv's pre-activation; made contiguous) -> q, k ``[B,T,H,K]``
    (SiLU then L2-normalised per head), v ``[B,T,H,V]`` (SiLU), contiguous, x's dtype;
    differentiable in x; ``branches=2``: then q, k, v again (views; their gradients are added in
    the backward kernel). Arguments are assumed validated by the op."""
    return _QKVActivation.apply(x.contiguous(), int(H), int(K), int(V), int(branches))


def conv_qkv_activations_triton(u: torch.Tensor, weight: torch.Tensor, H: int, K: int, V: int,
                                doc: Optional[torch.Tensor] = None, branches: int = 1,
                                sections: Sequence[int] = ()) -> Tuple[torch.Tensor, ...]:
    """u ``[B,T,H*(2K+V) + sum(sections)]`` (the in-projection's output, any strides with unit
    channel stride; q, k, v's conv inputs first), weight ``[C,W]`` (tap W-1 the current token),
    doc int ``[B,T]`` document ids or None -> q, k, v as :func:`qkv_activations_triton` of the
    conv's pre-activation (``branches`` as there), then u's other sections as views of u.
    Differentiable in u and weight. Arguments are assumed validated by the op."""
    if u.stride(-1) != 1:
        u = u.contiguous()
    doc = None if doc is None else doc.contiguous()
    return _ConvQKVActivation.apply(u, weight, doc, int(H), int(K), int(V), int(branches),
                                    tuple(int(w) for w in sections))
