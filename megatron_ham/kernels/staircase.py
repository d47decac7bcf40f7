"""GPU scratchpad attention: our own Triton staircase kernel over the routed keys.

Same contract as ``megatron_ham.ops.scratchpad_attention`` (layout ``[B,T,H,D]``, ``routed`` bool
``[B,T]`` shared by all heads, H = this tensor-parallel rank's heads)::

    o_t = sum_{j <= t, routed[b,j], doc(j) == doc(t)} softmax_j(scale * q_t . k_j) v_j   (0 if none)

FlashAttention-2 style (online softmax in fp32, log-sum-exp saved for the backward) over the
routed keys in position order ("slots"). The forward and dq kernels read K and V from copies
gathered once into slot order (``kv_layout="compact"``, the default: one ``index_select`` of T
rows per call, 0.105 ms for K and V at 16k x 16 x 128, freed after the kernel), so their inner
loops load contiguous rows; ``kv_layout="gather"`` reads them through the order inside the loop
instead (no copies; measured 5-6 % slower forward+backward at f >= 0.25, docs/benchmarks.md).
The backward writes dk, dv straight to the routed positions (every other position gets an exact
0): no scatter-add, nothing saved beyond the inputs, o, the lse and the plan.

Four launches per call (plus the copies), all on static shapes (one compilation per (dtype, head
dims, documents or not, layout), never per routing; the routed count is only read on the device):

1. :func:`_compaction_kernel` (one program per batch row, + one for the documents): ``cum[b, t]``
   = routed count in ``[0, t]``; ``order[b, :]`` = the routed positions in position order, then
   the others (a permutation of ``0..T-1``; slot s < cnt is the s-th routed key); with
   ``cu_seqlens`` also ``dstart[t]`` / ``dend[t]`` = start / end of t's document.
2. :func:`_staircase_fwd_kernel`, one program per (query block, batch x head), in the order of
   :func:`_schedule` (groups of a few heads; in each, the blocks with most work first). Because
   slots are in position order, the keys visible to queries ``[t0, t1]`` are the slots
   ``[lo, hi)`` with ``hi = cum[t1]`` and ``lo`` = routed count before ``dstart[t0]`` (0 without
   documents), and slots ``[cum0[dstart[t1]], cum[t0])`` are visible to every query of the
   block. The walk over ``[lo, hi)`` is split by :func:`_phases` into masked tiles, whole tiles
   without any mask, masked tiles: only tiles under the staircase are visited, and only the
   diagonal / document-edge ones evaluate the mask ``pos[j] <= t & pos[j] >= dstart[t]``.
3. Backward :func:`_staircase_dq_kernel` (query blocks, the same walk): ``delta = rowsum(o * do)``
   for its rows (stored for step 4), then ``dq``.
4. Backward :func:`_staircase_dkdv_kernel`, one program per block of key SLOTS: the queries that see
   slots ``[s0, s1)`` are ``[pos[s0], dend[pos[s1-1]])``, all of them see every slot for
   ``t in [pos[s1-1], dend[pos[s0]])``; dk, dv are accumulated in fp32 and stored at rows
   ``order[s]`` (zeros for slots past the routed count, i.e. the unrouted positions). With few
   routed keys a block's walk is split over up to :data:`SPLIT_MAX` programs (:func:`split_plan`,
   decided on the device from the routed count): each adds its partial dk, dv to an fp32
   scratch, and the last one to finish stores the sums (:func:`_split_sum`).

Cost: proportional to the routed work (about f x a causal attention), plus O(T) integer work in
step 1, the O(T) copies and the O(T) ``delta`` read of step 3. The split's scratch is kept
between calls (at most 132 MiB on a 132-SM H100 / H200 at head dim 128, :func:`_split_scratch`).
Saved for the backward: q, k, v, o, the lse ``[B,H,T]`` fp32 and the plan (``cum``, ``order``
int32 ``[B,T]``; ``dstart``, ``dend`` ``[T]``); the backward gathers its copies again (freed
before dk, dv are allocated). The backward recomputes (7 matmuls per tile pair, FlashAttention-2's
is 5 with dq added by atomics): measured on an H200, atomics for dq made it 14-37 % slower
(docs/benchmarks.md).

Schedule: a 1-d grid, longest-first inside groups of :func:`heads_per_group` heads (FlashAttention-
3's order). The earlier grid (blocks x heads, the longest first within each head) left the last
head's longest blocks to start near the end of the launch, with the other SMs idle.

Tiles: autotuned per (T, head dims, documents) on the GPU (a few configurations each); fixed tiles
can be passed (``tiles=``) -- the CPU tests run the kernels under Triton's interpreter that way.
"""
from __future__ import annotations

import functools
import math
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
import triton
import triton.language as tl

__all__ = ["scratchpad_attention_triton", "compaction_plan", "SUPPORTED_DTYPES", "MAX_HEAD_DIM",
           "KV_LAYOUTS"]

#: what ``impl="auto"`` sends here. float32 inputs also run (ieee fp32 dots, for tests), but their
#: kernels take minutes to compile on an H200 host (measured: > 120 s each), so auto keeps them off.
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
#: head dims above this exceed the register budget of the dk/dv accumulators
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
_PLAN_BLOCK = 1024


