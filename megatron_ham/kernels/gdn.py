"""GPU gated delta rule with the per-token routing error, on fla 0.6.0's chunked kernels.

What runs (layout ``[B, T, H, D]``, heads never mixed, so H may be split over tensor parallelism):

* forward: fla's own stage functions, called one by one so that two intermediates that fla
  computes and then drops stay reachable:
    1. ``chunk_local_cumsum``            g -> chunk-local cumulative log2-decay ``G``
    2. ``chunk_gated_delta_rule_fwd_intra``  WY form ``w, u`` (and ``A`` kept for backward)
    3. ``chunk_gated_delta_rule_fwd_h``  chunk-start states ``h [B, NT, H, K, V]`` and
                                         ``v_new_t = beta_t * e_t`` (fla's "new value")
    4. ``chunk_fwd_o``                   the output ``o``
  then, if the error is asked for, our own Triton kernel :func:`_error_kernel` (one program per
  chunk and head) forms the decayed-state prediction directly,

      p_t = alpha_t S_{t-1}^T k_t = exp(G_t) h_c^T k_t + sum_{j<t in chunk} exp(G_t - G_j) (k_t.k_j) v_new_j

  and e_t = v_t - p_t, reducing it in-register to ``||e_t||_2`` or ``1 - cos(p_t, v_t)``. No
  division by beta (so beta ~ 0 is harmless), no sequential pass, no ``[B,T,H,V]`` intermediate.
* backward: fla's backward stages, called one by one as ``chunk_gated_delta_rule_bwd`` calls
  them, on the forward's own ``w``, ``h`` and ``v_new`` (kept for backward: fla recomputes them,
  two more kernels per layer, ~8 ms per 16k sequence at 800M on an H200, for ~190 MiB per layer
  and 16k sequence kept; with ``train.recompute`` a recomputed layer keeps them only during its
  own backward). So exactly fla's gradients for q, k, v, g, beta and the initial state:
    5. ``chunk_bwd_dv_local``              the intra-chunk part of dv
    6. ``chunk_gated_delta_rule_bwd_dhu``  the state gradients ``dh`` (reverse over chunks), dv
    7. ``chunk_bwd_dqkwg``                 dq, dk, dw, dg
    8. ``prepare_wy_repr_bwd``             through the WY form: dk, dv, dbeta, dg
    9. ``chunk_local_cumsum`` (reverse)    dg from the chunk-local cumulative sums

The routing error is returned DETACHED (no gradient): in the HAM mixer it feeds only a hard
routing decision. The CPU reference (``megatron_ham.ops.gated_delta_rule``, impl "naive"/"chunk")
does give it a gradient; the parity tests compare its values only.

Packed documents: ``cu_seqlens`` (int ``[N+1]``, B == 1) go straight to fla's varlen kernels and
to the error kernel (which walks fla's ``chunk_indices``, built once per boundaries tensor: on
the host from ``cu_seqlens_cpu`` when given, see ``kernels.chunk_indices``).

fla's version is checked at import: only 0.6.0 is validated (its stage functions' signatures and
the meaning of ``v_new`` are internals); any other version raises ImportError naming it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

import fla  # noqa: E402

VALIDATED_FLA_VERSIONS = ("0.6.0",)
if getattr(fla, "__version__", None) not in VALIDATED_FLA_VERSIONS:
    raise ImportError(
        f"megatron_ham.kernels.gdn is validated against fla-core {VALIDATED_FLA_VERSIONS}, found "
        f"fla {getattr(fla, '__version__', 'unknown')}: pin fla-core==0.6.0 or use impl='chunk'"
    )

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from fla.ops.common.chunk_delta_h import (  # noqa: E402
    chunk_gated_delta_rule_bwd_dhu,
    chunk_gated_delta_rule_fwd_h,
)
from fla.ops.common.chunk_o import chunk_bwd_dqkwg, chunk_bwd_dv_local, chunk_fwd_o  # noqa: E402
from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra  # noqa: E402
from fla.ops.gated_delta_rule.wy_fast import prepare_wy_repr_bwd  # noqa: E402
from fla.ops.utils import chunk_local_cumsum  # noqa: E402
from fla.ops.utils.constant import RCP_LN2  # noqa: E402

from .chunk_indices import chunk_indices as varlen_chunk_indices  # noqa: E402

__all__ = ["gdn_with_error", "routing_error_from_chunks", "CHUNK", "VALIDATED_FLA_VERSIONS"]

#: fla's chunk length for the gated delta rule (the kernels here assume 64).
CHUNK = 64
_METRIC_ID = {"l2": 0, "cosine": 1}


# ----------------------------------------------------------------------------------------------
# Error kernel (ours): one program per (chunk, batch*head)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _error_kernel(
    k, v, v_new, g, h, err, cu_seqlens, chunk_indices,
    T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    METRIC: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    if IS_VARLEN:
        i_tg = i_t                                       # global chunk index = index into h
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        T = eos - bos
    else:
        NT = tl.cdiv(T, BT)
        i_tg = i_b * NT + i_t
        bos = i_b * T

    o_t = i_t * BT + tl.arange(0, BT)                    # positions inside this sequence
    m_t = o_t < T
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = tl.arange(0, BV)
    m_v = o_v < V
    row = (bos + o_t) * H + i_h                          # flat [token, head] index

    b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
    b_g = tl.load(g + row, mask=m_t, other=0.0).to(tl.float32)
    b_h = tl.load(h + (i_tg * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.0)
    b_vn = tl.load(v_new + row[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_v = tl.load(v + row[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                  other=0.0).to(tl.float32)

    # inter-chunk part: exp(G_t) * k_t^T h_c
    b_p = tl.dot(b_k, b_h.to(b_k.dtype)) * tl.exp2(b_g)[:, None]
    # intra-chunk part, STRICTLY lower: sum_{j<t} exp(G_t - G_j) (k_t . k_j) v_new_j
    b_A = tl.dot(b_k, tl.trans(b_k))
    m_A = (o_t[:, None] > o_t[None, :]) & m_t[:, None] & m_t[None, :]
    b_A = tl.where(m_A, b_A * tl.exp2(b_g[:, None] - b_g[None, :]), 0.0)
    b_p += tl.dot(b_A.to(b_vn.dtype), b_vn)

    if METRIC == 0:
        b_e = b_v - b_p
        b_err = tl.sqrt(tl.sum(b_e * b_e, axis=1))
    else:
        dot = tl.sum(b_p * b_v, axis=1)
        den2 = tl.sum(b_p * b_p, axis=1) * tl.sum(b_v * b_v, axis=1)
        ok = den2 > 0
        cos = tl.where(ok, dot / tl.sqrt(tl.where(ok, den2, 1.0)), 0.0)
        b_err = 1.0 - cos
    tl.store(err + row, b_err, mask=m_t)


def routing_error_from_chunks(
    k: torch.Tensor,
    v: torch.Tensor,
    v_new: torch.Tensor,
    g_cum: torch.Tensor,
    h: torch.Tensor,
    *,
    metric: str = "l2",
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_indices: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-token routing error from fla's chunk intermediates (no gradient).

    k ``[B,T,H,K]``, v and v_new ``[B,T,H,V]`` (v_new = beta * e as fla's fwd_h writes it),
    g_cum ``[B,T,H]`` chunk-local cumulative log2-decay (fla's ``chunk_local_cumsum(g,
    scale=RCP_LN2)``), h ``[B,NT,H,K,V]`` chunk-start states (``[1,NT_total,H,K,V]`` in fla's
    chunk order under cu_seqlens). Returns err ``[B,T,H]`` float32.
    """
    if metric not in _METRIC_ID:
        raise ValueError(f"metric must be one of {list(_METRIC_ID)}, got {metric!r}")
    B, T, H, K = k.shape
    V = v.shape[-1]
    if K > 256 or V > 256:
        raise ValueError(f"routing error kernel supports head dims <= 256, got K={K}, V={V}")
    err = torch.empty(B, T, H, device=k.device, dtype=torch.float32)
    if cu_seqlens is not None:
        if chunk_indices is None:
            chunk_indices = varlen_chunk_indices(cu_seqlens, CHUNK)
        NT = chunk_indices.shape[0]
    else:
        NT = triton.cdiv(T, CHUNK)
    if NT == 0 or B * H == 0:
        return err
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, triton.next_power_of_2(V))
    _error_kernel[(NT, B * H)](
        k, v, v_new, g_cum, h, err, cu_seqlens, chunk_indices,
        T, H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV,
        METRIC=_METRIC_ID[metric], IS_VARLEN=cu_seqlens is not None,
        num_warps=4 if max(BK, BV) <= 128 else 8, num_stages=1,
    )
    return err


