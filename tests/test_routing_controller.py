"""Routing (min over heads, threshold, learned router) and the KV-fraction controller."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_ham.ops.controller import KVFractionController
from megatron_ham.ops.routing import LearnedRouter, min_over_heads, route, router_weighted_values
from megatron_ham.ops.scratchpad import scratchpad_attention


# ---- routing --------------------------------------------------------------------------------
def test_min_over_heads_and_route():
    s = torch.tensor([[[0.3, 0.1, 0.5], [0.9, 0.7, 0.8]]])  # [1,2,3]
    m = min_over_heads(s)
    torch.testing.assert_close(m, torch.tensor([[0.1, 0.7]]))
    assert route(m, 0.5).tolist() == [[False, True]]
    assert route(m, torch.tensor(0.1)).tolist() == [[True, True]]  # >= tau
    assert route(m, torch.tensor(float("inf"))).sum() == 0
    with pytest.raises(ValueError, match=r"scores must have shape \[B,T,H\]"):
        min_over_heads(s[0])
    with pytest.raises(ValueError, match=r"scores must have shape \[B,T\]"):
        route(s, 0.5)
    with pytest.raises(ValueError, match=r"tau must be a float or a 0-dim tensor"):
        route(m, torch.tensor([0.5]))


def test_learned_router_shapes_and_validation():
    torch.manual_seed(0)
    r = LearnedRouter(16)
    assert r.fc1.out_features == 4
    out = r(torch.randn(2, 5, 16))
    assert out.shape == (2, 5) and (out > 0).all() and (out < 1).all()
    assert LearnedRouter(16, 8, bias=False, activation="gelu")(torch.randn(3, 16)).shape == (3,)
    with pytest.raises(ValueError, match=r"x must have shape \[..., hidden_size=16\]"):
        r(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        LearnedRouter(0)


def test_learned_router_error_feature():
    """router_input "hidden+error": z = MLP(x) + w * log(max(e, 1e-6)), w learned (init 1), e
    detached; the MLP part is the plain router's."""
    torch.manual_seed(0)
    plain, r = LearnedRouter(16, 8), LearnedRouter(16, 8, error_feature=True)
    r.load_state_dict({**plain.state_dict(), "error_weight": torch.tensor([0.5])})
    x = torch.randn(2, 5, 16)
    e = torch.rand(2, 5, requires_grad=True)
    e_val = e.detach().clone()
    e_val[0, 0] = 0.0  # a zero error: the floor, not -inf
    z = r.logits(x, e_val.requires_grad_())
    torch.testing.assert_close(z, plain.logits(x) + 0.5 * e_val.detach().clamp_min(1e-6).log())
    assert torch.isfinite(z).all()
    z.sum().backward()
    assert r.error_weight.grad is not None and r.error_weight.grad.abs().item() > 0
    assert e_val.grad is None  # the error is a feature, not a path into the state
    with pytest.raises(ValueError, match="err must be given exactly when the router has the error feature"):
        r.logits(x)
    with pytest.raises(ValueError, match="err must be given exactly when"):
        plain.logits(x, e)
    with pytest.raises(ValueError, match=r"err must have shape x.shape\[:-1\]"):
        r.logits(x, torch.rand(2, 4))
    from megatron_ham.models import ModelConfig, SettingError

    with pytest.raises(SettingError, match="key 'router_input'"):
        ModelConfig(architecture="ham", router="learned", router_input="error").validate()
    with pytest.raises(SettingError, match="'hidden' unless router is 'learned'"):
        ModelConfig(architecture="ham", router="error_l2", router_input="hidden+error").validate()
    from megatron_ham.hf import HAMConfig

    with pytest.raises(ValueError, match="router_input"):
        HAMConfig(router_input="error")


def test_router_gets_gradient_through_scratchpad():
    torch.manual_seed(0)
    B, T, H, D, hidden = 2, 24, 2, 8, 16
    x = torch.randn(B, T, hidden)
    router = LearnedRouter(hidden)
    q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
    r = router(x)
    r.retain_grad()
    routed = route(r.detach(), r.detach().median())
    v_r = router_weighted_values(v, r, routed)
    torch.testing.assert_close(v_r[~routed], v[~routed])  # unrouted values untouched
    torch.testing.assert_close(v_r[routed], v[routed] * r.detach()[routed][:, None, None])
    o = scratchpad_attention(q, k, v_r, routed)
    target = torch.randn_like(o)
    ((o - target) ** 2).mean().backward()
    # every routed key that some query sees passes gradient to its r; unrouted get none
    assert (r.grad[~routed] == 0).all()
    assert (r.grad[routed] != 0).float().mean() > 0.9
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters())