# ----------------------------------------------------------------------------------------------
# 1. compaction plan
# ----------------------------------------------------------------------------------------------
@triton.jit
def _compaction_kernel(ROUTED, CUM, ORDER, CU, DSTART, DEND, T, N_DOCS, B,
                       BLOCK: tl.constexpr, HAS_DOC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < B:
        row = pid.to(tl.int64) * T
        cnt = tl.zeros([], dtype=tl.int32)
        for t0 in range(0, T, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            r = tl.load(ROUTED + row + offs, mask=offs < T, other=0).to(tl.int32)
            cnt += tl.sum(r, 0)
        run = tl.zeros([], dtype=tl.int32)
        for t0 in range(0, T, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            m = offs < T
            r = tl.load(ROUTED + row + offs, mask=m, other=0).to(tl.int32)
            c = tl.cumsum(r, 0) + run                       # routed count in [0, t]
            tl.store(CUM + row + offs, c, mask=m)
            # routed: slot c-1; unrouted: after all routed ones, in position order
            dest = tl.where(r > 0, c - 1, cnt + offs - c)
            tl.store(ORDER + row + dest, offs, mask=m)
            run += tl.sum(r, 0)
    if HAS_DOC:
        if pid == B:
            for n in range(N_DOCS):
                s = tl.load(CU + n).to(tl.int32)
                e = tl.load(CU + n + 1).to(tl.int32)
                for t0 in range(s, e, BLOCK):
                    offs = t0 + tl.arange(0, BLOCK)
                    m = offs < e
                    tl.store(DSTART + offs, tl.zeros([BLOCK], dtype=tl.int32) + s, mask=m)
                    tl.store(DEND + offs, tl.zeros([BLOCK], dtype=tl.int32) + e, mask=m)


def compaction_plan(routed: torch.Tensor, cu_seqlens: Optional[torch.Tensor]):
    """routed bool ``[B,T]`` -> ``(cum, order, dstart, dend)``: ``cum`` int32 ``[B,T]`` routed
    count in ``[0, t]``; ``order`` int32 ``[B,T]`` routed positions in order, then the unrouted
    ones; ``dstart`` / ``dend`` int32 ``[T]`` document start / end of every position (None
    without cu_seqlens, which requires B == 1). One launch, no host sync."""
    B, T = routed.shape
    dev = routed.device
    cum = torch.empty(B, T, dtype=torch.int32, device=dev)
    order = torch.empty(B, T, dtype=torch.int32, device=dev)
    has_doc = cu_seqlens is not None
    dstart = torch.empty(T, dtype=torch.int32, device=dev) if has_doc else None
    dend = torch.empty(T, dtype=torch.int32, device=dev) if has_doc else None
    n_docs = cu_seqlens.numel() - 1 if has_doc else 0
    _compaction_kernel[(B + int(has_doc),)](
        routed.contiguous().view(torch.uint8), cum, order, cu_seqlens, dstart, dend, T, n_docs, B,
        BLOCK=_PLAN_BLOCK, HAS_DOC=has_doc, num_warps=4)
    return cum, order, dstart, dend


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------
@triton.jit
def _phases(lo, hi, f_lo, f_hi, BLOCK: tl.constexpr):
    """Split the index range [lo, hi) into tiles of BLOCK: n_a masked tiles from lo (up to f_lo),
    n_b unmasked tiles from start_b lying inside [f_lo, f_hi), n_c masked tiles from start_c to
    hi. Requires lo <= f_lo and f_hi <= hi (empty ranges allowed)."""
    hi = tl.maximum(hi, lo)
    a_end = tl.minimum(tl.maximum(f_lo, lo), hi)
    n_a = (a_end - lo + BLOCK - 1) // BLOCK
    start_b = lo + n_a * BLOCK
    n_b = tl.maximum(f_hi - start_b, 0) // BLOCK
    start_c = start_b + n_b * BLOCK
    n_c = (tl.maximum(hi - start_c, 0) + BLOCK - 1) // BLOCK
    return n_a, start_b, n_b, start_c, n_c


@triton.jit
def _load_rows(base, rows, stride, row_mask, D: tl.constexpr, BD: tl.constexpr,
               ROW_MASKED: tl.constexpr):
    """[len(rows), BD] tile of a row-major [*, D] view: rows (int64) times stride, zeros past D
    and (if ROW_MASKED) in rows where row_mask is False."""
    offs_d = tl.arange(0, BD)
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    if ROW_MASKED:
        if D == BD:
            x = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_mask[:, None] & (offs_d < D)[None, :], other=0.0)
    else:
        if D == BD:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)
    return x


@triton.jit
def _store_rows(base, rows, stride, x, row_mask, D: tl.constexpr, BD: tl.constexpr):
    offs_d = tl.arange(0, BD)
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    if D == BD:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=row_mask[:, None])
    else:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=row_mask[:, None] & (offs_d < D)[None, :])


@triton.jit
def _schedule(n_blk, GROUP):
    """The program's (rank of its block by work, 0 = most; batch x head index), from a 1-d grid
    of n_blk blocks x (B x H): groups of GROUP heads, one after the other; inside a group the
    most work first across its heads (block rank outer, head inner). Longest-first keeps the
    heavy blocks off the end of the launch; the groups keep the heads in flight few enough for
    their K, V (or Q, dO) to stay in L2 (FlashAttention-3's scheduler does the same)."""
    pid = tl.program_id(0)
    bh = tl.num_programs(0) // n_blk
    per_group = GROUP * n_blk
    g = pid // per_group
    size = tl.minimum(GROUP, bh - g * GROUP)                      # the last group may be short
    r = pid - g * per_group
    return r // size, g * GROUP + r % size


