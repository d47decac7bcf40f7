"""Scratchpad attention: causal softmax attention of every query over the ROUTED keys only.

    o_t = sum_{j <= t, routed[b, j], doc(j) == doc(t)} softmax_j(scale * q_t . k_j) v_j

A query that sees no routed key (nothing routed yet in its document) gets exactly 0.
A query sees its own token only if that token is routed; there is no sink token.

Layout (fla's): q, k `[B,T,H,K]`, v `[B,T,H,V]`, routed `[B,T]` bool (one decision per token,
shared by all heads), output `[B,T,H,V]` in v's dtype. Under tensor parallelism H holds this
rank's heads only; `routed` must be identical on all TP ranks (see routing.min_over_heads).
Documents: `cu_seqlens` (int `[N+1]`, requires B == 1) packs N documents along T; or `doc_ids`
(int `[B,T]`, non-decreasing along T) numbers the documents of each row.

Cached decoding is the same op: `past = (k_p [B,N,H,K], v_p [B,N,H,V], valid [B,N])` holds the
routed keys / values that precede position 0 (a cache, compacted in position order; `valid`
marks the real entries). They belong to document 0 of their row, so every query of document 0
sees them, before the block's own keys. A decode step is a block of T = 1 query over them.

Implementations (`impl=`):
  "reference" explicit boolean mask `[B,1,T,T]` (causal & routed & same document): the definition,
              O(T^2) memory.
  "compact"   gathers the routed keys/values in position order (padded per batch row to the max
              routed count), masks "pos[j] <= t" (a staircase) plus same document, and walks the
              queries in blocks, each block only over the compacted keys it can see. Memory is
              O(T x n_routed), cost follows the routed fraction. Differentiable (gather).
  "triton"    GPU: our Triton staircase kernel (megatron_ham.kernels.staircase): the routed keys
              in position order, only the tiles under the staircase, fwd + bwd; no
              `doc_ids` / `past`.
  "flex"      GPU: compaction + FlexAttention with a staircase BlockMask (megatron_ham.kernels),
              the fallback and a second reference on the GPU; no `doc_ids` / `past`.
  "auto"      see `_select_impl`: "triton" for CUDA tensors it supports, else "flex", else
              "compact" (every CPU tensor, and every call with `doc_ids` / `past`).
Softmax is computed in fp32 in both (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._checks import check_tensor
from ._kernels import kernel_import_error, load_kernels

_IMPLS = ("auto", "reference", "compact", "flex", "triton")
_DEFAULT_BLOCK = 256  # query block of the compact path


def _triton_ok(q: torch.Tensor, v: torch.Tensor) -> bool:
    """The staircase kernel's domain: CUDA, bf16/fp16, head dims in [16, 256]."""
    kernels = load_kernels()
    if not q.is_cuda or kernels is None or not kernels.staircase_available():
        return False
    st = load_kernels("staircase")
    return (q.dtype in st.SUPPORTED_DTYPES  # k, v are cast to q's dtype
            and 16 <= min(q.shape[-1], v.shape[-1]) and max(q.shape[-1], v.shape[-1]) <= st.MAX_HEAD_DIM)


