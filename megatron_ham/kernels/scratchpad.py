"""GPU scratchpad attention: compaction of the routed keys + FlexAttention on a staircase BlockMask.

Same contract as ``megatron_ham.ops.scratchpad_attention`` (layout ``[B,T,H,D]``, ``routed``
bool ``[B,T]`` shared by all heads, H = this tensor-parallel rank's heads)::

    o_t = sum_{j <= t, routed[b,j], doc(j) == doc(t)} softmax_j(scale * q_t . k_j) v_j   (0 if none)

How:
1. Compaction, on the GPU without a host sync: the routed positions go first, in position order,
   into slots ``0 .. n_b-1`` of a length-T buffer (a cumsum and a searchsorted, no sort); the other
   slots hold the unrouted tokens with ``pos_c = T`` (never visible). ``kc, vc`` are gathers of
   ``k, v`` (their backward scatters the gradients back; unrouted tokens get 0).
   The compacted length is always T (static shapes: one compilation per (T, H, D, dtype,
   documents or not), never one per step); slots past the routed count cost nothing because the
   BlockMask never visits their blocks.
2. Staircase BlockMask, built directly from block lists (no ``create_block_mask``, no [T,T]
   mask evaluation, and no ``BlockMask.from_kv_blocks``, whose vmap-based transposition cost
   ~2 ms of host time per call on an H100): since compacted positions are sorted, the keys
   visible to a query block ``[t0, t1]`` are the slots ``[lo(t0), cum(t1))``, and slots
   ``[lo(t1), cum(t0))`` are visible to every query of the block (``cum(t)`` = routed count in
   ``[0, t]``; ``lo(t)`` = routed count before t's document start, 0 without documents). Blocks
   inside the second range are "full" (no mask_mod call), the rest of the first range
   "partial". The key-side lists that the backward uses (query blocks per key block) come from
   the transposes of the same [NB, NB] block matrices. Every list is made contiguous: the
   compiled backward reads them assuming a contiguous layout, and an argsort over a transposed
   matrix is not (that gave wrong dk/dv on an H200 with torch 2.11, forward and dq right).
3. ``mask_mod(b, h, q, kv) = pos_c[b, kv] <= q`` (``& doc_c[b, kv] == doc_q[b, q]`` under
   ``cu_seqlens``), and ``torch.compile``'d ``flex_attention``. The integer work of steps 1-2 is
   a separate compiled function, so its ~30 small ops fuse into a few kernels.

The cost therefore follows the routed fraction f (about f x a causal attention), and the
BlockMask construction (a few [B, T/128, T/128]-sized integer ops) is part of every call.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

__all__ = ["scratchpad_attention_flex", "staircase_plan", "BLOCK", "KERNEL_OPTIONS"]

#: Query and key block size of the BlockMask (FlexAttention's default sparse block).
BLOCK = 128
#: kernel_options passed to flex_attention (None = FlexAttention's defaults); tools/bench_kernels
#: may override this to try tile shapes.
KERNEL_OPTIONS: Optional[dict] = None

_compiled = {}


def _flex():
    if "flex" not in _compiled:
        _compiled["flex"] = torch.compile(flex_attention, dynamic=False)
    return _compiled["flex"]


def staircase_plan(routed: torch.Tensor, doc_q: Optional[torch.Tensor], dstart: Optional[torch.Tensor],
                   block: int = BLOCK):
    """Compaction order and staircase block lists, all on routed's device, no host sync.

    routed bool ``[B,T]``; doc_q int ``[B,T]`` document id of each position and dstart long
    ``[B,T]`` first position of that document (both None without documents).
    Returns ``(order [B,T] long, pos_c [B,T] int32, kv, full, q, full_q)`` where each of the
    last four is a contiguous ``(num [B,1,NB] int32, idx [B,1,NB,NB] int32)`` pair in
    BlockMask's layout (partial and full KV blocks per query block, then the transposes: partial
    and full query blocks per KV block), NB = ceil(T / block); ``order[b, s]`` is the position
    held by slot s, ``pos_c[b, s]`` that position for routed slots and T for the others.
    """
    B, T = routed.shape
    dev = routed.device
    r = routed.to(torch.int32)
    cum = torch.cumsum(r, dim=1)                                   # routed count in [0, t]
    cnt = cum[:, -1:]                                              # [B,1]
    pos = torch.arange(T, device=dev, dtype=torch.int32).expand(B, T).contiguous()
    # slot s < cnt holds the s-th routed position (first t with cum[t] >= s+1), slot s >= cnt the
    # (s-cnt)-th unrouted one (first t with ucum[t] >= s-cnt+1). searchsorted, not a scatter: a
    # scatter into a fresh buffer read by the same compiled graph is what we avoid here.
    ucum = pos + 1 - cum                                           # unrouted count in [0, t]
    first = torch.searchsorted(cum, pos + 1)
    rest = torch.searchsorted(ucum, pos - cnt + 1)
    order = torch.where(pos < cnt, first, rest).clamp_(max=T - 1)  # [B,T] long
    pos_c = torch.where(pos < cnt, order.to(torch.int32), torch.full_like(pos, T))

    nb = (T + block - 1) // block
    t0 = torch.arange(nb, device=dev, dtype=torch.long) * block
    t1 = torch.clamp(t0 + block, max=T) - 1
    c_first = cum[:, t0].long()                                    # slots visible to t0
    c_last = cum[:, t1].long()                                     # slots visible up to t1
    if doc_q is None:
        lo_first = torch.zeros_like(c_first)
        lo_last = lo_first
    else:
        cum0 = torch.nn.functional.pad(cum, (1, 0)).long()         # cum0[p] = routed count < p
        lo_first = cum0.gather(1, dstart[:, t0])
        lo_last = cum0.gather(1, dstart[:, t1])
    p0 = lo_first // block
    p1 = (c_last + block - 1) // block
    f0 = (lo_last + block - 1) // block
    f1 = c_first // block
    j = torch.arange(nb, device=dev, dtype=torch.long).view(1, 1, nb)
    full = (j >= f0[..., None]) & (j < f1[..., None])              # [B,nb,nb]
    part = (j >= p0[..., None]) & (j < p1[..., None]) & ~full
    return (order, pos_c, _ordered(part, j, nb), _ordered(full, j, nb),
            _ordered(part.transpose(1, 2), j, nb), _ordered(full.transpose(1, 2), j, nb))


def _ordered(dense: torch.Tensor, j: torch.Tensor, nb: int):
    """bool [B, rows, cols] -> (num [B,1,rows] int32, idx [B,1,rows,cols] int32), listed first,
    both contiguous whatever dense's strides."""
    dense = dense.contiguous()
    num = dense.sum(-1, dtype=torch.int32)[:, None].contiguous()
    idx = torch.argsort(torch.where(dense, j, j + nb), dim=-1).to(torch.int32)[:, None]
    return num, idx.contiguous()