@triton.jit
def _batch_head(i_bh, CUM, ORDER, T, H):
    """(i_b, i_h, this row's cum and order, routed count) of batch x head index i_bh."""
    i_b = (i_bh // H).to(tl.int64)
    cum = CUM + i_b * T
    return i_b, (i_bh % H).to(tl.int64), cum, ORDER + i_b * T, tl.load(cum + T - 1)


@triton.jit
def _query_program(CUM, ORDER, DSTART, T, H, GROUP, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, HAS_DOC: tl.constexpr):
    """Prologue of a query-block program (:func:`_schedule`: the last query block has most work).

    Queries [t0, t0 + BLOCK_M) see the slots [lo, hi) and all of them see [f_lo, f_hi); returns
    the walk over [lo, hi) in tiles of BLOCK_N as :func:`_phases` splits it, with each row's
    document start (0 without documents) for the mask."""
    n_m = tl.cdiv(T, BLOCK_M)
    rank, i_bh = _schedule(n_m, GROUP)
    i_m = n_m - 1 - rank
    i_b, i_h, cum, order, cnt = _batch_head(i_bh, CUM, ORDER, T, H)
    t0 = i_m * BLOCK_M
    offs_m = t0 + tl.arange(0, BLOCK_M)
    t_last = tl.minimum(t0 + BLOCK_M, T) - 1
    hi = tl.load(cum + t_last)
    f_hi = tl.load(cum + t0)
    if HAS_DOC:
        ds_rows = tl.load(DSTART + offs_m, mask=offs_m < T, other=0)
        d0 = tl.load(DSTART + t0)
        d1 = tl.load(DSTART + t_last)
        lo = tl.load(cum + d0 - 1, mask=d0 > 0, other=0)        # routed count before d0
        f_lo = tl.load(cum + d1 - 1, mask=d1 > 0, other=0)
    else:
        ds_rows = tl.zeros([BLOCK_M], dtype=tl.int32)
        lo = tl.zeros([], dtype=tl.int32)
        f_lo = tl.zeros([], dtype=tl.int32)
    n_a, start_b, n_b, start_c, n_c = _phases(lo, hi, f_lo, f_hi, BLOCK_N)
    return i_bh, i_b, i_h, order, cnt, offs_m, ds_rows, lo, n_a, start_b, n_b, start_c, n_c


@triton.jit
def _phase(PH: tl.constexpr, lo, n_a, start_b, n_b, start_c, n_c):
    """(start, number of tiles) of phase PH of :func:`_phases` (0, 2 masked; 1 unmasked)."""
    if PH == 0:
        start = lo
        n = n_a
    elif PH == 1:
        start = start_b
        n = n_b
    else:
        start = start_c
        n = n_c
    return start, n


@triton.jit
def _slot_tile(order, start, i, cnt, T, BLOCK_N: tl.constexpr):
    """Slots of tile i from start: their indices, positions (int32; 0 past T) and validity."""
    offs_s = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
    pos = tl.load(order + offs_s, mask=offs_s < T, other=0)
    return offs_s, pos, offs_s < cnt


@triton.jit
def _kv_tile(order, start, i, cnt, T, kb, vb, s_kt, s_vt, DK: tl.constexpr, DV: tl.constexpr,
             BK: tl.constexpr, BV: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
             COMPACT: tl.constexpr):
    """Tile i of slots from start: positions, validity, and the K, V rows of those slots: row
    ``slot`` of the compacted copies (COMPACT; clamped to T-1 in masked tiles, whose slots may run
    past T), else gathered at the positions. Unmasked tiles leave ``pos`` unused, so COMPACT
    loads them without reading the order at all."""
    offs_s, pos, valid = _slot_tile(order, start, i, cnt, T, BLOCK_N)
    if COMPACT:
        rows = tl.minimum(offs_s, T - 1) if MASKED else offs_s
    else:
        rows = pos
    k = _load_rows(kb, rows, s_kt, valid, DK, BK, False)
    v = _load_rows(vb, rows, s_vt, valid, DV, BV, False)
    return pos, valid, k, v


@triton.jit
def _visible(pos, valid, offs_m, ds_rows, HAS_DOC: tl.constexpr):
    """[BLOCK_M, BLOCK_N] mask: slot valid, pos <= t and (documents) pos >= dstart(t)."""
    vis = valid[None, :] & (pos[None, :] <= offs_m[:, None])
    if HAS_DOC:
        vis = vis & (pos[None, :] >= ds_rows[:, None])
    return vis


# ----------------------------------------------------------------------------------------------
# 2. forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, kb, vb, order, start, n_tiles, offs_m, ds_rows, cnt, T,
               s_kt, s_vt, qk_scale,
               DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_DOC: tl.constexpr,
               PREC: tl.constexpr, COMPACT: tl.constexpr):
    for i in range(n_tiles):
        pos, valid, k, v = _kv_tile(order, start, i, cnt, T, kb, vb, s_kt, s_vt, DK, DV, BK, BV,
                                    BLOCK_N, MASKED, COMPACT)           # k [BN, BK], v [BN, BV]
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale       # [BM, BN] log2 units
        if MASKED:
            s = tl.where(_visible(pos, valid, offs_m, ds_rows, HAS_DOC), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)          # rows with no key yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _staircase_fwd_kernel(Q, K, V, O, LSE, CUM, ORDER, DSTART,
                          s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
                          T, H, GROUP, qk_scale,
                          DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          HAS_DOC: tl.constexpr, PREC: tl.constexpr, COMPACT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    i_bh, i_b, i_h, order, cnt, offs_m, ds_rows, lo, n_a, start_b, n_b, start_c, n_c = \
        _query_program(CUM, ORDER, DSTART, T, H, GROUP, BLOCK_M, BLOCK_N, HAS_DOC)
    m_row = offs_m < T
    rows = offs_m
    q = _load_rows(Q + i_b * s_qb + i_h * s_qh, rows, s_qt, m_row, DK, BK, True)   # [BM, BK]
    kb = K + i_b * s_kb + i_h * s_kh
    vb = V + i_b * s_vb + i_h * s_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BV], dtype=tl.float32)
    for ph in tl.static_range(3):
        start, n = _phase(ph, lo, n_a, start_b, n_b, start_c, n_c)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, kb, vb, order, start, n, offs_m, ds_rows,
                                   cnt, T, s_kt, s_vt, qk_scale, DK, DV, BK, BV, BLOCK_N, ph != 1,
                                   HAS_DOC, PREC, COMPACT)
    empty = l_i == 0.0                                             # sees no routed key: o = 0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, 0.0, m_i + tl.log2(l_safe))             # log2 units
    _store_rows(O + i_b * s_ob + i_h * s_oh, rows, s_ot, o, m_row, DV, BV)
    tl.store(LSE + i_bh.to(tl.int64) * T + offs_m, lse, mask=m_row)