# ----------------------------------------------------------------------------------------------
# autograd.Function: fla's forward stages (keeping w, h, v_new) and backward stages
# ----------------------------------------------------------------------------------------------
class _GDNWithError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                chunk_indices, return_error, metric):
        ctx.set_materialize_grads(False)  # unused final state -> dht None (fla skips it)
        g_cum = chunk_local_cumsum(g, chunk_size=CHUNK, scale=RCP_LN2, cu_seqlens=cu_seqlens,
                                   chunk_indices=chunk_indices)
        w, u, A = chunk_gated_delta_rule_fwd_intra(
            k=k, v=v, g=g_cum, beta=beta, cu_seqlens=cu_seqlens, chunk_size=CHUNK,
            chunk_indices=chunk_indices)
        h, v_new, final_state = chunk_gated_delta_rule_fwd_h(
            k=k, w=w, u=u, g=g_cum, initial_state=initial_state,
            output_final_state=output_final_state, chunk_size=CHUNK, cu_seqlens=cu_seqlens,
            chunk_indices=chunk_indices)
        o = chunk_fwd_o(q=q, k=k, v=v_new, h=h, g=g_cum, scale=scale, cu_seqlens=cu_seqlens,
                        chunk_size=CHUNK, chunk_indices=chunk_indices)
        err = None
        if return_error:
            err = routing_error_from_chunks(k, v, v_new, g_cum, h, metric=metric,
                                            cu_seqlens=cu_seqlens, chunk_indices=chunk_indices)
        del u
        ctx.save_for_backward(q, k, v, g_cum, beta, A, initial_state, cu_seqlens, chunk_indices,
                              w, h, v_new)
        ctx.scale = scale
        if err is not None:
            ctx.mark_non_differentiable(err)
        if final_state is None:
            return o.to(q.dtype), err
        return o.to(q.dtype), final_state, err

    @staticmethod
    def backward(ctx, do, *rest):
        # rest = (dht, derr) or (derr,); derr is ignored (err is non-differentiable)
        dht = rest[0] if len(rest) == 2 else None
        q, k, v, g_cum, beta, A, h0, cu, chunks, w, h, v_new = ctx.saved_tensors
        if do is None:
            do = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=v.dtype, device=v.device)
        do = do.contiguous()
        dht = None if dht is None else dht.contiguous()
        docs = dict(cu_seqlens=cu, chunk_indices=chunks)
        with torch.cuda.device(q.device):
            dv = chunk_bwd_dv_local(q=q, k=k, g=g_cum, do=do, scale=ctx.scale, chunk_size=CHUNK, **docs)
            dh, dh0, dv = chunk_gated_delta_rule_bwd_dhu(
                q=q, k=k, w=w, g=g_cum, h0=h0, dht=dht, do=do, dv=dv, scale=ctx.scale,
                chunk_size=CHUNK, **docs)
            dq, dk, dw, dg = chunk_bwd_dqkwg(
                q=q, k=k, v=v_new, w=w, g=g_cum, h=h, dv=dv, do=do, dh=dh, scale=ctx.scale,
                chunk_size=CHUNK, **docs)
            dk_wy, dv, db, dg_wy = prepare_wy_repr_bwd(k=k, v=v, beta=beta, g=g_cum, A=A, dw=dw,
                                                       du=dv, **docs)
            dk.add_(dk_wy)
            dg.add_(dg_wy)
            dg = chunk_local_cumsum(dg, chunk_size=CHUNK, reverse=True, **docs)
        return (dq.to(q), dk.to(k), dv.to(v), dg, db.to(beta), None, dh0, None, None, None, None, None)