def _doc_info(cu_seqlens: torch.Tensor, T: int, device):
    cs = cu_seqlens.to(device=device, dtype=torch.long)
    pos = torch.arange(T, device=device, dtype=torch.long)
    doc = torch.searchsorted(cs[1:], pos, right=True)              # [T]
    dstart = cs[doc]
    return doc.to(torch.int32)[None], dstart[None]


def _block_mask(T, kv, full, qb, fq, mask_mod) -> BlockMask:
    """BlockMask from both sides' block lists (nothing recomputed at run time)."""
    return BlockMask(seq_lengths=(T, T), kv_num_blocks=kv[0], kv_indices=kv[1],
                     full_kv_num_blocks=full[0], full_kv_indices=full[1], q_num_blocks=qb[0],
                     q_indices=qb[1], full_q_num_blocks=fq[0], full_q_indices=fq[1],
                     BLOCK_SIZE=(BLOCK, BLOCK), mask_mod=mask_mod)


def _compiled_plan():
    if "plan" not in _compiled:
        _compiled["plan"] = torch.compile(staircase_plan, dynamic=False)
    return _compiled["plan"]


def scratchpad_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routed: torch.Tensor,
    *,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    kernel_options: Optional[dict] = None,
    compiled: bool = True,
) -> torch.Tensor:
    """Scratchpad attention with FlexAttention. q, k ``[B,T,H,K]``, v ``[B,T,H,V]`` (same dtype),
    routed bool ``[B,T]``, cu_seqlens int ``[N+1]`` (B == 1). Returns ``[B,T,H,V]`` in q's dtype
    (a transposed view of FlexAttention's ``[B,H,T,V]`` output). Arguments are assumed validated
    by the op.

    ``compiled=True``: the compaction order and block lists are one ``torch.compile``'d integer
    function (:func:`staircase_plan`, static shapes; document ids are computed outside it, so the
    number of documents never causes a recompilation), and flex_attention is compiled.
    ``compiled=False`` runs both eagerly (FlexAttention's eager path; CPU tests only).
    """
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else float(scale)
    if T == 0:
        return q.new_zeros(B, 0, H, v.shape[-1]) + 0.0 * (q.sum() + k.sum() + v.sum())
    if cu_seqlens is not None:
        doc_q, dstart = _doc_info(cu_seqlens, T, q.device)
        doc_q, dstart = doc_q.expand(B, T).contiguous(), dstart.expand(B, T).contiguous()
    else:
        doc_q = dstart = None
    plan = _compiled_plan() if compiled else staircase_plan
    with torch.no_grad():
        order, pos_c, kv, full, qb, fq = plan(routed, doc_q, dstart)
    idx = order[:, :, None, None]
    kc = k.gather(1, idx.expand(B, T, H, K))
    vc = v.gather(1, idx.expand(B, T, H, v.shape[-1]))
    if doc_q is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return pos_c[b, kv_idx] <= q_idx
    else:
        doc_c = doc_q.gather(1, order)

        def mask_mod(b, h, q_idx, kv_idx):
            return (pos_c[b, kv_idx] <= q_idx) & (doc_c[b, kv_idx] == doc_q[b, q_idx])
    bm = _block_mask(T, kv, full, qb, fq, mask_mod)
    fn = _flex() if compiled else flex_attention
    opts = kernel_options if kernel_options is not None else KERNEL_OPTIONS
    o = fn(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), block_mask=bm, scale=scale,
           kernel_options=opts)
    return o.transpose(1, 2)
