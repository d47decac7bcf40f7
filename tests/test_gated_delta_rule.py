"""Tests of megatron_ham.ops.gated_delta_rule (CPU): chunk vs naive, gradients, fla's reference,
the prediction error against an explicit computation, cu_seqlens packing and input validation."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from megatron_ham.ops import gated_delta_rule

gdr_module = importlib.import_module("megatron_ham.ops.gated_delta_rule")


def make_inputs(B, T, H, K, V, *, dtype=torch.float32, seed=0, h0=False, N=None, beta_zero=False):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    g = -(torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.4 + 0.02)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    if beta_zero:
        beta[:, ::3] = 0.0
    out = dict(q=q, k=k, v=v, g=g, beta=beta)
    if h0:
        out["initial_state"] = torch.randn(N or B, H, K, V, generator=gen, dtype=torch.float64)
    return {n: x.to(dtype) for n, x in out.items()}


def run(impl, inp, **kw):
    kw.setdefault("output_final_state", True)
    kw.setdefault("return_error", True)
    return gated_delta_rule(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"],
                            initial_state=inp.get("initial_state"), impl=impl, **kw)


def explicit_reference(q, k, v, g, beta, scale, h0=None):
    """Independent float64 per-token loop with the state stored as M = S^T ([V, K]) and the
    'S (I - beta k k^T)' form of the update. Returns o, final state [B,H,K,V], err_l2, err_cos."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    Vd = v.shape[-1]
    o = torch.zeros(B, T, H, Vd, dtype=torch.float64)
    el2 = torch.zeros(B, T, H, dtype=torch.float64)
    ecos = torch.zeros(B, T, H, dtype=torch.float64)
    eye = torch.eye(K, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            M = torch.zeros(Vd, K, dtype=torch.float64) if h0 is None else h0[b, h].double().T.clone()
            for t in range(T):
                a = torch.exp(g[b, t, h])
                kt, vt = k[b, t, h], v[b, t, h]
                pred = a * (M @ kt)
                el2[b, t, h] = torch.linalg.vector_norm(vt - pred)
                if torch.linalg.vector_norm(pred) == 0 or torch.linalg.vector_norm(vt) == 0:
                    ecos[b, t, h] = 1.0
                else:
                    ecos[b, t, h] = 1.0 - F.cosine_similarity(pred, vt, dim=0)
                M = a * M @ (eye - beta[b, t, h] * torch.outer(kt, kt)) + beta[b, t, h] * torch.outer(vt, kt)
                o[b, t, h] = scale * (M @ q[b, t, h])
            o_final = M.T
            if h == 0 and b == 0:
                finals = torch.zeros(B, H, K, Vd, dtype=torch.float64)
            finals[b, h] = o_final
    return o, finals, el2, ecos


# ------------------------------------------------------------------------------------------
# chunk vs naive
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "B,T,H,K,V,h0",
    [
        (2, 1, 3, 8, 8, False),      # T = 1
        (1, 1, 1, 8, 4, True),       # T = 1 with initial state
        (2, 150, 2, 16, 24, True),   # T not a multiple of 64, 3 chunks, K != V
        (1, 64, 1, 16, 16, False),   # exactly one chunk, H = 1
        (1, 130, 1, 8, 8, True),     # H = 1, padding in the last chunk
    ],
)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_chunk_matches_naive_fp32(B, T, H, K, V, h0, metric):
    inp = make_inputs(B, T, H, K, V, h0=h0, seed=T + H)
    o_n, s_n, e_n = run("naive", inp, error_metric=metric)
    o_c, s_c, e_c = run("chunk", inp, error_metric=metric)
    assert o_n.shape == (B, T, H, V) and o_n.dtype == torch.float32
    assert s_n.shape == (B, H, K, V) and s_n.dtype == torch.float32
    assert e_n.shape == (B, T, H) and e_n.dtype == torch.float32
    torch.testing.assert_close(o_c, o_n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_c, s_n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e_c, e_n, atol=1e-5, rtol=1e-5)
    # "auto" is the chunked path on CPU.
    o_a, s_a, e_a = run("auto", inp, error_metric=metric)
    torch.testing.assert_close(o_a, o_c, atol=0, rtol=0)


def test_chunk_matches_naive_with_zero_beta():
    # Tokens with beta == 0 write nothing; their error must still be exact (no division by beta).
    inp = make_inputs(1, 100, 2, 8, 8, h0=True, beta_zero=True, seed=3)
    _, s_n, e_n = run("naive", inp)
    _, s_c, e_c = run("chunk", inp)
    assert torch.isfinite(e_c).all()
    assert (e_c[:, ::3] > 1e-3).all()
    torch.testing.assert_close(e_c, e_n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_c, s_n, atol=1e-5, rtol=1e-5)


