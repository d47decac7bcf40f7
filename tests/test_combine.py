"""gated_combine: independent sigmoid gates + gated per-head RMSNorm."""
import math

import pytest
import torch

from megatron_ham.ops.combine import gated_combine


def _inputs(B=2, T=3, H=2, V=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    return mk(B, T, H, V), mk(B, T, H, V), mk(B, T, H), mk(B, T, H), mk(B, T, H, V), mk(V)


def test_explicit_formula_elementwise():
    o_rnn, o_kv, gr, gk, og, w = _inputs(dtype=torch.float64)
    out = gated_combine(o_rnn, o_kv, gr, gk, og, w, eps=1e-6)
    B, T, H, V = o_rnn.shape
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))
    for b in range(B):
        for t in range(T):
            for h in range(H):
                m = [sig(gr[b, t, h].item()) * o_rnn[b, t, h, i].item()
                     + sig(gk[b, t, h].item()) * o_kv[b, t, h, i].item() for i in range(V)]
                rms = math.sqrt(sum(x * x for x in m) / V + 1e-6)
                for i in range(V):
                    z = og[b, t, h, i].item()
                    want = m[i] / rms * w[i].item() * z * sig(z)
                    assert abs(out[b, t, h, i].item() - want) < 1e-10


def test_gates_are_independent_not_softmax():
    o_rnn, o_kv, gr, gk, og, w = _inputs()
    big = torch.full_like(gr, 30.0)
    # both gates open: the mixture is o_rnn + o_kv (a softmax pair would give their average)
    a = gated_combine(o_rnn, o_kv, big, big, og, w)
    b = gated_combine(o_rnn + o_kv, torch.zeros_like(o_kv), big, -big, og, w)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # kv gate closed: the scratchpad has no effect
    c = gated_combine(o_rnn, o_kv * 100, gr, -big, og, w)
    d = gated_combine(o_rnn, torch.zeros_like(o_kv), gr, -big, og, w)
    torch.testing.assert_close(c, d, atol=1e-5, rtol=1e-5)


def test_per_head_norm_and_dtype():
    o_rnn, o_kv, gr, gk, og, w = _inputs(H=3, V=8, dtype=torch.bfloat16)
    out = gated_combine(o_rnn, o_kv, gr, gk, og, torch.ones(8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == o_rnn.shape
    # undo the output gate: each head has unit RMS over V
    normed = out.float() / torch.nn.functional.silu(og.float())
    rms = normed.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=5e-2, rtol=5e-2)
    # scaling one head's inputs leaves every head's output unchanged (per-head norm)
    o2, k2 = o_rnn.float().clone(), o_kv.float().clone()
    o2[:, :, 1] *= 7
    k2[:, :, 1] *= 7
    a = gated_combine(o_rnn.float(), o_kv.float(), gr.float(), gk.float(), og.float(), w.float())
    b = gated_combine(o2, k2, gr.float(), gk.float(), og.float(), w.float())
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_gradcheck():
    args = tuple(x.requires_grad_(True) for x in _inputs(dtype=torch.float64, seed=1))
    assert torch.autograd.gradcheck(lambda *a: gated_combine(*a, eps=1e-6), args)


def test_bad_input():
    o_rnn, o_kv, gr, gk, og, w = _inputs()
    with pytest.raises(ValueError, match=r"o_rnn must have shape \[B,T,H,V\]"):
        gated_combine(o_rnn[0], o_kv, gr, gk, og, w)
    with pytest.raises(ValueError, match=r"o_kv must have shape \[B,T,H,V\]"):
        gated_combine(o_rnn, o_kv[..., :2], gr, gk, og, w)
    with pytest.raises(ValueError, match=r"gate_rnn must have shape \[B,T,H\]"):
        gated_combine(o_rnn, o_kv, gr[..., None], gk, og, w)
    with pytest.raises(ValueError, match=r"gate_kv must have shape \[B,T,H\]"):
        gated_combine(o_rnn, o_kv, gr, gk[:, :1], og, w)
    with pytest.raises(ValueError, match=r"out_gate must have shape \[B,T,H,V\]"):
        gated_combine(o_rnn, o_kv, gr, gk, og[:, :, :1], w)
    with pytest.raises(ValueError, match=r"weight must have shape \[V\]"):
        gated_combine(o_rnn, o_kv, gr, gk, og, w[:3])
    with pytest.raises(ValueError, match=r"gate_rnn must be a floating-point"):
        gated_combine(o_rnn, o_kv, gr.long(), gk, og, w)
    with pytest.raises(ValueError, match=r"eps must be a float > 0"):
        gated_combine(o_rnn, o_kv, gr, gk, og, w, eps=0.0)