# ---- controller -----------------------------------------------------------------------------
def _stream(seed, scale=1.0, sigma=1.0, n=4096):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield scale * torch.exp(sigma * torch.randn(2, n // 2, generator=g))


def _true_fraction(tau, scale=1.0, sigma=1.0):
    """P(S >= tau) for S = scale * exp(sigma * N(0,1))."""
    z = (math.log(tau / scale)) / sigma
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("target", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("warmup,scale,sigma,tau_init", [(1, 1.0, 1.0, 0.0), (0, 1e-3, 0.5, 1.0),
                                                         (0, 50.0, 2.0, 1e-4)])
def test_controller_converges(target, warmup, scale, sigma, tau_init):
    c = KVFractionController(target, warmup=warmup, tau_init=tau_init)
    stream = _stream(int(target * 100) + warmup, scale, sigma)
    measured = [c.update(next(stream)) for _ in range(200)]
    assert abs(_true_fraction(float(c.tau), scale, sigma) - target) < 0.01
    assert abs(sum(measured[-50:]) / 50 - target) < 0.01
    # steady state: every one of the last 50 taus is within 1 percentage point
    taus = []
    for _ in range(50):
        c.update(next(stream))
        taus.append(float(c.tau))
    assert max(abs(_true_fraction(t, scale, sigma) - target) for t in taus) < 0.01


@pytest.mark.parametrize("target", [0.1, 0.25, 0.5])
def test_controller_converges_uniform_scores(target):
    """Not log-normal: sigmoid-like scores in (0, 1), cold start with tau above every score."""
    g = torch.Generator().manual_seed(11)
    c = KVFractionController(target, warmup=0, tau_init=5.0)
    for _ in range(200):
        c.update(torch.rand(4, 1024, generator=g))
    assert abs((1.0 - float(c.tau)) - target) < 0.01


def _drifting_bimodal(t, n, g):
    """Scores of a learned router during training (the issue-16 failure): a cluster of tokens
    whose logits drift up (4 -> 16) while it grows from 15 % to 35 % of the tokens, crossing
    the 25 % target; the others stay low. Returns (logits, positive scores exp(logit))."""
    a = min(1.0, t / 300)
    k = int((0.15 + 0.2 * a) * n)
    z = torch.cat([torch.randn(k, generator=g) * 0.5 + 4 + 12 * a, torch.randn(n - k, generator=g) - 2])
    return z, torch.exp(z)


@pytest.mark.parametrize("space", ["log", "linear"])
def test_controller_tracks_a_shifting_bimodal_distribution(space):
    """The failure of the old integral law (its Newton step scaled by the local spread of the
    scores overshot to f = 0 / f = 1 when the target quantile fell into the gap between the
    clusters, then froze): quantile tracking holds the target all the way through."""
    g = torch.Generator().manual_seed(5)
    c = KVFractionController(0.25, gain=1.0, space=space)
    fs = []
    for t in range(400):
        z, odds = _drifting_bimodal(t, 4096, g)
        fs.append(c.update(odds if space == "log" else z))
        assert math.isfinite(float(c.tau))
    assert max(abs(f - 0.25) for f in fs[1:]) < 0.03, fs


def test_controller_atom_is_stable():
    """35 % of the scores exactly 1.0 (a saturated sigmoid): no threshold splits them; tau
    settles on the atom and the fraction stays at 0.35 instead of oscillating."""
    g = torch.Generator().manual_seed(6)
    c = KVFractionController(0.25, gain=0.5)
    fs = [c.update(torch.cat([torch.ones(1434), torch.rand(2662, generator=g) * 0.9])) for _ in range(50)]
    assert all(abs(f - 0.35) < 0.01 for f in fs[1:]) and float(c.tau) == 1.0


def test_controller_warmup_quantile_and_extremes():
    s = torch.arange(1, 101, dtype=torch.float32).view(4, 25)
    c = KVFractionController(0.3, warmup=1)
    assert c.update(s) == 1.0  # tau_init 0 routes everything
    assert c.fraction(s) == pytest.approx(0.3)  # initialised at the batch quantile
    c1 = KVFractionController(1.0)
    assert c1.update(s) == 1.0 and c1.fraction(torch.zeros(3)) == 1.0 and float(c1.tau) == -math.inf
    c0 = KVFractionController(0.0)
    assert c0.update(s) == 0.0 and c0.fraction(s) == 0.0
    # zero scores do not break the log-domain law
    cz = KVFractionController(0.5, warmup=0)
    for _ in range(5):
        f = cz.update(torch.cat([torch.zeros(100), torch.rand(100)]))
        assert math.isfinite(float(cz.tau)) and float(cz.tau) > 0 and 0 <= f <= 1
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="target must be a KV fraction in"):
            KVFractionController(bad)
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match=r"gain must be in \(0, 1\]"):
            KVFractionController(0.5, gain=bad)
    with pytest.raises(ValueError, match="space must be one of"):
        KVFractionController(0.5, space="exp")
    with pytest.raises(ValueError, match="scores must be a non-empty floating-point"):
        c.update(torch.ones(3, dtype=torch.long))


def test_controller_overrides():
    s = torch.rand(4, 256)
    c = KVFractionController(0.5)
    c.update(s)
    c.set_tau(2.0)
    assert float(c.tau) == 2.0 and c.fraction(s) == 0.0
    c.target = 1.0
    assert c.fraction(s) == 1.0
    c.target = 0.25  # back from an extreme target: re-initialised from the next batch's quantile
    c.update(s)
    assert c.fraction(s) == pytest.approx(0.25, abs=0.01)
    with pytest.raises(ValueError, match="target must be"):
        c.target = 2.0


def test_controller_state_dict_round_trip():
    stream = _stream(7)
    a = KVFractionController(0.25, gain=0.7, warmup=3)
    for _ in range(2):
        a.update(next(stream))
    sd = a.state_dict()
    assert set(sd) == {"tau", "num_updates"} and sd["tau"].dtype == torch.float32
    b = KVFractionController(0.25, gain=0.7, warmup=3)
    b.load_state_dict(sd)
    assert float(b.tau) == float(a.tau) and int(b.num_updates) == 2
    for _ in range(3):  # crosses the end of warm-up
        batch = next(stream)
        assert a.update(batch) == b.update(batch)
        assert float(a.tau) == float(b.tau)


# ---- two ranks (gloo) ---------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)
    group = dist.group.WORLD
    c = KVFractionController(0.25, warmup=1)
    fs = []
    for _ in range(40):  # rank 1 sees 3x larger scores
        fs.append(c.update(torch.exp(torch.randn(2, 1024)) * (1.0 + 2.0 * rank), group=group))
    local = c.fraction(torch.exp(torch.randn(2, 1024)) * (1.0 + 2.0 * rank))
    heads = torch.rand(2, 5, 3) + rank  # this rank's heads
    m = min_over_heads(heads, group=group)
    torch.save({"tau": float(c.tau), "fs": fs, "local": local, "min": m, "heads": heads},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_controller_two_ranks_same_tau(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in range(2))
    assert r0["tau"] == r1["tau"]
    assert r0["fs"] == r1["fs"]  # the measured fraction is the group's
    assert abs(sum(r0["fs"][-20:]) / 20 - 0.25) < 0.02
    assert r0["local"] < 0.25 < r1["local"]  # ranks really saw different scores
    want = torch.minimum(r0["heads"].amin(-1), r1["heads"].amin(-1))
    torch.testing.assert_close(r0["min"], want)
    torch.testing.assert_close(r1["min"], want)


def test_quantile_threshold_routes_exactly_the_target():
    from megatron_ham.ops.controller import quantile_threshold

    s = torch.randn(4, 250, generator=torch.Generator().manual_seed(0))
    for f in (0.01, 0.1, 0.25, 0.5, 0.9):
        assert int((s >= quantile_threshold(s, f)).sum()) == round(f * 1000)
    assert int((s >= quantile_threshold(s, 1e-9)).sum()) == 1  # at least one token


def test_batch_routing_is_exact_in_training_and_survives_recomputation(monkeypatch):
    """model.train_routing "batch": every training forward routes exactly kv_fraction of its
    micro-batch per layer (however the scores drift), the recomputed forward of activation
    checkpointing routes the same tokens (same loss and gradients as without it), the
    controller's tau still tracks the quantile, and eval mode routes at tau."""
    from megatron_ham import distributed as D
    from megatron_ham.layers import HAMMixer
    from megatron_ham.models import ModelConfig, build_model, step_kv_controllers

    if not dist.is_initialized():  # this process's own rendezvous: never a port another run holds
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    D.initialize(tp=1, seed=2)
    small = dict(architecture="ham", num_layers=2, hidden_size=32, vocab_size=64, mixer_num_heads=2,
                 mixer_key_head_dim=8, mixer_value_head_dim=8, dtype="fp32", use_cpu_initialization=True,
                 router="learned", router_score="logit", kv_fraction=0.25, train_routing="batch")
    g = torch.Generator().manual_seed(3)
    # distinct tokens: layer 0's router sees the token alone, and equal scores are routed together
    toks = [torch.randperm(64, generator=g)[:60][None] for _ in range(4)]
    pos = torch.arange(60)[None]
    res = []
    for rc in ("", "full"):
        torch.manual_seed(4)
        model = build_model(ModelConfig(**small))
        mixers = [m for m in model.modules() if isinstance(m, HAMMixer)]
        if rc:
            model.config.recompute_granularity, model.config.recompute_method = "full", "uniform"
            model.config.recompute_num_layers = 1
        model.train()
        for i, t in enumerate(toks):
            loss = model(t, pos, None, labels=t).sum()
            loss.backward()
            assert [int(m.last_routed.sum()) for m in mixers] == [15, 15]  # 0.25 x 60 tokens
            if i == 0:
                res.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
            stats = step_kv_controllers([model])
        assert all(math.isfinite(s["tau"]) for s in stats.values())
        model.eval()
        with torch.no_grad():
            model(toks[0], pos, None)
        for m in mixers:  # eval routes at the controller's tau
            assert torch.equal(m.last_routed, m.last_scores >= m.kv_controller.tau)
    torch.testing.assert_close(res[0][0], res[1][0])
    for n, g0 in res[0][1].items():
        torch.testing.assert_close(g0, res[1][1][n], atol=1e-5, rtol=1e-5, msg=n)


def test_bad_train_routing_is_named():
    from megatron_ham.models import ModelConfig

    with pytest.raises(ValueError, match="key 'train_routing': expected one of \\['threshold', 'batch'\\]"):
        ModelConfig(train_routing="topk").validate()