def test_chunk_matches_naive_bf16():
    inp = make_inputs(2, 100, 2, 16, 16, dtype=torch.bfloat16, h0=True, seed=5)
    o_n, s_n, e_n = run("naive", inp)
    o_c, s_c, e_c = run("chunk", inp)
    assert o_n.dtype == torch.bfloat16 and o_c.dtype == torch.bfloat16
    assert s_c.dtype == torch.float32 and e_c.dtype == torch.float32
    torch.testing.assert_close(o_c.float(), o_n.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(s_c, s_n, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(e_c, e_n, atol=1e-3, rtol=1e-3)
    # And both are close to the fp32 computation of the same (bf16-rounded) inputs.
    o_ref, _, _ = run("naive", {n: x.float() for n, x in inp.items()})
    torch.testing.assert_close(o_c.float(), o_ref, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl,chunk", [("naive", 64), ("chunk", 16), ("chunk", 4)])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_gradcheck_float64(impl, chunk, metric, monkeypatch):
    monkeypatch.setattr(gdr_module, "CHUNK_SIZE", chunk)
    inp = make_inputs(1, 10, 2, 3, 3, dtype=torch.float64, h0=True, seed=11)
    names = ["q", "k", "v", "g", "beta", "initial_state"]
    args = tuple(inp[n].clone().requires_grad_(True) for n in names)

    def fn(q, k, v, g, beta, h0):
        return gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                return_error=True, error_metric=metric, impl=impl)

    out = fn(*args)
    assert out[0].dtype == torch.float64 and out[1].dtype == torch.float64 and out[2].dtype == torch.float64
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradients_agree_between_impls():
    inp = make_inputs(2, 90, 2, 8, 6, h0=True, seed=13)
    gen = torch.Generator().manual_seed(1)
    w_o = torch.randn(2, 90, 2, 6, generator=gen)
    w_s = torch.randn(2, 2, 8, 6, generator=gen)
    w_e = torch.randn(2, 90, 2, generator=gen)
    grads = {}
    for impl in ("naive", "chunk"):
        leaves = {n: x.clone().requires_grad_(True) for n, x in inp.items()}
        o, s, e = run(impl, leaves)
        ((o * w_o).sum() + (s * w_s).sum() + (e * w_e).sum()).backward()
        grads[impl] = {n: x.grad for n, x in leaves.items()}
    for n in inp:
        torch.testing.assert_close(grads["chunk"][n], grads["naive"][n], atol=1e-4, rtol=1e-4, msg=n)


# ------------------------------------------------------------------------------------------
# against fla's reference and an explicit computation
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h0,scale", [(False, None), (True, 0.3)])
def test_naive_matches_fla_reference(h0, scale):
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    inp = make_inputs(2, 37, 3, 8, 12, h0=h0, seed=17)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(
        q=inp["q"], k=inp["k"], v=inp["v"], beta=inp["beta"], g=inp["g"], scale=scale,
        initial_state=inp.get("initial_state"), output_final_state=True,
    )
    for impl in ("naive", "chunk"):
        o, s, _ = run(impl, inp, scale=scale)
        torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("h0", [False, True])
def test_err_matches_explicit_computation(h0):
    inp = make_inputs(2, 20, 2, 4, 5, h0=h0, seed=19)
    scale = 0.7
    o_x, s_x, el2, ecos = explicit_reference(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"],
                                             scale, inp.get("initial_state"))
    for impl in ("naive", "chunk"):
        o, s, e = run(impl, inp, scale=scale)
        torch.testing.assert_close(o.double(), o_x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s.double(), s_x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(e.double(), el2, atol=1e-5, rtol=1e-5)
        _, _, ec = run(impl, inp, scale=scale, error_metric="cosine")
        torch.testing.assert_close(ec.double(), ecos, atol=1e-5, rtol=1e-5)
    if not h0:
        # First token: zero state -> error is ||v_0||, cosine error is exactly 1 (cos := 0).
        torch.testing.assert_close(el2[:, 0], torch.linalg.vector_norm(inp["v"][:, 0].double(), dim=-1))
        assert (ecos[:, 0] == 1.0).all()


def test_cosine_first_token_is_one_and_range():
    inp = make_inputs(2, 30, 2, 8, 8, seed=23)
    for impl in ("naive", "chunk"):
        _, _, e = run(impl, inp, error_metric="cosine")
        assert (e[:, 0] == 1.0).all()
        assert (e >= -1e-6).all() and (e <= 2 + 1e-6).all()
        assert (e[:, 1:] != 1.0).any()


@pytest.mark.parametrize("impl", ["naive", "chunk"])
def test_empty_sequence_keeps_state(impl):
    inp = make_inputs(1, 0, 2, 4, 3, h0=True, seed=30)
    o, s, e = run(impl, inp)
    assert o.shape == (1, 0, 2, 3) and e.shape == (1, 0, 2)
    torch.testing.assert_close(s, inp["initial_state"])


def test_flags_off_return_none():
    inp = make_inputs(1, 5, 1, 4, 4, seed=29)
    o, s, e = run("chunk", inp, output_final_state=False, return_error=False)
    assert s is None and e is None and o.shape == (1, 5, 1, 4)


# ------------------------------------------------------------------------------------------
# cu_seqlens
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["naive", "chunk"])
@pytest.mark.parametrize("h0", [False, True])
def test_cu_seqlens_restarts_state(impl, h0):
    lens = [5, 1, 70, 0, 3]   # includes a 1-token and an empty document
    T, H, K, V = sum(lens), 2, 8, 6
    N = len(lens)
    inp = make_inputs(1, T, H, K, V, h0=h0, N=N, seed=31)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    o, s, e = run(impl, inp, cu_seqlens=cu)
    assert o.shape == (1, T, H, V) and s.shape == (N, H, K, V) and e.shape == (1, T, H)
    for n in range(N):
        a, b = int(cu[n]), int(cu[n + 1])
        doc = {x: inp[x][:, a:b] for x in ("q", "k", "v", "g", "beta")}
        if h0:
            doc["initial_state"] = inp["initial_state"][n : n + 1]
        if b == a:
            want = inp["initial_state"][n] if h0 else torch.zeros(H, K, V)
            torch.testing.assert_close(s[n], want)
            continue
        o_d, s_d, e_d = run("naive", doc)
        torch.testing.assert_close(o[:, a:b], o_d, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s[n : n + 1], s_d, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(e[:, a:b], e_d, atol=1e-5, rtol=1e-5)
    # The restart matters: without cu_seqlens the later documents come out differently.
    if not h0:
        o_flat, _, _ = run(impl, inp)
        assert not torch.allclose(o_flat[:, 6:], o[:, 6:], atol=1e-3)


@pytest.mark.parametrize("impl", ["naive", "chunk"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_mask_skips_tokens(impl, metric):
    """mask False = no token: each row gives, at its real tokens, what its real tokens give alone
    (o, err, and the final state); the error is 0 at the skipped tokens; padding anywhere."""
    T, H, K, V = 90, 2, 8, 6
    inp = make_inputs(2, T, H, K, V, h0=True, seed=5)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, :17] = False           # left padding
    mask[1, 70:] = False           # right padding
    mask[1, 30:33] = False         # and a gap
    o, s, e = run(impl, inp, mask=mask, error_metric=metric)
    for b in range(2):
        real = {x: inp[x][b:b + 1, mask[b]] for x in ("q", "k", "v", "g", "beta")}
        real["initial_state"] = inp["initial_state"][b:b + 1]
        o_r, s_r, e_r = run("naive", real, error_metric=metric)
        torch.testing.assert_close(o[b:b + 1, mask[b]], o_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(e[b:b + 1, mask[b]], e_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s[b:b + 1], s_r, atol=1e-5, rtol=1e-5)
        assert not e[b, ~mask[b]].any()
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        run(impl, inp, mask=mask.long())
    with pytest.raises(ValueError, match=r"mask must have shape \[B,T\]"):
        run(impl, inp, mask=mask[:, 1:])


def test_cu_seqlens_host_copy_changes_nothing():
    """cu_seqlens_cpu (the boundaries' host copy the layers pass) gives the same result; its
    values are checked in place of a device cu_seqlens'."""
    lens = [5, 1, 70, 0, 3]
    inp = make_inputs(1, sum(lens), 2, 8, 6, seed=7)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    for impl in ("naive", "chunk"):
        want = run(impl, inp, cu_seqlens=cu)
        got = run(impl, inp, cu_seqlens=cu, cu_seqlens_cpu=cu.clone())
        for a, b in zip(want, got):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    bad = cu.clone()
    bad[2] = 3  # decreasing
    with pytest.raises(ValueError, match="non-decreasing"):
        run("chunk", inp, cu_seqlens=cu, cu_seqlens_cpu=bad)


def test_cu_seqlens_gradients_agree():
    lens = [3, 1, 9]
    inp = make_inputs(1, sum(lens), 1, 4, 4, h0=True, N=3, seed=37)
    cu = torch.tensor([0, 3, 4, 13])
    grads = {}
    for impl in ("naive", "chunk"):
        leaves = {n: x.clone().requires_grad_(True) for n, x in inp.items()}
        o, s, e = run(impl, leaves, cu_seqlens=cu)
        (o.square().sum() + s.sum() + e.sum()).backward()
        grads[impl] = {n: x.grad for n, x in leaves.items()}
    for n in inp:
        torch.testing.assert_close(grads["chunk"][n], grads["naive"][n], atol=1e-4, rtol=1e-4, msg=n)


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------
def _bad_cases():
    B, T, H, K, V = 2, 16, 4, 8, 6

    def base():
        return make_inputs(B, T, H, K, V, seed=41)

    cases = []

    def case(name, arg, mutate):
        cases.append(pytest.param(arg, mutate, id=name))

    case("q_rank", "q", lambda d: d.update(q=d["q"][0]))
    case("k_shape", "k", lambda d: d.update(k=d["k"][..., :5]))
    case("k_T", "k", lambda d: d.update(k=d["k"][:, :8]))
    case("v_H", "v", lambda d: d.update(v=d["v"][:, :, :2]))
    case("v_B", "v", lambda d: d.update(v=d["v"][:1]))
    case("g_shape", "g", lambda d: d.update(g=d["g"][..., None]))
    case("beta_T", "beta", lambda d: d.update(beta=d["beta"][:, 1:]))
    case("q_int", "q", lambda d: d.update(q=d["q"].long()))
    case("beta_int", "beta", lambda d: d.update(beta=torch.ones(B, T, H, dtype=torch.int64)))
    case("g_positive", "g", lambda d: d["g"].__setitem__((1, 3, 2), 0.1))
    case("h0_shape", "initial_state", lambda d: d.update(initial_state=torch.zeros(B, H, V, K)))
    case("h0_int", "initial_state", lambda d: d.update(initial_state=torch.zeros(B, H, K, V, dtype=torch.int32)))
    case("impl", "impl", lambda d: d.update(impl="fast"))
    case("metric", "error_metric", lambda d: d.update(error_metric="l1"))
    case("scale", "scale", lambda d: d.update(scale="big"))
    case("cu_B", "cu_seqlens", lambda d: d.update(cu_seqlens=torch.tensor([0, 8, 16])))

    def packed(cu):
        def m(d):
            for n in ("q", "k", "v", "g", "beta"):
                d[n] = d[n][:1]
            d["cu_seqlens"] = cu
        return m

    case("cu_start", "cu_seqlens", packed(torch.tensor([1, 8, 16])))
    case("cu_end", "cu_seqlens", packed(torch.tensor([0, 8, 15])))
    case("cu_order", "cu_seqlens", packed(torch.tensor([0, 9, 8, 16])))
    case("cu_float", "cu_seqlens", packed(torch.tensor([0.0, 8.0, 16.0])))
    case("cu_rank", "cu_seqlens", packed(torch.tensor([[0, 8, 16]])))

    def packed_h0(d):
        packed(torch.tensor([0, 8, 16]))(d)
        d["initial_state"] = torch.zeros(3, H, K, V)   # needs N = 2

    case("cu_h0_N", "initial_state", packed_h0)
    return base, cases


_BASE, _CASES = _bad_cases()


@pytest.mark.parametrize("arg,mutate", _CASES)
def test_bad_input_raises_value_error_naming_argument(arg, mutate):
    d = _BASE()
    mutate(d)
    kw = {n: d.pop(n) for n in ("initial_state", "impl", "error_metric", "scale", "cu_seqlens") if n in d}
    with pytest.raises(ValueError) as ei:
        gated_delta_rule(d["q"], d["k"], d["v"], d["g"], d["beta"], **kw)
    assert str(ei.value).startswith(arg + " "), str(ei.value)


def test_shape_message_states_expected_shape():
    d = make_inputs(2, 16, 4, 8, 6)
    with pytest.raises(ValueError, match=r"k must have shape \[B,T,H,K\] = \[2,16,4,8\], got \[2, 16, 4, 5\]"):
        gated_delta_rule(d["q"], d["k"][..., :5], d["v"], d["g"], d["beta"])
