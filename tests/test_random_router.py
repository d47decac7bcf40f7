"""The random router (`model.router: random`, the ablation): content-independent i.i.d. scores
from a counter-based hash, driven to the target fraction by the controller, exported to HF; and
the learned router thresholding its logit (`model.router_score: logit`)."""

import pytest
import torch

from megatron_ham.ops.routing import random_router_scores, uniform_hash
from _dist import run_worker


def _lowbias32_reference(keys):
    """The hash in plain Python integers (the definition the tensor code must reproduce)."""
    M = 0xFFFFFFFF

    def mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & M
        x ^= x >> 15
        x = (x * 0x846CA68B) & M
        return x ^ (x >> 16)

    h = 0x9E3779B9
    for k in keys:
        h = mix(h ^ (k & M))
        h = mix(h ^ ((k >> 32) & M))
    return ((h >> 8) + 0.5) / 2 ** 24


def test_uniform_hash_bits_and_statistics():
    keys = [(0, 0, 0, 3), (7, 2, 123456789012, 4095), (2 ** 40 + 5, 21, 1, 0)]
    for k in keys:
        got = float(uniform_hash(*k))
        assert got == pytest.approx(_lowbias32_reference(k), abs=1e-7), k
    u = random_router_scores(3, 1, torch.arange(1, 65), torch.arange(4096))  # [64, 4096]
    assert u.shape == (64, 4096) and u.dtype == torch.float32
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    n = u.numel()
    for f in (0.1, 0.25, 0.5):
        assert abs(float((u < f).float().mean()) - f) < 4 * (f * (1 - f) / n) ** 0.5
    r = u < 0.25  # independent over neighbours, layers, samples
    other_layer = random_router_scores(3, 2, torch.arange(1, 65), torch.arange(4096)) < 0.25
    for joint in ((r[:, 1:] & r[:, :-1]), (r & other_layer), (r[1:] & r[:-1])):
        assert abs(float(joint.float().mean()) - 0.0625) < 0.005
    # the same keys give the same scores; positions [T] broadcast over a sample of 0
    torch.testing.assert_close(random_router_scores(3, 1, 0, torch.arange(10)),
                               random_router_scores(3, 1, torch.zeros(2, dtype=torch.int64),
                                                    torch.arange(10))[:1])
    with pytest.raises(ValueError, match="key 0 must be a non-negative int"):
        uniform_hash(-1)
    with pytest.raises(ValueError, match="positions must be an int tensor"):
        random_router_scores(0, 0, 0, torch.rand(4))


def test_random_router_model_controller_and_export(tmp_path):
    r = run_worker("_random_router_worker.py", tmp_path)
    last = r["fractions"][-10:]  # the controller holds the target (256 tokens a step: noise ~0.03)
    for layer in range(2):
        mean = sum(f[layer] for f in last) / len(last)
        assert abs(mean - 0.25) < 0.04, r["fractions"]
    assert all(0.6 < t < 0.9 for t in r["taus"]), r["taus"]  # tau ~ 1 - f for uniform scores
    assert r["eval_content_independent"] and r["eval_rows_equal"] and r["eval_layers_differ"]
    assert 0.1 < r["eval_fraction"] < 0.4
    assert r["train_steps_differ"] and r["train_rows_differ"]  # fresh draws in training
    assert r["hf_router"] == ["random", 5]
    assert r["hf_equals_megatron_routing"] and r["cache_equals_no_cache"]
    # learned router, router_score "logit": scores are the logits (any sign), linear-space control
    assert r["logit_space"] == "linear" and r["logit_scores_are_logits"] < 1e-5 and r["logit_scores_negative"]
    for layer in range(2):
        assert abs(sum(f[layer] for f in r["logit_fractions"][-5:]) / 5 - 0.25) < 0.06, r["logit_fractions"]
    assert r["learned_hf_router_score"] == "logit"
    # a bf16 model holds one parameter dtype (the router too: the distributed optimizer cannot
    # checkpoint fp32 parameters in a bf16 model); the router still computes fp32 logits
    assert r["bf16_param_dtypes"] == ["torch.bfloat16"] and r["bf16_router_logit_dtype"] == "torch.float32"  # exported, and convert() verified the logits