def gdn_with_error(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    return_error: bool = False,
    error_metric: str = "l2",
    cu_seqlens: Optional[torch.Tensor] = None,
    cu_seqlens_cpu: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """fla-backed gated delta rule on CUDA tensors; same contract as ``ops.gated_delta_rule``.

    q, k ``[B,T,H,K]`` (caller L2-normalises), v ``[B,T,H,V]``, g (log decay <= 0) and beta
    ``[B,T,H]``; initial_state ``[B|N,H,K,V]``; cu_seqlens int ``[N+1]`` with B == 1.
    Returns ``(o [B,T,H,V] in v.dtype, final_state [B|N,H,K,V] fp32 or None,
    err [B,T,H] fp32 DETACHED or None)``. Arguments are assumed validated by the op.
    """
    if not q.is_cuda:
        raise ValueError(f"gdn_with_error needs CUDA tensors, got q on {q.device}")
    if error_metric not in _METRIC_ID:
        raise ValueError(f"error_metric must be one of {list(_METRIC_ID)}, got {error_metric!r}")
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)
    dt = v.dtype if v.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
    q, k, v = (x.to(dt).contiguous() for x in (q, k, v))
    g = g.float().contiguous()
    beta = beta.to(dt).contiguous()
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    chunks = None
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.long).contiguous()
        chunks = varlen_chunk_indices(cu_seqlens, CHUNK, cu_seqlens_cpu)
    with torch.cuda.device(q.device):
        out = _GDNWithError.apply(q, k, v, g, beta, scale, initial_state, bool(output_final_state),
                                  cu_seqlens, chunks, bool(return_error), error_metric)
    if output_final_state:
        o, final_state, err = out
    else:
        (o, err), final_state = out, None
    return o, final_state, err