def _select_impl(impl: str, q: torch.Tensor, v: torch.Tensor, general: bool = False) -> str:
    """Resolve impl="auto". The one dispatch point.

    ``"auto"``: for calls without `doc_ids` / `past` (`general`): ``"triton"``
    (megatron_ham.kernels.staircase, our staircase kernel) for CUDA tensors of bf16/fp16 with
    head dims in [16, 256]; else ``"flex"`` (megatron_ham.kernels.scratchpad: compaction +
    staircase BlockMask + compiled FlexAttention) for CUDA tensors with head dims >= 16 when it
    imports; else ``"compact"`` (the CPU path, and every `general` call). ``"triton"`` /
    ``"flex"`` asked for explicitly raise ValueError when they cannot run.
    """
    if impl == "triton":
        if not _triton_ok(q, v):
            raise ValueError(f"impl='triton' needs CUDA tensors, q in bf16/fp16, head dims in "
                             f"[16, 256] (q {q.dtype} on {q.device}, K={q.shape[-1]}, "
                             f"V={v.shape[-1]}; import: {kernel_import_error('staircase')})")
        return impl
    if impl == "flex":
        kernels = load_kernels()
        if not q.is_cuda or kernels is None or not kernels.flex_available() or general:
            raise ValueError(f"impl='flex' needs CUDA tensors, FlexAttention and no doc_ids / past "
                             f"(q on {q.device}; import: {kernel_import_error('scratchpad')})")
        return impl
    if impl != "auto":
        return impl
    if q.is_cuda and not general and min(q.shape[-1], v.shape[-1]) >= 16:
        if _triton_ok(q, v):
            return "triton"
        kernels = load_kernels()
        if kernels is not None and kernels.flex_available():
            return "flex"
    return "compact"


def _validate(q, k, v, routed, scale, cu_seqlens, impl, doc_ids=None, past=None):
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    check_tensor("q", q, [None, None, None, None], "[B,T,H,K]")
    B, T, H, K = q.shape
    check_tensor("k", k, [B, T, H, K], "[B,T,H,K] (same as q)")
    check_tensor("v", v, [B, T, H, None], "[B,T,H,V]")
    if not isinstance(routed, torch.Tensor):
        raise ValueError(f"routed must be a bool torch.Tensor of shape [B,T] = [{B},{T}], "
                         f"got {type(routed).__name__}")
    if routed.dtype != torch.bool:
        raise ValueError(f"routed must be a bool tensor of shape [B,T] = [{B},{T}], got dtype {routed.dtype}")
    check_tensor("routed", routed, [B, T], "[B,T]", floating=False)
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float or None, got {type(scale).__name__}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
                or cu_seqlens.is_floating_point() or cu_seqlens.dtype == torch.bool:
            raise ValueError("cu_seqlens must be a 1-D integer tensor of shape [N+1] "
                             f"(N documents), got {cu_seqlens!r}")
        if B != 1:
            raise ValueError(f"cu_seqlens requires batch size B == 1 (q of shape [1,T,H,K]), got B={B}")
        if not cu_seqlens.is_cuda:  # value check needs the host; skipped for CUDA (no sync)
            c = cu_seqlens.tolist()
            if c[0] != 0 or c[-1] != T or any(b < a for a, b in zip(c[:-1], c[1:])):
                raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T={T}, got {c}")
    if doc_ids is not None:
        if cu_seqlens is not None:
            raise ValueError("pass cu_seqlens or doc_ids, not both")
        check_tensor("doc_ids", doc_ids, [B, T], "[B,T]", floating=False)
    if past is not None:
        if not isinstance(past, (tuple, list)) or len(past) != 3:
            raise ValueError("past must be a tuple (k_p [B,N,H,K], v_p [B,N,H,V], valid [B,N] bool)")
        k_p, v_p, valid = past
        check_tensor("past k_p", k_p, [B, None, H, K], "[B,N,H,K]")
        N = k_p.shape[1]
        check_tensor("past v_p", v_p, [B, N, H, v.shape[-1]], "[B,N,H,V]")
        check_tensor("past valid", valid, [B, N], "[B,N]", floating=False)
        if valid.dtype != torch.bool:
            raise ValueError(f"past valid must be a bool tensor, got dtype {valid.dtype}")


def _doc_ids(cu_seqlens: Optional[torch.Tensor], B: int, T: int, device) -> Optional[torch.Tensor]:
    """Document id of every position `[B,T]` (None without cu_seqlens)."""
    if cu_seqlens is None:
        return None
    pos = torch.arange(T, device=device)
    doc = torch.searchsorted(cu_seqlens.to(device=device, dtype=torch.long)[1:], pos, right=True)
    return doc.view(1, T).expand(B, T)


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """fp32, or float64 for float64 inputs (gradcheck)."""
    return torch.promote_types(q.dtype, torch.float32)