# ----------------------------------------------------------------------------------------------
# 3. backward: delta and dq, per query block
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dq_tiles(dq, q, do, lse, delta, kb, vb, order, start, n_tiles, offs_m, ds_rows, cnt, T,
              s_kt, s_vt, qk_scale,
              DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_DOC: tl.constexpr,
              PREC: tl.constexpr, COMPACT: tl.constexpr):
    for i in range(n_tiles):
        pos, valid, k, v = _kv_tile(order, start, i, cnt, T, kb, vb, s_kt, s_vt, DK, DV, BK, BV,
                                    BLOCK_N, MASKED, COMPACT)           # k [BN, BK], v [BN, BV]
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_visible(pos, valid, offs_m, ds_rows, HAS_DOC), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)               # [BM, BN]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _staircase_dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA, CUM, ORDER, DSTART,
                         s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
                         s_db, s_dt, s_dh, s_gb, s_gt, s_gh,
                         T, H, GROUP, qk_scale, sm_scale,
                         DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         HAS_DOC: tl.constexpr, PREC: tl.constexpr, COMPACT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    i_bh, i_b, i_h, order, cnt, offs_m, ds_rows, lo, n_a, start_b, n_b, start_c, n_c = \
        _query_program(CUM, ORDER, DSTART, T, H, GROUP, BLOCK_M, BLOCK_N, HAS_DOC)
    m_row = offs_m < T
    rows = offs_m
    q = _load_rows(Q + i_b * s_qb + i_h * s_qh, rows, s_qt, m_row, DK, BK, True)
    do = _load_rows(DO + i_b * s_db + i_h * s_dh, rows, s_dt, m_row, DV, BV, True)
    o = _load_rows(O + i_b * s_ob + i_h * s_oh, rows, s_ot, m_row, DV, BV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)       # [BM]
    tl.store(DELTA + i_bh.to(tl.int64) * T + offs_m, delta, mask=m_row)
    lse = tl.load(LSE + i_bh.to(tl.int64) * T + offs_m, mask=m_row, other=0.0)
    kb = K + i_b * s_kb + i_h * s_kh
    vb = V + i_b * s_vb + i_h * s_vh

    dq = tl.zeros([BLOCK_M, BK], dtype=tl.float32)
    for ph in tl.static_range(3):
        start, n = _phase(ph, lo, n_a, start_b, n_b, start_c, n_c)
        dq = _dq_tiles(dq, q, do, lse, delta, kb, vb, order, start, n, offs_m, ds_rows, cnt, T,
                       s_kt, s_vt, qk_scale, DK, DV, BK, BV, BLOCK_N, ph != 1, HAS_DOC, PREC,
                       COMPACT)
    _store_rows(DQ + i_b * s_gb + i_h * s_gh, rows, s_gt, dq * sm_scale, m_row, DK, BK)


