"""scratchpad_attention: reference (explicit mask) vs compact (gathered routed keys), edge cases."""
import pytest
import torch
import torch.nn.functional as F

from megatron_ham.ops.scratchpad import _compact, _doc_ids, scratchpad_attention


def _inputs(B=2, T=37, H=3, K=8, V=5, frac=0.4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, T, H, K, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64).to(dtype)
    routed = torch.rand(B, T, generator=g) < frac
    return q, k, v, routed


def _loop_definition(q, k, v, routed, scale, cu=None):
    """Per-query loop straight from the definition (float64)."""
    B, T, H, K = q.shape
    doc = _doc_ids(cu, B, T, q.device)
    o = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            js = [j for j in range(t + 1) if routed[b, j] and (doc is None or doc[b, j] == doc[b, t])]
            if not js:
                continue
            s = torch.einsum("hk,jhk->hj", q[b, t].double(), k[b, js].double()) * scale
            o[b, t] = torch.einsum("hj,jhv->hv", s.softmax(-1), v[b, js].double())
    return o


def _fwd_bwd(impl, q, k, v, routed, **kw):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    o = scratchpad_attention(q, k, v, routed, impl=impl, **kw)
    w = torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view(o.shape).to(o.dtype)
    (o * w).sum().backward()
    return o, q.grad, k.grad, v.grad


@pytest.mark.parametrize("impl", ["reference", "compact"])
def test_matches_definition_loop(impl):
    q, k, v, routed = _inputs(B=2, T=19, H=2)
    o = scratchpad_attention(q, k, v, routed, impl=impl)
    ref = _loop_definition(q, k, v, routed, 8 ** -0.5)
    assert o.dtype == torch.float32
    torch.testing.assert_close(o.double(), ref, atol=1e-5, rtol=1e-5)
    # queries before the first routed key are exactly zero, others are not
    first = routed.float().argmax(1)
    for b in range(2):
        assert (o[b, : first[b]] == 0).all()
        assert o[b, first[b]:].abs().sum(-1).min() > 0