def _masked_softmax_values(s: torch.Tensor, mask: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """softmax of s `[B,H,Tq,N]` (fp32) over the keys allowed by mask, times vals `[B,N,H,V]`.

    Rows without any allowed key give 0; no NaN in forward or backward (the -inf row is replaced
    by zeros before the softmax and the probabilities are masked after it).
    """
    s = s.masked_fill(~mask, float("-inf"))
    s = s.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(~mask, 0.0)
    return torch.einsum("bhtn,bnhv->bthv", p, vals)


def _reference(q, k, v, routed, scale, doc, past=None):
    B, T = routed.shape
    ct = _compute_dtype(q)
    pos = torch.arange(T, device=q.device)
    key_pos, key_ok = pos[None, :].expand(B, T), routed
    keys, vals, key_doc = k.to(ct), v.to(ct), doc
    if past is not None:  # the cache: before position 0, document 0
        k_p, v_p, valid = past
        N = k_p.shape[1]
        key_pos = torch.cat([key_pos.new_full((B, N), -1), key_pos], 1)
        key_ok = torch.cat([valid, routed], 1)
        keys, vals = torch.cat([k_p.to(ct), keys], 1), torch.cat([v_p.to(ct), vals], 1)
        if doc is not None:
            key_doc = torch.cat([doc.new_zeros(B, N), doc], 1)
    mask = (key_pos[:, None, :] <= pos[None, :, None]) & key_ok[:, None, :]  # [B,T,N+T]
    if doc is not None:
        mask = mask & (key_doc[:, None, :] == doc[:, :, None])
    s = torch.einsum("bthk,bshk->bhts", q.to(ct), keys) * scale
    return _masked_softmax_values(s, mask[:, None], vals)


def _compact(q, k, v, routed, scale, doc, block: int = _DEFAULT_BLOCK, past=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    device = q.device
    counts = routed.sum(1)  # [B]
    n = max(int(counts.max()) if B > 0 else 0, 1)  # >= 1 slot so the empty case runs the same path
    # Routed positions first, in position order (stable sort on "not routed").
    order = torch.argsort((~routed).to(torch.int8), dim=1, stable=True)[:, :n]  # [B,n]
    valid = torch.arange(n, device=device)[None, :] < counts[:, None]  # [B,n]
    pos_c = torch.where(valid, order, torch.full_like(order, T))  # padding never visible (pos T > t)
    ct = _compute_dtype(q)
    kc = k.gather(1, order[:, :, None, None].expand(B, n, H, K)).to(ct)
    vc = v.gather(1, order[:, :, None, None].expand(B, n, H, V)).to(ct)
    doc_c = doc.gather(1, order) if doc is not None else None
    qf = q.to(ct)
    N = 0
    if past is not None:  # the cache goes first: position -1, document 0
        k_p, v_p, valid_p = past
        N = k_p.shape[1]
        kc, vc = torch.cat([k_p.to(ct), kc], 1), torch.cat([v_p.to(ct), vc], 1)
        valid = torch.cat([valid_p, valid], 1)
        pos_c = torch.cat([pos_c.new_full((B, N), -1), pos_c], 1)
        if doc_c is not None:
            doc_c = torch.cat([doc_c.new_zeros(B, N), doc_c], 1)

    # Key window of each query block: keys with pos < t1 are the cache and the first cum[t1-1]
    # compacted ones (max over the batch rows); with documents, keys before the block's first
    # document start are never visible, so the window starts at the routed count before that
    # start (0, the cache included, when that document is document 0).
    cum = torch.cumsum(routed.long(), dim=1)  # [B,T] routed count in [0, t]
    starts = list(range(0, T, block))
    ends = [min(s + block, T) for s in starts]
    hi = (N + cum[:, [e - 1 for e in ends]].amax(0)).tolist() if T > 0 else []
    if doc is not None:
        d0 = doc[:, starts]  # [B, blocks]
        # first position of the document of each block's first query
        doc_start = torch.searchsorted(doc.contiguous(), d0.contiguous(), right=False)
        cum0 = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=device), cum], dim=1)  # [B,T+1]
        lo_rows = torch.where(d0 == 0, torch.zeros_like(d0), N + cum0.gather(1, doc_start))
        lo = lo_rows.amin(0).tolist()
    else:
        lo = [0] * len(starts)

    outs = []
    for t0, t1, a, b in zip(starts, ends, lo, hi):
        if b <= a:  # no visible key in this block: exact zeros
            outs.append(qf.new_zeros(B, t1 - t0, H, V))
            continue
        t = torch.arange(t0, t1, device=device)
        mask = (pos_c[:, None, a:b] <= t[None, :, None]) & valid[:, None, a:b]  # [B,tq,w]
        if doc is not None:
            mask = mask & (doc_c[:, None, a:b] == doc[:, t0:t1, None])
        s = torch.einsum("bthk,bnhk->bhtn", qf[:, t0:t1], kc[:, a:b]) * scale
        outs.append(_masked_softmax_values(s, mask[:, None], vc[:, a:b]))
    o = torch.cat(outs, dim=1) if outs else qf.new_zeros(B, T, H, V)
    if not o.requires_grad and (qf.requires_grad or kc.requires_grad or vc.requires_grad):
        # nothing visible anywhere: keep the output on the graph so backward gives zero grads
        o = o + 0.0 * (qf.sum() + kc.sum() + vc.sum())
    return o