# ----------------------------------------------------------------------------------------------
# 4. backward: dk, dv per block of key slots, written to the routed positions
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_tiles(dk, dv, k, v, pos, valid, Qb, DOb, LSEb, DELTAb, DSTART, start, n_tiles, T,
                s_qt, s_dt, qk_scale,
                DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr, HAS_DOC: tl.constexpr,
                PREC: tl.constexpr):
    for i in range(n_tiles):
        offs_t = start + i * BLOCK_M + tl.arange(0, BLOCK_M)
        t_ok = offs_t < T
        rows = offs_t
        q = _load_rows(Qb, rows, s_qt, t_ok, DK, BK, MASKED)              # [BM, BK]
        do = _load_rows(DOb, rows, s_dt, t_ok, DV, BV, MASKED)            # [BM, BV]
        if MASKED:
            lse = tl.load(LSEb + offs_t, mask=t_ok, other=0.0)
            delta = tl.load(DELTAb + offs_t, mask=t_ok, other=0.0)
        else:
            lse = tl.load(LSEb + offs_t)
            delta = tl.load(DELTAb + offs_t)
        sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale      # [BN, BM]
        pT = tl.exp2(sT - lse[None, :])
        if MASKED:
            vis = valid[:, None] & (pos[:, None] <= offs_t[None, :]) & t_ok[None, :]
            if HAS_DOC:
                ds_t = tl.load(DSTART + offs_t, mask=t_ok, other=0)
                vis = vis & (pos[:, None] >= ds_t[None, :])
            pT = tl.where(vis, pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)               # [BN, BM]
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _split_count(cnt, walk, BH, NSPLIT, SPLIT_TARGET, MIN_PIECE, S_CAP, BLOCK_N: tl.constexpr):
    """Programs that share one slot block's walk of ``walk`` queries (1: not split): enough for
    this row's slot blocks x the B x H rows to reach SPLIT_TARGET programs, at most NSPLIT, pieces
    of at least MIN_PIECE queries, and only while the row's slots fit the scratch (S_CAP rows)."""
    n_blk = tl.maximum(tl.cdiv(cnt, BLOCK_N), 1)
    n = tl.minimum(SPLIT_TARGET // (n_blk * BH), NSPLIT)
    n = tl.minimum(n, tl.cdiv(walk, MIN_PIECE))
    n = tl.where(n_blk * BLOCK_N <= S_CAP, n, 1)
    return tl.maximum(n, 1)


@triton.jit
def _split_sum(dk, dv, ACC_K, ACC_V, LOCKS, i_bh, i_n, s0, n_split, S_CAP,
               BK: tl.constexpr, BV: tl.constexpr, BLOCK_N: tl.constexpr):
    """Adds this piece's partial dk, dv to the fp32 scratch rows of its slots and counts the piece
    in; the piece counted last reads the sums (after its acquiring count, so every other piece's
    adds are in) and writes zeros back (the scratch is zero again for the next call) and resets
    the counter. Returns (dk, dv, pieces counted before)."""
    rows = (i_bh.to(tl.int64) * S_CAP + s0 + tl.arange(0, BLOCK_N))[:, None]
    pk = ACC_K + rows * BK + tl.arange(0, BK)[None, :]
    pv = ACC_V + rows * BV + tl.arange(0, BV)[None, :]
    tl.atomic_add(pk, dk, sem="relaxed")
    tl.atomic_add(pv, dv, sem="relaxed")
    tl.debug_barrier()                                  # every thread's adds before the count
    lock = LOCKS + i_bh.to(tl.int64) * (S_CAP // 16) + i_n
    done = tl.atomic_add(lock, 1, sem="acq_rel")
    if done == n_split - 1:                            # read from L2 (".cg"), where the adds went
        dk = tl.load(pk, cache_modifier=".cg")
        dv = tl.load(pv, cache_modifier=".cg")
        tl.store(pk, tl.zeros([BLOCK_N, BK], dtype=tl.float32))
        tl.store(pv, tl.zeros([BLOCK_N, BV], dtype=tl.float32))
        tl.atomic_xchg(lock, 0, sem="relaxed")
    return dk, dv, done


@triton.jit
def _staircase_dkdv_kernel(Q, K, V, DO, DK_, DV_, LSE, DELTA, CUM, ORDER, DSTART, DEND,
                           ACC_K, ACC_V, LOCKS,
                           s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_db, s_dt, s_dh,
                           s_gkb, s_gkt, s_gkh, s_gvb, s_gvt, s_gvh,
                           T, H, GROUP, NSPLIT, SPLIT_TARGET, MIN_PIECE, S_CAP, qk_scale, sm_scale,
                           DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           HAS_DOC: tl.constexpr, PREC: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    n_blk = tl.cdiv(T, BLOCK_N)
    rank, i_bh = _schedule(n_blk * NSPLIT, GROUP)          # slot block 0 (its pieces): most work
    i_n = rank // NSPLIT
    j = rank % NSPLIT
    i_b, i_h, cum, order, cnt = _batch_head(i_bh, CUM, ORDER, T, H)
    s0 = i_n * BLOCK_N

    # queries that see slots [s0, s1): [pos[s0], dend(pos[s1-1])); all of them for
    # t in [pos[s1-1], dend(pos[s0])). A block holding slots past cnt is walked fully masked;
    # one past cnt entirely walks nothing (its rows are unrouted positions: dk = dv = 0).
    has_keys = s0 < cnt
    s_last = tl.maximum(tl.minimum(s0 + BLOCK_N, cnt) - 1, s0)
    p_first = tl.load(order + s0)
    p_last = tl.load(order + s_last)
    if HAS_DOC:
        q_hi = tl.load(DEND + p_last)
        f_hi = tl.load(DEND + p_first)
    else:
        q_hi = T
        f_hi = T
    q_hi = tl.where(has_keys, q_hi, p_first)
    f_hi = tl.where(s0 + BLOCK_N <= cnt, f_hi, p_first)
    n_split = _split_count(cnt, q_hi - p_first, tl.num_programs(0) // (n_blk * NSPLIT), NSPLIT,
                           SPLIT_TARGET, MIN_PIECE, S_CAP, BLOCK_N)
    if j < n_split:
        # piece j of the walk: [a, b), a multiple of BLOCK_M queries long (but the last), so its
        # tiles are those of the unsplit walk
        piece = tl.cdiv(tl.cdiv(q_hi - p_first, n_split), BLOCK_M) * BLOCK_M
        a = tl.minimum(p_first + j * piece, q_hi)
        b = tl.where(j == n_split - 1, q_hi, tl.minimum(a + piece, q_hi))
        n_a, start_b, n_b, start_c, n_c = _phases(a, b, tl.minimum(tl.maximum(p_last, a), b),
                                                  tl.minimum(tl.maximum(f_hi, a), b), BLOCK_M)
        offs_s, pos, valid = _slot_tile(order, s0, 0, cnt, T, BLOCK_N)
        in_t = offs_s < T
        rows = pos
        k = _load_rows(K + i_b * s_kb + i_h * s_kh, rows, s_kt, in_t, DK, BK, False)  # [BN, BK]
        v = _load_rows(V + i_b * s_vb + i_h * s_vh, rows, s_vt, in_t, DV, BV, False)  # [BN, BV]
        Qb = Q + i_b * s_qb + i_h * s_qh
        DOb = DO + i_b * s_db + i_h * s_dh
        LSEb = LSE + i_bh.to(tl.int64) * T
        DELTAb = DELTA + i_bh.to(tl.int64) * T
        dk = tl.zeros([BLOCK_N, BK], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BV], dtype=tl.float32)
        for ph in tl.static_range(3):
            start, n = _phase(ph, a, n_a, start_b, n_b, start_c, n_c)
            dk, dv = _dkdv_tiles(dk, dv, k, v, pos, valid, Qb, DOb, LSEb, DELTAb, DSTART, start, n,
                                 T, s_qt, s_dt, qk_scale, DK, DV, BK, BV, BLOCK_M, ph != 1, HAS_DOC,
                                 PREC)
        done = n_split - 1
        if n_split > 1:
            dk, dv, done = _split_sum(dk, dv, ACC_K, ACC_V, LOCKS, i_bh, i_n, s0, n_split, S_CAP,
                                      BK, BV, BLOCK_N)
        if done == n_split - 1:                        # the whole walk is in dk, dv
            dk = tl.where(valid[:, None], dk * sm_scale, 0.0)
            dv = tl.where(valid[:, None], dv, 0.0)
            _store_rows(DK_ + i_b * s_gkb + i_h * s_gkh, rows, s_gkt, dk, in_t, DK, BK)
            _store_rows(DV_ + i_b * s_gvb + i_h * s_gvh, rows, s_gvt, dv, in_t, DV, BV)


# ----------------------------------------------------------------------------------------------
# tiles: autotuned on the GPU, or fixed
# ----------------------------------------------------------------------------------------------
def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


_KEY = ["T", "DK", "DV", "HAS_DOC", "PREC"]
_KEYS = {"fwd": _KEY + ["COMPACT"], "dq": _KEY + ["COMPACT"], "dkdv": _KEY}  # dk/dv: no layout
# Two candidates each: the best of tools/sweep_staircase.py on an H200 (T = 16k, 16 x 128 heads,
# f = 0.1 .. 1, docs/benchmarks.md 2026-12-02 23:28); few on purpose, every candidate is a
# compilation of a few seconds at first use.
_FWD_CONFIGS = [_cfg(64, 64, 4, 3), _cfg(128, 128, 8, 3)]
_DQ_CONFIGS = [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)]
# dkdv: BLOCK_N = key slots (the dk/dv accumulator rows), BLOCK_M = queries per tile
_DKDV_CONFIGS = [_cfg(32, 64, 4, 3), _cfg(64, 128, 8, 3)]
_KERNELS = {"fwd": "_staircase_fwd_kernel", "dq": "_staircase_dq_kernel", "dkdv": "_staircase_dkdv_kernel"}
_tuned = {}

#: ``tiles=`` of :func:`scratchpad_attention_triton`: (BLOCK_M, BLOCK_N) or (BLOCK_M, BLOCK_N,
#: num_warps, num_stages) for every kernel, or a dict of those per kernel ("fwd", "dq", "dkdv";
#: a kernel left out is autotuned), which may also fix "group" (heads per group of the schedule,
#: an int; default :func:`heads_per_group`)
Tiles = Union[Tuple[int, ...], Dict[str, Union[int, Tuple[int, ...]]]]

#: bytes of the rows every program of a head walks (K and V, or Q and dO) that the heads in
#: flight may take in L2 (an H100 / H200 has 50 MiB; FlashAttention-3 plans with 32 MiB too)
L2_BUDGET = 32 << 20


def heads_per_group(T: int, DK: int, DV: int, itemsize: int, budget: int = L2_BUDGET) -> int:
    """Heads of one group of :func:`_schedule`: the largest power of two whose walked rows (T x
    (DK + DV) each, an upper bound: the forward and dq read only the routed rows) fit in the
    budget; at least 1. 16k x (128 + 128) bf16 = 8 MiB per head: 4 heads."""
    per_head = max(1, T * (DK + DV) * itemsize)
    n = max(1, budget // per_head)
    return 1 << (n.bit_length() - 1)


def _group(tiles: Optional[Tiles], T: int, q: torch.Tensor, v: torch.Tensor) -> int:
    if isinstance(tiles, dict) and tiles.get("group") is not None:
        return int(tiles["group"])
    return heads_per_group(T, q.shape[-1], v.shape[-1], q.element_size())


#: the dk/dv kernel's split of long walks (:func:`split_plan`): at most SPLIT_MAX programs per
#: slot block, while a row's slot blocks x (B x H) are below SPLIT_PROGRAMS_PER_SM programs per
#: SM, each walking at least SPLIT_MIN_PIECE queries
SPLIT_MAX = 4
SPLIT_PROGRAMS_PER_SM = 16
SPLIT_MIN_PIECE = 1024
_MAX_SLOT_BLOCK = 128           # the largest dk/dv BLOCK_N of the autotuned configurations


class SplitPlan(NamedTuple):
    """How the dk/dv kernel may split slot blocks' query walks (the device decides per row from
    its routed count, :func:`_split_count`): ``n_max`` programs per slot block in the grid,
    ``target`` programs to reach, pieces of at least ``min_piece`` queries, rows of the fp32
    scratch per batch x head (``s_cap``; a row whose slots do not fit is not split)."""
    n_max: int
    target: int
    min_piece: int
    s_cap: int


def split_plan(tiles: Optional[Tiles], T: int, BH: int, device: torch.device) -> SplitPlan:
    """The dk/dv kernel splits a slot block's walk over queries when the routed keys are few.

    One program per block of slots walks every later query of the block's documents: at small
    KV fractions there are few blocks (at f = 0.1, 16k tokens and 16 heads: 416 programs for 132
    SMs) and the first ones walk the whole row, so the longest walks set the kernel's time
    (docs/benchmarks.md: 3.6x the forward at f = 0.1, 2.3x at f = 0.5). Split, each of up to
    SPLIT_MAX programs walks a piece and adds its partial dk, dv to an fp32 scratch; the last
    one stores the sums. Default: split while a row's blocks x heads are fewer than
    SPLIT_PROGRAMS_PER_SM programs per SM. ``tiles={"split": n}`` forces n pieces wherever a
    walk has n tiles (tests, tools/sweep_staircase.py); ``{"split": 1}`` turns it off."""
    forced = tiles.get("split") if isinstance(tiles, dict) else None
    t_rows = triton.cdiv(T, _MAX_SLOT_BLOCK) * _MAX_SLOT_BLOCK
    if forced is not None:
        n = int(forced)
        if n < 1:
            raise ValueError(f"tiles['split'] must be >= 1, got {forced!r}")
        return SplitPlan(n, 1 << 30, 1, t_rows if n > 1 else 0)
    target = SPLIT_PROGRAMS_PER_SM * _sm_count(device)
    s_cap = min(t_rows, target // (2 * BH) * _MAX_SLOT_BLOCK)  # >= 2 pieces needs <= target/2
    return SplitPlan(SPLIT_MAX if s_cap else 1, target, SPLIT_MIN_PIECE, s_cap)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1                                           # the interpreter (tests)
    return torch.cuda.get_device_properties(device).multi_processor_count


#: (device, stream) -> (fp32 scratch, int32 counters), all zeros between calls
_SPLIT_SCRATCH: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def _split_scratch(device: torch.device, BH: int, s_cap: int, BK: int, BV: int):
    """The split's fp32 dk, dv scratch ``[BH, s_cap, BK]``, ``[BH, s_cap, BV]`` (flat views) and
    its counters ``[BH, s_cap / 16]``, kept per device and stream: the kernel leaves them zero
    (the last piece of each block reads its sums, writes zeros back and resets its counter),
    so no call clears them; a call that needs more allocates larger zeros (freeing the old ones
    in stream order). Without a split (``s_cap`` 0) a one-element placeholder."""
    n_k, n_v, n_l = BH * s_cap * BK, BH * s_cap * BV, max(1, BH * s_cap // 16)
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    acc, locks = _SPLIT_SCRATCH.get(key, (None, None))
    if acc is None or acc.numel() < max(1, n_k + n_v) or locks.numel() < n_l:
        n_acc = max(1, n_k + n_v, 0 if acc is None else acc.numel())
        n_lock = max(n_l, 0 if locks is None else locks.numel())
        acc = torch.zeros(n_acc, dtype=torch.float32, device=device)
        locks = torch.zeros(n_lock, dtype=torch.int32, device=device)
        _SPLIT_SCRATCH[key] = (acc, locks)
    return acc[:max(1, n_k)], acc[n_k:n_k + n_v] if n_v else acc[:1], locks


def _kernel(name: str, tiles: Optional[Tiles]):
    """(kernel, launch kwargs): the autotuned kernel, or the plain one with fixed tiles
    (BLOCK_M, BLOCK_N[, num_warps, num_stages]) (for dkdv BLOCK_N is the key-slot block)."""
    raw = globals()[_KERNELS[name]]
    t = tiles.get(name) if isinstance(tiles, dict) else tiles
    if t is not None:
        bm, bn, warps, stages = tuple(t) + (4, 2)[len(t) - 2:]
        return raw, {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
    if name not in _tuned:
        configs = {"fwd": _FWD_CONFIGS, "dq": _DQ_CONFIGS, "dkdv": _DKDV_CONFIGS}[name]
        _tuned[name] = triton.autotune(configs=configs, key=_KEYS[name])(raw)
    return _tuned[name], {}


def _bht(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


def _rowmajor(x: torch.Tensor) -> torch.Tensor:
    """The kernels need a unit stride in the last dim only."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _compacted(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x ``[B,T,H,D]`` -> its rows in slot order, contiguous: row s of batch b is
    ``x[b, order[b, s]]`` (the routed keys first, in position order). One gather of T rows."""
    B, T = order.shape
    if B > 1:                                                       # rows of x.flatten(0, 1)
        order = order + torch.arange(B, device=order.device, dtype=order.dtype)[:, None] * T
    return x.flatten(0, 1).index_select(0, order.flatten()).view(B, T, *x.shape[2:])


def _dims(q, v):
    DK, DV = q.shape[-1], v.shape[-1]
    prec = "ieee" if q.dtype == torch.float32 else None
    return dict(DK=DK, DV=DV, BK=max(16, triton.next_power_of_2(DK)),
                BV=max(16, triton.next_power_of_2(DV)), PREC=prec)


class _StaircaseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, routed, scale, cu_seqlens, tiles, kv_layout):
        B, T, H, _ = q.shape
        q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
        compact = kv_layout == "compact"
        cum, order, dstart, dend = compaction_plan(routed, cu_seqlens)
        kk, vv = (_compacted(k, order), _compacted(v, order)) if compact else (k, v)
        o = torch.empty(B, T, H, v.shape[-1], dtype=v.dtype, device=q.device)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        kern, kw = _kernel("fwd", tiles)
        group = _group(tiles, T, q, v)
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * B * H,)  # noqa: E731
        kern[grid](q, kk, vv, o, lse, cum, order, dstart, *_bht(q), *_bht(kk), *_bht(vv), *_bht(o),
                   T, H, group, scale * _LOG2E, HAS_DOC=dstart is not None,
                   COMPACT=compact, **_dims(q, v), **kw)
        del kk, vv                      # the backward gathers them again rather than keep them
        ctx.save_for_backward(q, k, v, o, lse, cum, order, dstart, dend)
        ctx.scale, ctx.tiles, ctx.compact, ctx.group = scale, tiles, compact, group
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cum, order, dstart, dend = ctx.saved_tensors
        B, T, H, _ = q.shape
        do = _rowmajor(do)
        dq, delta = torch.empty_like(q), torch.empty_like(lse)
        common = dict(HAS_DOC=dstart is not None, **_dims(q, v))
        group = ctx.group
        kk, vv = (_compacted(k, order), _compacted(v, order)) if ctx.compact else (k, v)
        kern, kw = _kernel("dq", ctx.tiles)
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * B * H,)  # noqa: E731
        kern[grid](q, kk, vv, o, do, dq, lse, delta, cum, order, dstart, *_bht(q), *_bht(kk),
                   *_bht(vv), *_bht(o), *_bht(do), *_bht(dq), T, H, group, ctx.scale * _LOG2E,
                   ctx.scale, COMPACT=ctx.compact, **common, **kw)
        del kk, vv                      # freed before dk, dv exist: the peak stays 3 x |q|
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        kern, kw = _kernel("dkdv", ctx.tiles)
        split = split_plan(ctx.tiles, T, B * H, q.device)
        acc_k, acc_v, locks = _split_scratch(q.device, B * H, split.s_cap, common["BK"],
                                             common["BV"])
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]) * split.n_max * B * H,)  # noqa: E731
        kern[grid](q, k, v, do, dk, dv, lse, delta, cum, order, dstart, dend, acc_k, acc_v, locks,
                   *_bht(q), *_bht(k), *_bht(v), *_bht(do), *_bht(dk), *_bht(dv), T, H, group,
                   split.n_max, split.target, split.min_piece, split.s_cap, ctx.scale * _LOG2E,
                   ctx.scale, **common, **kw)
        return dq, dk, dv, None, None, None, None, None