def test_compact_equals_reference_fwd_bwd_fp32_multiblock():
    q, k, v, routed = _inputs(B=3, T=70, H=2, frac=0.3)
    routed[2] = False  # one row with nothing routed, rows with different counts
    routed[1, 5] = True
    ref = _fwd_bwd("reference", q, k, v, routed)
    # small query blocks exercise the key-window logic
    qq, kk, vv = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    o = _compact(qq, kk, vv, routed, 8 ** -0.5, None, block=16).float()
    (o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum().backward()
    for a, b in zip((o, qq.grad, kk.grad, vv.grad), ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (o[2] == 0).all()
    assert (qq.grad[2] == 0).all() and (kk.grad[2] == 0).all() and (vv.grad[2] == 0).all()
    # unrouted keys get no gradient
    assert (kk.grad[~routed] == 0).all() and (vv.grad[~routed] == 0).all()
    assert kk.grad[routed].abs().sum() > 0


def test_bf16_loose():
    q, k, v, routed = _inputs(B=2, T=33, H=2, dtype=torch.bfloat16)
    a = _fwd_bwd("reference", q, k, v, routed)
    b = _fwd_bwd("compact", q, k, v, routed)
    assert a[0].dtype == torch.bfloat16 and b[0].dtype == torch.bfloat16
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("impl", ["reference", "compact", "auto"])
def test_nothing_routed(impl):
    q, k, v, routed = _inputs(B=2, T=9)
    o, gq, gk, gv = _fwd_bwd(impl, q, k, v, torch.zeros_like(routed))
    assert (o == 0).all()
    for g in (gq, gk, gv):
        assert g is not None and torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("impl", ["reference", "compact"])
def test_everything_routed_is_causal_sdpa(impl):
    q, k, v, routed = _inputs(B=2, T=29, H=3, K=8, V=8)
    routed = torch.ones_like(routed)
    o, gq, gk, gv = _fwd_bwd(impl, q, k, v, routed, scale=0.3)
    q2, k2, v2 = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    ref = F.scaled_dot_product_attention(q2.transpose(1, 2), k2.transpose(1, 2), v2.transpose(1, 2),
                                         is_causal=True, scale=0.3).transpose(1, 2)
    (ref * torch.linspace(-1, 1, ref.numel()).view(ref.shape)).sum().backward()
    for a, b in zip((o, gq, gk, gv), (ref, q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "compact"])
def test_t1_h1(impl):
    q, k, v, _ = _inputs(B=2, T=1, H=1)
    routed = torch.tensor([[True], [False]])
    o = scratchpad_attention(q, k, v, routed, impl=impl)
    torch.testing.assert_close(o[0], v[0])  # softmax over one key
    assert (o[1] == 0).all()


def test_own_token_only_if_routed():
    q, k, v, _ = _inputs(B=1, T=4, H=1)
    routed = torch.tensor([[False, True, False, False]])
    for impl in ("reference", "compact"):
        o = scratchpad_attention(q, k, v, routed, impl=impl)
        assert (o[0, 0] == 0).all()
        for t in (1, 2, 3):  # only key 1 visible
            torch.testing.assert_close(o[0, t], v[0, 1])


def test_cu_seqlens_documents():
    q, k, v, routed = _inputs(B=1, T=40, H=2, frac=0.5)
    cu = torch.tensor([0, 1, 13, 14, 30, 40], dtype=torch.int32)  # includes 1-token documents
    routed[0, 0] = True
    routed[0, 13] = False
    ref = _loop_definition(q, k, v, routed, 8 ** -0.5, cu)
    a = _fwd_bwd("reference", q, k, v, routed, cu_seqlens=cu)
    b = _fwd_bwd("compact", q, k, v, routed, cu_seqlens=cu)
    torch.testing.assert_close(a[0].double(), ref, atol=1e-5, rtol=1e-5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[0][0, 0], v[0, 0])  # 1-token document, routed: sees itself
    assert (a[0][0, 13] == 0).all()  # 1-token document, not routed: zero
    # a document is independent of the others: run document 3 alone
    d = slice(14, 30)
    alone = scratchpad_attention(q[:, d], k[:, d], v[:, d], routed[:, d], impl="reference")
    torch.testing.assert_close(a[0][:, d], alone, atol=1e-6, rtol=1e-6)
    # compact with small blocks crossing document starts
    o = _compact(q, k, v, routed, 8 ** -0.5, _doc_ids(cu, 1, 40, q.device), block=7)
    torch.testing.assert_close(o, a[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "compact"])
def test_gradcheck_float64(impl):
    q, k, v, routed = _inputs(B=2, T=6, H=2, K=3, V=2, dtype=torch.float64, seed=3)
    routed[0] = torch.tensor([False, True, False, True, True, False])
    routed[1] = torch.tensor([False, False, False, False, True, False])
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: scratchpad_attention(a, b, c, routed, impl=impl),
                                    (q, k, v))
    cu = torch.tensor([0, 2, 3, 6])
    args = tuple(x[:1].detach().clone().requires_grad_(True) for x in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: scratchpad_attention(a, b, c, routed[:1] | True, impl=impl, cu_seqlens=cu), args)


def test_bad_input():
    q, k, v, routed = _inputs(B=2, T=5)
    with pytest.raises(ValueError, match=r"q must have shape \[B,T,H,K\]"):
        scratchpad_attention(q[0], k, v, routed)
    with pytest.raises(ValueError, match=r"k must have shape \[B,T,H,K\]"):
        scratchpad_attention(q, k[:, :4], v, routed)
    with pytest.raises(ValueError, match=r"v must have shape \[B,T,H,V\]"):
        scratchpad_attention(q, k, v[:, :, :2], routed)
    with pytest.raises(ValueError, match=r"routed must be a bool tensor of shape \[B,T\]"):
        scratchpad_attention(q, k, v, routed.float())
    with pytest.raises(ValueError, match=r"routed must have shape \[B,T\]"):
        scratchpad_attention(q, k, v, routed[:, :, None])
    with pytest.raises(ValueError, match=r"cu_seqlens requires batch size B == 1"):
        scratchpad_attention(q, k, v, routed, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match=r"cu_seqlens must be non-decreasing from 0 to T=5"):
        scratchpad_attention(q[:1], k[:1], v[:1], routed[:1], cu_seqlens=torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match=r"cu_seqlens must be a 1-D integer tensor"):
        scratchpad_attention(q[:1], k[:1], v[:1], routed[:1], cu_seqlens=torch.tensor([0.0, 5.0]))
    with pytest.raises(ValueError, match=r"impl must be one of"):
        scratchpad_attention(q, k, v, routed, impl="flash")


@pytest.mark.parametrize("packed", [False, True])
def test_flex_plan_and_eager_flex_match_reference_on_cpu(packed):
    """The GPU path's staircase plan and BlockMask, run by FlexAttention's eager (CPU) path,
    equal the reference forward; the key-side lists the backward reads are the transposes
    FlexAttention itself derives, and contiguous."""
    from torch.nn.attention.flex_attention import _transpose_ordered

    from megatron_ham.kernels import scratchpad as sp

    T = 3 * sp.BLOCK + 50
    q, k, v, routed = _inputs(B=1, T=T, H=2, K=16, V=16, frac=0.3, seed=4)
    cu = torch.tensor([0, 100, 290, T]) if packed else None
    doc = (None, None) if cu is None else sp._doc_info(cu, T, "cpu")
    order, pos_c, kv, full, qb, fq = sp.staircase_plan(routed, *doc)
    for side, mine in ((kv, qb), (full, fq)):
        theirs = _transpose_ordered(*side)
        assert torch.equal(mine[0], theirs[0])
        for r in range(mine[0].shape[-1]):
            n = int(mine[0][0, 0, r])
            assert torch.equal(mine[1][0, 0, r, :n], theirs[1][0, 0, r, :n])
        assert mine[0].is_contiguous() and mine[1].is_contiguous()

    with torch.no_grad():  # FlexAttention has no CPU backward; the GPU test covers gradients
        ref = scratchpad_attention(q, k, v, routed, impl="reference", cu_seqlens=cu)
        got = sp.scratchpad_attention_flex(q, k, v, routed, cu_seqlens=cu, compiled=False)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def _cache_of(k, v, keep):
    """Compact the kept keys of each row in position order, padded: (k_p, v_p, valid)."""
    B, T = keep.shape
    n = max(int(keep.sum(1).max()), 1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :n]
    take = lambda x: x.gather(1, order[:, :, None, None].expand(B, n, *x.shape[2:]))  # noqa: E731
    return take(k), take(v), keep.gather(1, order)


@pytest.mark.parametrize("impl", ["reference", "compact"])
def test_decode_over_cached_keys_is_the_same_op(impl):
    """Prefill in two blocks and token-by-token decoding (past = the cached routed keys of the
    document that goes on, doc_ids relative to it) == one call over the whole rows."""
    q, k, v, routed = _inputs(B=2, T=30, H=2, frac=0.5, seed=3)
    doc = torch.zeros(2, 30, dtype=torch.long)
    doc[0, 12:] = 1  # row 0: a document starts at 12
    doc[1, 5:] = 1
    doc[1, 20:] = 2
    full = scratchpad_attention(q, k, v, routed, doc_ids=doc, impl=impl)
    # per-row reference through cu_seqlens (B = 1)
    for b in range(2):
        cu = torch.tensor([0] + [int(i) for i in torch.nonzero(doc[b, 1:] != doc[b, :-1]).flatten() + 1] + [30])
        one = scratchpad_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], routed[b:b + 1], cu_seqlens=cu, impl=impl)
        torch.testing.assert_close(one[0], full[b], atol=1e-6, rtol=1e-6)
    for t0 in (14, 22, 29):
        last = doc[:, t0 - 1:t0]
        past = _cache_of(k[:, :t0], v[:, :t0], routed[:, :t0] & (doc[:, :t0] == last))
        rel = doc[:, t0:] - last
        got = scratchpad_attention(q[:, t0:], k[:, t0:], v[:, t0:], routed[:, t0:], doc_ids=rel,
                                   past=past, impl=impl)
        torch.testing.assert_close(got, full[:, t0:], atol=1e-6, rtol=1e-6)
    # decode: one query at a time over everything cached so far
    for t in range(1, 30):
        same = doc[:, :t] == doc[:, t:t + 1]
        past = _cache_of(k[:, :t], v[:, :t], routed[:, :t] & same)
        got = scratchpad_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], routed[:, t:t + 1],
                                   past=past, impl=impl)
        torch.testing.assert_close(got, full[:, t:t + 1], atol=1e-6, rtol=1e-6)


def test_past_and_doc_ids_validation():
    q, k, v, routed = _inputs(B=2, T=5, H=2)
    with pytest.raises(ValueError, match="past"):
        scratchpad_attention(q, k, v, routed, past=(k, v))
    with pytest.raises(ValueError, match="past valid"):
        scratchpad_attention(q, k, v, routed, past=(k, v, routed.float()))
    with pytest.raises(ValueError, match="doc_ids"):
        scratchpad_attention(q, k, v, routed, doc_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="not both"):
        scratchpad_attention(q[:1], k[:1], v[:1], routed[:1], doc_ids=torch.zeros(1, 5, dtype=torch.long),
                             cu_seqlens=torch.tensor([0, 5]))