def scratchpad_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routed: torch.Tensor,
    *,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    doc_ids: Optional[torch.Tensor] = None,
    past: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Causal softmax attention over routed keys only.

    Args:
        q, k: `[B,T,H,K]`; v: `[B,T,H,V]` (H = this tensor-parallel rank's heads).
        routed: bool `[B,T]`, the tokens stored in the scratchpad (same for all heads).
        scale: softmax scale, default K**-0.5.
        cu_seqlens: int `[N+1]` document boundaries of a packed batch (B must be 1).
        doc_ids: int `[B,T]` document index of each token in its row (instead of cu_seqlens).
        past: (k_p `[B,N,H,K]`, v_p `[B,N,H,V]`, valid bool `[B,N]`): cached routed keys before
            position 0, in document 0 (decoding; see the module docstring).
        impl: "auto" | "reference" | "compact" | "flex" | "triton".
    Returns:
        o `[B,T,H,V]` in v's dtype; 0 for queries that see no routed key.
    """
    _validate(q, k, v, routed, scale, cu_seqlens, impl, doc_ids, past)
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else float(scale)
    doc = _doc_ids(cu_seqlens, B, T, q.device) if doc_ids is None else doc_ids.to(q.device, torch.long)
    impl = _select_impl(impl, q, v, general=doc_ids is not None or past is not None)
    if impl == "triton":  # GPU path (megatron_ham.kernels.staircase)
        tri = load_kernels("staircase").scratchpad_attention_triton
        o = tri(q, k.to(q.dtype), v.to(q.dtype), routed, scale=scale, cu_seqlens=cu_seqlens)
    elif impl == "flex":  # GPU path (megatron_ham.kernels.scratchpad)
        flex = load_kernels("scratchpad").scratchpad_attention_flex
        o = flex(q, k.to(q.dtype), v.to(q.dtype), routed, scale=scale, cu_seqlens=cu_seqlens)
    elif impl == "reference":
        o = _reference(q, k, v, routed, scale, doc, past)
    else:
        o = _compact(q, k, v, routed, scale, doc, past=past)
    return o.to(v.dtype)
