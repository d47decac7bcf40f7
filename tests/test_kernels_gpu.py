"""Parity of the GPU paths (megatron_ham.kernels) with the CPU references (megatron_ham.ops).

Every test is marked `gpu` (skipped without CUDA). The references run on the same GPU tensors in
float32 (the ops upcast internally): gated_delta_rule impl="chunk" (validated against the naive
recurrence by tests/test_gated_delta_rule.py) and scratchpad_attention impl="reference" (T=1024)
or impl="compact" (T=16384, where a [T,T] mask per head would be large); both GPU scratchpad paths
(the Triton staircase kernel and FlexAttention) are checked against them. Inputs are bf16; outputs
and gradients are compared by ||a - b|| / ||b||, with bf16 tolerances. T = 1024 and 16384, with
and without packed documents (cu_seqlens, including a one-token document). The routing error of
the GPU path is detached (no gradient), so only its values are compared.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

DEV = "cuda"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values in the GPU result"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _cu(T: int, packed: bool):
    if not packed:
        return None
    # uneven documents, one of length 1, boundaries not on chunk (64) or block (128) edges
    cuts = [0, T // 3 + 5, T // 3 + 6, (3 * T) // 4 - 7, T]
    return torch.tensor(cuts, dtype=torch.int32, device=DEV)


def _gdn_inputs(T: int, H: int, K: int, V: int, n_state: int, seed: int):
    g_ = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g_, device=DEV)  # noqa: E731
    q = F.normalize(r(1, T, H, K), dim=-1).bfloat16()
    k = F.normalize(r(1, T, H, K), dim=-1).bfloat16()
    v = r(1, T, H, V).bfloat16()
    g = F.logsigmoid(r(1, T, H) + 3.0)                       # decays mostly near 1
    beta = torch.sigmoid(r(1, T, H)).bfloat16()
    beta[torch.rand(1, T, H, generator=g_, device=DEV) < 0.1] = 0.0   # beta == 0: err must not blow up
    h0 = 0.1 * r(n_state, H, K, V)
    return q, k, v, g, beta, h0


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("T", [1024, 16384])
def test_gdn_with_error_matches_reference(T, packed, metric):
    from megatron_ham.kernels.gdn import gdn_with_error
    from megatron_ham.ops.gated_delta_rule import gated_delta_rule

    if metric == "cosine" and T > 1024:
        pytest.skip("cosine metric checked at T=1024 only (same kernel, other reduction)")
    H, K, V = 16, 128, 128  # the benchmark's shapes (shares fla's autotune results)
    cu = _cu(T, packed)
    n = 1 if cu is None else cu.numel() - 1
    q, k, v, g, beta, h0 = _gdn_inputs(T, H, K, V, n, seed=T + packed)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, beta, h0)]
    o, ht, err = gdn_with_error(*leaves[:5], initial_state=leaves[5], output_final_state=True,
                                return_error=True, error_metric=metric, cu_seqlens=cu)
    assert o.shape == (1, T, H, V) and o.dtype == torch.bfloat16
    assert ht.shape == (n, H, K, V) and ht.dtype == torch.float32
    assert err.shape == (1, T, H) and err.dtype == torch.float32 and not err.requires_grad
    do = torch.randn_like(o)
    dht = torch.randn_like(ht)
    torch.autograd.backward([o, ht], [do, dht])

    refs = [x.detach().float().clone().requires_grad_(True) for x in (q, k, v, g, beta, h0)]
    o_r, ht_r, err_r = gated_delta_rule(*refs[:5], initial_state=refs[5], output_final_state=True,
                                        return_error=True, error_metric=metric, cu_seqlens=cu,
                                        impl="chunk")
    torch.autograd.backward([o_r, ht_r], [do.float(), dht])

    errs = {"o": rel(o, o_r), "final_state": rel(ht, ht_r), "err": rel(err, err_r)}
    grads = {name: rel(a.grad, b.grad)
             for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), leaves, refs)}
    assert max(errs.values()) < 2e-2 and max(grads.values()) < 3e-2, (errs, grads)
    # per-token check too: no token's error is far off (e.g. where beta == 0)
    assert (err - err_r).abs().max().item() < 0.1 * err_r.abs().max().item()


@pytest.mark.parametrize("case", ["plain", "documents, states, error"])
def test_gdn_equals_fla(case):
    """Our autograd.Function gives fla's own output, final state and gradients: its forward calls
    fla's stages and keeps w, h, v_new for its backward, which calls fla's backward stages on
    them (fla's chunk_gated_delta_rule recomputes them); the routing error changes nothing."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    from megatron_ham.kernels.gdn import gdn_with_error

    T = 2048
    cu = None if case == "plain" else _cu(T, True).long()
    n = 1 if cu is None else cu.numel() - 1
    q, k, v, g, beta, h0 = _gdn_inputs(T, 16, 128, 128, n, seed=7)
    states = case != "plain"
    a = [x.clone().requires_grad_(True) for x in (q, k, v, g, beta, h0)]
    b = [x.clone().requires_grad_(True) for x in (q, k, v, g, beta, h0)]
    o1, ht1, e1 = gdn_with_error(*a[:5], initial_state=a[5] if states else None,
                                 output_final_state=states, return_error=states, cu_seqlens=cu)
    assert (e1 is None) == (not states)
    o2, ht2 = chunk_gated_delta_rule(q=b[0], k=b[1], v=b[2], g=b[3], beta=b[4],
                                     initial_state=b[5] if states else None,
                                     output_final_state=states, cu_seqlens=cu)
    do = torch.randn_like(o1)
    if states:
        dht = torch.randn_like(ht1)
        torch.autograd.backward([o1, ht1], [do, dht])
        torch.autograd.backward([o2, ht2], [do, dht])
        assert rel(ht1, ht2) < 1e-3
    else:
        o1.backward(do)
        o2.backward(do)
    assert rel(o1, o2) < 1e-3
    names = ("dq", "dk", "dv", "dg", "dbeta", "dh0")[: 6 if states else 5]
    grads = {name: rel(x.grad, y.grad) for name, x, y in zip(names, a, b)}
    assert max(grads.values()) < 1e-3, grads


def _routed(T: int, frac, gen, cu):
    """routed [1,T]; frac "blind": 30% routed but none in the first T/8 tokens nor in the first
    T/16 of every document, so those queries see no key (o = 0, dq = 0)."""
    if frac != "blind":
        return torch.rand(1, T, generator=gen, device=DEV) < frac
    routed = torch.rand(1, T, generator=gen, device=DEV) < 0.3
    routed[:, : T // 8] = False
    for s in ([] if cu is None else cu[1:-1].tolist()):
        routed[:, s: s + T // 16] = False
    return routed


def _scratchpad_parity(fn, T, packed, frac):
    """fn(q, k, v, routed, cu_seqlens=) in bf16 vs the fp32 reference (impl "reference" at
    T <= 1024, "compact" above): output, dq, dk, dv; exact zeros where nothing is visible."""
    from megatron_ham.ops.scratchpad import scratchpad_attention

    H, D = 16, 128
    cu = _cu(T, packed)
    gen = torch.Generator(device=DEV).manual_seed(11 + T + packed)
    q, k, v = (torch.randn(1, T, H, D, generator=gen, device=DEV).bfloat16() for _ in range(3))
    routed = _routed(T, frac, gen, cu)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o = fn(*leaves, routed, cu_seqlens=cu)
    assert o.shape == (1, T, H, D)
    do = torch.randn_like(o)
    o.backward(do)

    refs = [x.detach().float().clone().requires_grad_(True) for x in (q, k, v)]
    impl = "reference" if T <= 1024 else "compact"
    o_r = scratchpad_attention(*refs, routed, cu_seqlens=cu, impl=impl)
    o_r.backward(do.float())
    if frac == 0.0:
        assert o.abs().max().item() == 0.0
        for x in leaves:
            assert x.grad.abs().max().item() == 0.0
        return
    errs = {"o": rel(o, o_r)}
    errs.update({name: rel(a.grad, b.grad) for name, a, b in zip(("dq", "dk", "dv"), leaves, refs)})
    assert errs["o"] < 2e-2 and max(errs.values()) < 3e-2, errs
    # unrouted keys get no gradient
    if (~routed).any():
        assert leaves[1].grad[0, ~routed[0]].abs().max().item() == 0.0
        assert leaves[2].grad[0, ~routed[0]].abs().max().item() == 0.0
    # queries that see no routed key: exactly 0 and no gradient
    blind = (o_r.detach() == 0).all(-1).all(-1)[0]                      # [T]
    if blind.any():
        assert o[0, blind].abs().max().item() == 0.0
        assert leaves[0].grad[0, blind].abs().max().item() == 0.0


@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("T", [1024, 16384])
def test_scratchpad_flex_matches_reference(T, packed, frac):
    from megatron_ham.kernels.scratchpad import scratchpad_attention_flex

    if T > 1024 and frac != 0.3:
        pytest.skip("edge fractions checked at T=1024")
    _scratchpad_parity(scratchpad_attention_flex, T, packed, frac)


@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0, "blind"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("T", [1024, 16384])
def test_scratchpad_triton_matches_reference(T, packed, frac):
    """The staircase kernel (what impl="auto" runs on CUDA) against the reference."""
    from megatron_ham.kernels.staircase import scratchpad_attention_triton

    _scratchpad_parity(scratchpad_attention_triton, T, packed, frac)


@pytest.mark.parametrize("split", ["auto", 2])
@pytest.mark.parametrize("packed", [False, True])
def test_scratchpad_triton_split_walks_match_reference(packed, split):
    """f = 0.05 at 16k: few slot blocks, so the dk/dv kernel splits their query walks over several
    programs (the default rule, and 2 pieces forced); the fp32 scratch is left zero."""
    from functools import partial

    from megatron_ham.kernels import staircase as st

    T, BH = 16384, 16
    tiles = None if split == "auto" else {"split": split}
    plan = st.split_plan(tiles, T, BH, torch.device(DEV, torch.cuda.current_device()))
    assert plan.n_max > 1 and plan.s_cap >= 0.05 * T      # this routing is split
    _scratchpad_parity(partial(st.scratchpad_attention_triton, tiles=tiles), T, packed, 0.05)
    torch.cuda.synchronize()
    assert st._SPLIT_SCRATCH
    for acc, locks in st._SPLIT_SCRATCH.values():
        assert acc.abs().max().item() == 0.0 and locks.abs().max().item() == 0


def _triton_compilations() -> int:
    from megatron_ham.kernels import staircase as st

    fns = (st._compaction_kernel, st._staircase_fwd_kernel, st._staircase_dq_kernel, st._staircase_dkdv_kernel)
    return sum(len(c[0]) for fn in fns for c in fn.device_caches.values())


def test_scratchpad_triton_does_not_recompile_per_routing():
    """New routings (any routed count, with and without documents) reuse the compiled kernels."""
    from megatron_ham.kernels.staircase import scratchpad_attention_triton

    T, H, D = 1024, 16, 128  # the parity tests' shapes: compiled (and tuned) already
    q, k, v = (torch.randn(1, T, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))

    def step(frac, cu):
        routed = torch.rand(1, T, device=DEV) < frac
        scratchpad_attention_triton(q, k, v, routed, cu_seqlens=cu).sum().backward()

    for cu in (None, _cu(T, True)):
        step(0.5, cu)
    torch.cuda.synchronize()
    before = _triton_compilations()
    for cu in (None, _cu(T, True), torch.tensor([0, 100, T], device=DEV, dtype=torch.int32)):
        for frac in (0.0, 0.1, 0.25, 0.7, 1.0):
            step(frac, cu)
    torch.cuda.synchronize()
    assert _triton_compilations() == before > 0


def test_scratchpad_flex_does_not_recompile_per_routing():
    """New routing patterns (same shapes) reuse the compiled kernels: no new dynamo graphs."""
    import torch._dynamo.utils as du

    from megatron_ham.kernels.scratchpad import scratchpad_attention_flex

    T, H, D = 1024, 16, 128  # the parity tests' shapes: compiled once already
    q, k, v = (torch.randn(1, T, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))

    def step(frac):
        routed = torch.rand(1, T, device=DEV) < frac
        scratchpad_attention_flex(q, k, v, routed).sum().backward()

    step(0.5)
    before = du.counters["stats"]["unique_graphs"]
    for frac in (0.1, 0.25, 0.7, 0.5):
        step(frac)
    torch.cuda.synchronize()
    assert du.counters["stats"]["unique_graphs"] == before


@pytest.mark.parametrize("packed", [False, True])
def test_staircase_plan_compiled_equals_eager(packed):
    """The torch.compile'd plan (Triton sort/scatter on the GPU) gives the eager plan's lists."""
    from megatron_ham.kernels import scratchpad as sp

    T = 1024
    cu = _cu(T, packed)
    doc = (None, None) if cu is None else tuple(x.contiguous() for x in sp._doc_info(cu, T, DEV))
    for frac in (0.0, 0.3, 1.0):
        routed = torch.rand(1, T, device=DEV) < frac
        eager = sp.staircase_plan(routed, *doc)
        comp = sp._compiled_plan()(routed, *doc)
        assert torch.equal(eager[0], comp[0]) and torch.equal(eager[1], comp[1])
        for (n1, i1), (n2, i2) in zip(eager[2:], comp[2:]):
            assert torch.equal(n1, n2)
            for r in range(n1.shape[-1]):
                m = int(n1[0, 0, r])
                assert torch.equal(i1[0, 0, r, :m], i2[0, 0, r, :m])


def test_staircase_plan_block_lists():
    """The block lists cover exactly the blocks that hold a visible (query, key) pair."""
    from megatron_ham.kernels.scratchpad import BLOCK, staircase_plan

    T = 1000
    routed = torch.rand(1, T, device=DEV) < 0.4
    order, pos_c, (kv_num, kv_idx), (full_num, full_idx), _, _ = staircase_plan(routed, None, None)
    n = int(routed.sum())
    assert torch.equal(pos_c[0, :n].long(), torch.nonzero(routed[0]).flatten())
    assert (pos_c[0, n:] == T).all()
    t = torch.arange(T, device=DEV)
    vis = pos_c[0][None, :] <= t[:, None]                              # [T(q), T(slot)]
    nb = kv_num.shape[-1]
    pad = nb * BLOCK - T
    vb = F.pad(vis, (0, pad, 0, pad)).view(nb, BLOCK, nb, BLOCK)
    anyv = vb.any(3).any(1)
    allv = F.pad(vis, (0, pad, 0, pad), value=True).view(nb, BLOCK, nb, BLOCK).all(3).all(1)
    for i in range(nb):
        part = set(kv_idx[0, 0, i, : kv_num[0, 0, i]].tolist())
        full = set(full_idx[0, 0, i, : full_num[0, 0, i]].tolist())
        assert not (part & full)
        assert part | full == set(torch.nonzero(anyv[i]).flatten().tolist())
        assert full <= set(torch.nonzero(allv[i]).flatten().tolist())


def test_ops_auto_dispatch_uses_gpu_kernels():
    """impl="auto" on CUDA bf16 tensors runs fla's GDN (err detached); fp32 stays chunk; the
    scratchpad uses the Triton staircase kernel (bf16/fp16, head dims 16..256), else flex or
    compact."""
    from megatron_ham.ops import gated_delta_rule, scratchpad_attention
    from megatron_ham.ops.gated_delta_rule import _resolve_impl
    from megatron_ham.ops.scratchpad import _select_impl

    q, k, v, g, beta, _ = _gdn_inputs(1024, 16, 128, 128, 1, seed=3)
    assert _resolve_impl("auto", q) == "fla" and _resolve_impl("auto", q.float()) == "chunk"
    assert _select_impl("auto", q, v) == "triton" and _select_impl("auto", q[..., :8], v) == "compact"
    x = q.clone().requires_grad_(True)
    o_a, _, e_a = gated_delta_rule(x, k, v, g, beta, return_error=True)
    o_f, _, e_f = gated_delta_rule(q, k, v, g, beta, return_error=True, impl="fla")
    assert o_a.dtype == torch.bfloat16 and not e_a.requires_grad and o_a.requires_grad
    assert rel(o_a, o_f) < 1e-6 and rel(e_a, e_f) < 1e-6
    routed = torch.rand(1, 1024, device=DEV) < 0.4
    s_a = scratchpad_attention(q, k, v, routed)
    s_t = scratchpad_attention(q, k, v, routed, impl="triton")
    s_f = scratchpad_attention(q, k, v, routed, impl="flex")
    s_r = scratchpad_attention(q.float(), k.float(), v.float(), routed, impl="reference")
    assert rel(s_a, s_t) < 1e-6 and rel(s_a, s_r) < 2e-2 and rel(s_f, s_r) < 2e-2
    # fp32 CUDA tensors go to flex (the kernel's fp32 build takes minutes to compile)
    assert _select_impl("auto", q.float(), v.float()) == "flex"


@pytest.mark.parametrize("T", [1024, 16384])
def test_short_conv_fla_matches_reference(T):
    """causal_conv_silu impl="fla" (fla's Triton kernels) == the reference in bf16: output, dx
    and dweight, reading x as a strided view of a wider projection (as the mixers do), with
    documents (cu_seqlens, including a 1-token one) and with a batch of rows, with the SiLU and
    without it (silu=False, what the mixers run); "auto" picks it."""
    from megatron_ham.ops.short_conv import causal_conv_silu, conv_impl

    C, W = 3 * 16 * 128, 4
    gen = torch.Generator(device=DEV).manual_seed(11)
    proj = torch.randn(2, T, C + 64, generator=gen, device=DEV).bfloat16()
    w = (torch.randn(C, W, generator=gen, device=DEV) / 2).bfloat16()
    cu = torch.tensor([0, 1000, 1001, T], device=DEV, dtype=torch.int64)
    assert conv_impl(proj[..., :C]) == "fla" and conv_impl(proj[..., :C].float()) == "reference"
    weights = torch.linspace(-1, 1, C, device=DEV)
    for rows, kw in ((1, {"cu_seqlens": cu}), (2, {}), (1, {}), (1, {"cu_seqlens": cu, "silu": False}),
                     (2, {"silu": False})):
        res = {}
        for impl in ("fla", "reference"):  # the reference in fp32
            p = proj[:rows].detach().clone().requires_grad_(True)  # [rows, T, C+64]
            wl = w.detach().clone().requires_grad_(True)
            x, wx = (p[..., :C], wl) if impl == "fla" else (p[..., :C].float(), wl.float())
            y = causal_conv_silu(x, wx, impl=impl, **kw)
            (y.float() * weights).sum().backward()
            res[impl] = (y.float(), p.grad[..., :C].float(), wl.grad.float())
            assert not p.grad[..., C:].any()
        for name, a, b in zip(("y", "dx", "dw"), res["fla"], res["reference"]):
            assert rel(a, b) < 1e-2, (name, rows, list(kw), rel(a, b))


@pytest.mark.parametrize("T", [1024, 16384])
def test_qkv_activations_triton_matches_reference(T):
    """qkv_activations impl="triton" (our SiLU + per-head L2 norm kernels) == the fp32 reference
    in bf16: q, k, v and dx, on the conv's output shape of ham_800m (12 heads x (2 x 128 + 128)),
    with a zero head (the norm clamped at eps) and gradients for some outputs only; "auto" picks it;
    with two branches (a copy of q, k, v per reader) dx of both copies' gradients."""
    from megatron_ham.ops.gdn_activations import qkv_activations, qkv_impl

    H, K, V = 12, 128, 128
    gen = torch.Generator(device=DEV).manual_seed(13)
    x = (torch.randn(1, T, H * (2 * K + V), generator=gen, device=DEV) * 2).bfloat16()
    x[0, 5, :K] = 0
    assert qkv_impl(x) == "triton" and qkv_impl(x.float()) == "reference" and qkv_impl(x, silu=False) == "reference"
    for used in ((0, 1, 2), (0,), (2,)):
        res = {}
        for impl in ("triton", "reference"):
            xi = (x if impl == "triton" else x.float()).detach().clone().requires_grad_(True)
            out = qkv_activations(xi, H, K, V, silu=True, impl=impl)
            weights = [torch.linspace(-1, 1, o.shape[-1], device=DEV) for o in out]
            sum((out[i].float() * weights[i]).sum() for i in used).backward()
            res[impl] = [o.float() for o in out] + [xi.grad.float()]
        for name, a, b in zip(("q", "k", "v", "dx"), res["triton"], res["reference"]):
            assert rel(a, b) < 1e-2, (name, used, rel(a, b))
    # two branches (HAM's state and scratchpad): the backward adds both copies' gradients
    res = {}
    for impl in ("triton", "reference"):
        xi = (x if impl == "triton" else x.float()).detach().clone().requires_grad_(True)
        out = qkv_activations(xi, H, K, V, silu=True, impl=impl, branches=2)
        w = [torch.linspace(-1, 1, o.shape[-1], device=DEV) for o in out]
        sum((o.float() * wi * (i + 1)).sum() for i, (o, wi) in enumerate(zip(out, w))).backward()
        res[impl] = xi.grad.float()
    assert rel(res["triton"], res["reference"]) < 1e-2, ("two branches", rel(res["triton"], res["reference"]))


@pytest.mark.parametrize("h", [1536, 2048])
def test_rms_norm_with_residual_triton_matches_reference(h):
    """hidden_norm_with_residual impl="triton" (our RMSNorm kernels: the residual's gradient added
    in the norm's backward, the weight gradient from per-program partial sums) == the fp32
    reference in bf16 at 16k tokens [s, b, h] (ham_800m's h and a power of two): y, dx with both
    branches' gradients, dw; "auto" picks it. Then HAMNorm(has_residual) in a pre-norm block
    (residual + f(norm(x))) == the plain HAMNorm there, in bf16."""
    from types import SimpleNamespace

    from megatron_ham.layers.norm import HAMNorm
    from megatron_ham.ops.norm import hidden_norm_with_residual, norm_impl

    gen = torch.Generator(device=DEV).manual_seed(17)
    x = (torch.randn(16384, 1, h, generator=gen, device=DEV) * 3).bfloat16()
    x[7] = 0
    w = (torch.rand(h, generator=gen, device=DEV) + 0.5).bfloat16()
    gy, gr = torch.randn(2, 16384, 1, h, generator=gen, device=DEV)
    assert norm_impl(x, w) == "triton" and norm_impl(x, w, w) == "reference"
    res = {}
    for impl in ("triton", "reference"):
        xi = (x if impl == "triton" else x.float()).detach().clone().requires_grad_(True)
        wi = (w if impl == "triton" else w.float()).detach().clone().requires_grad_(True)
        y, r = hidden_norm_with_residual(xi, wi, eps=1e-5, impl=impl)
        ((y.float() * gy).sum() + (r.float() * gr).sum()).backward()
        res[impl] = (y.float(), xi.grad.float(), wi.grad.float())
    for name, a, b in zip(("y", "dx", "dw"), res["triton"], res["reference"]):
        assert rel(a, b) < 1e-2, (name, rel(a, b))
    cfg = SimpleNamespace(normalization="RMSNorm", params_dtype=torch.bfloat16, sequence_parallel=False)
    out = []
    for has_residual in (False, True):
        norm = HAMNorm(cfg, h, eps=1e-5, has_residual=has_residual)
        xi = x.detach().clone().requires_grad_(True)
        o = norm(xi)
        y, r = o if has_residual else (o, xi)
        (r + torch.tanh(y.float()) * gy.bfloat16()).float().pow(2).sum().backward()
        out.append((y.float(), xi.grad.float(), norm.weight.grad.float()))
    for name, a, b in zip(("y", "dx", "dw"), *out):
        assert rel(a, b) < 1e-2, ("HAMNorm", name, rel(a, b))


def test_swiglu_liger_matches_reference():
    """swiglu impl="liger" (liger-kernel's fused gate-up kernel, what the MLP runs through
    layers.swiglu.SwiGLU) == the fp32 reference in bf16 on ham_800m's fc1 output [16384, 1, 2 x
    4096]; "auto" picks it; the model's MLP uses it when the fusions are on."""
    from megatron_ham.ops.swiglu import swiglu, swiglu_impl

    gen = torch.Generator(device=DEV).manual_seed(19)
    x = (torch.randn(16384, 1, 8192, generator=gen, device=DEV) * 2).bfloat16()
    gc = torch.randn(16384, 1, 4096, generator=gen, device=DEV)
    assert swiglu_impl(x) == "liger"
    res = {}
    for impl in ("liger", "reference"):
        xi = (x if impl == "liger" else x.float()).detach().clone().requires_grad_(True)
        c = swiglu(xi, impl=impl)
        (c.float() * gc).sum().backward()
        res[impl] = (c.float(), xi.grad.float())
    for name, a, b in zip(("c", "dx"), res["liger"], res["reference"]):
        assert rel(a, b) < 1e-2, (name, rel(a, b))


def test_documents_with_host_boundaries_never_wait_for_the_gpu():
    """With the boundaries' host copy (cu_seqlens_cpu, what the layers pass), fla's conv and the
    gated delta rule with its routing error on packed documents, forward and backward, never make
    the host wait for the GPU: under sync_debug_mode("error") a synchronizing call raises. New
    boundary tensors each micro-batch (new chunk indices), same shapes (compiled first); the
    results equal those from the device boundaries alone."""
    from megatron_ham.layers.documents import document_forward_kwargs, host_cu_seqlens
    from megatron_ham.ops import causal_conv_silu, gated_delta_rule

    T, H, K, V = 4096, 4, 128, 128
    gen = torch.Generator(device=DEV).manual_seed(3)
    proj = torch.randn(1, T, H * (2 * K + V), generator=gen, device=DEV).bfloat16()
    w = torch.randn(H * (2 * K + V), 4, generator=gen, device=DEV).bfloat16()
    q, k, v, g, beta, _ = _gdn_inputs(T, H, K, V, 1, seed=4)
    tokens = torch.randint(1, 50, (1, T))
    tokens[0, [700, 701, 3000]] = 0  # EOD: documents of 701, 1, 2299 and 1095 tokens

    def step(psp, with_host):
        cu = psp.cu_seqlens_q.to(torch.int64)
        host = host_cu_seqlens(psp) if with_host else None
        leaves = [x.detach().clone().requires_grad_(True) for x in (proj, q, k, v, g, beta)]
        y = causal_conv_silu(leaves[0], w, cu_seqlens=cu, cu_seqlens_cpu=host, impl="fla")
        o, _, err = gated_delta_rule(*leaves[1:], return_error=True, cu_seqlens=cu,
                                     cu_seqlens_cpu=host, impl="fla")
        (y.float().square().mean() + o.float().square().mean()).backward()
        return [y, o, err] + [x.grad for x in leaves]

    want = step(document_forward_kwargs(tokens, 0, DEV)["packed_seq_params"], False)  # compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # a new micro-batch: its boundaries from the host tokens, then the ops
        got = step(document_forward_kwargs(tokens, 0, DEV)["packed_seq_params"], True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for name, a, b in zip(("y", "o", "err", "dproj", "dq", "dk", "dv", "dg", "dbeta"), got, want):
        assert rel(a, b) < 1e-3, (name, rel(a, b))  # same chunk indices: equal up to atomics' order


def test_compiled_elementwise_ops_match_eager():
    """Every op the layers run through torch.compile (model.fusions, layers/fusion.py) equals its
    eager reference in bf16, forward and backward, with documents for the conv."""
    from megatron_ham.layers.fusion import maybe_compiled
    from megatron_ham.layers.gdn_mixer import activations_recomputed, gdn_activations
    from megatron_ham.ops import apply_rope, causal_conv_silu, gated_combine, gated_rms_norm, rope_cos_sin
    from megatron_ham.ops import router_weighted_values

    T, H, K, V = 4096, 16, 128, 128
    g_ = torch.Generator(device=DEV).manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g_, device=DEV).bfloat16()  # noqa: E731
    doc = torch.repeat_interleave(torch.arange(3, device=DEV),
                                  torch.tensor([1000, 1, T - 1001], device=DEV))[None]
    A_log, dt_bias = torch.rand(H, device=DEV).add(1).log(), torch.rand(H, device=DEV)
    cases = {
        "causal_conv_silu": (causal_conv_silu, (r(1, T, H * (2 * K + V)), r(H * (2 * K + V), 4), doc), {}),
        "gdn_activations": (gdn_activations, (r(1, T, H * (2 * K + V)), r(1, T, H), r(1, T, H),
                                              A_log, dt_bias, H, K, V), {}),
        # what the mixers run: the conv without its SiLU, then the SiLU + norms recomputed in backward
        "causal_conv_silu(silu=False)": (causal_conv_silu, (r(1, T, H * (2 * K + V)), r(H * (2 * K + V), 4), doc),
                                         {"silu": False}),
        "activations_recomputed": (activations_recomputed, (r(1, T, H * (2 * K + V)), r(1, T, H), r(1, T, H),
                                                            A_log, dt_bias, H, K, V), {}),
        "gated_rms_norm": (gated_rms_norm, (r(1, T, H, V), r(1, T, H, V), r(V)), {"eps": 1e-6}),
        "gated_combine": (gated_combine, (r(1, T, H, V), r(1, T, H, V), r(1, T, H), r(1, T, H),
                                          r(1, T, H, V), r(V)), {"eps": 1e-6}),
        # the learned router's value scaling, on v as the mixer has it (a view of the conv output)
        "router_weighted_values": (router_weighted_values, (r(1, T, H * (2 * K + V))[..., 2 * H * K:].view(1, T, H, V),
                                                            torch.rand(1, T, device=DEV).bfloat16(),
                                                            torch.rand(1, T, generator=g_, device=DEV) < 0.5), {}),
        # SDPACoreAttention's RoPE on a strided query (a slice of the fused qkv output) [s, b, n, d]
        "apply_rope": (apply_rope, (r(T, 1, H, 3 * K)[..., :K],
                                    *(c[:, None, None] for c in rope_cos_sin(K, 10000.0, torch.arange(T, device=DEV)))),
                       {}),
    }
    for name, (fn, args, kw) in cases.items():
        outs = []
        for f in (fn, maybe_compiled(fn, True)):
            leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) if torch.is_tensor(a)
                      and a.is_floating_point() else a for a in args]
            res = f(*leaves, **kw)
            res = res if isinstance(res, tuple) else (res,)
            sum((o.float() * (i + 1)).sum() for i, o in enumerate(res)).backward()
            outs.append(list(res) + [a.grad for a in leaves if torch.is_tensor(a) and a.requires_grad])
        for i, (a, b) in enumerate(zip(*outs)):
            assert rel(b, a) < 1e-2, (name, i, rel(b, a))