KV_LAYOUTS = ("compact", "gather")


def scratchpad_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routed: torch.Tensor,
    *,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    tiles: Optional[Tiles] = None,
    kv_layout: str = "compact",
) -> torch.Tensor:
    """Scratchpad attention with the Triton staircase kernel.

    q, k ``[B,T,H,K]``, v ``[B,T,H,V]`` (one dtype: bf16 or fp16, or fp32 with ieee dots, slow
    to compile; any strides with a unit last one), routed bool ``[B,T]``, cu_seqlens int
    ``[N+1]`` (B == 1). Returns o ``[B,T,H,V]`` contiguous in v's dtype; differentiable in q,
    k, v. Arguments are assumed validated by the op (``megatron_ham.ops.scratchpad_attention``).
    ``tiles=(BLOCK_M, BLOCK_N)`` fixes the tile sizes instead of autotuning them (each >= 16,
    powers of two; see :data:`Tiles` for warps, stages and per-kernel tiles).
    ``kv_layout``: how the forward and dq kernels read K and V: "compact" (default) from copies
    gathered once into slot order (one index_select of T rows per call and per backward, so the
    inner loops load contiguous rows), "gather" through the order inside the loop (no copies;
    each tile's loads wait for its order entries). dk/dv always read through the order.
    """
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if T == 0 or B * H == 0:
        return q.new_zeros(B, T, H, v.shape[-1]) + 0.0 * (q.sum() + k.sum() + v.sum())
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device)
    return _StaircaseAttention.apply(q, k, v, routed.to(device=q.device), scale, cu_seqlens, tiles,
                                     kv_layout)
