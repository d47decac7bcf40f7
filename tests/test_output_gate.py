"""model.output_gate: the GDN / HAM readout with Gated DeltaNet's silu(z) gate ("silu", the
default) or without it ("none": no z section, RMSNorm(o) * weight), through the op, the
Megatron layers, the checkpoint and the Hugging Face export (docs/design.md "Output combination")."""

import pytest
import torch

from megatron_ham.ops.combine import gated_combine, gated_rms_norm
from _dist import run_worker


def test_ungated_norm_is_rms_norm_times_weight():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 3, 8, generator=g), torch.rand(8, generator=g) + 0.5
    want = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * w
    torch.testing.assert_close(gated_rms_norm(x, None, w, eps=1e-6), want)
    # gated_combine without a gate: the same norm of the gated mix
    o_kv, gr, gk = torch.randn(2, 5, 3, 8, generator=g), torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    mixed = torch.sigmoid(gr)[..., None] * x + torch.sigmoid(gk)[..., None] * o_kv
    torch.testing.assert_close(gated_combine(x, o_kv, gr, gk, None, w, eps=1e-6),
                               gated_rms_norm(mixed, None, w, eps=1e-6))
    # and the gate, when given, still multiplies by silu(z)
    z = torch.randn(2, 5, 3, 8, generator=g)
    torch.testing.assert_close(gated_rms_norm(x, z, w), gated_rms_norm(x, None, w) * torch.nn.functional.silu(z))


def test_bad_output_gate_is_named():
    from megatron_ham.models import ModelConfig, SettingError

    with pytest.raises(SettingError, match="key 'output_gate': expected one of \\['silu', 'none'\\], got 'tanh'"):
        ModelConfig(output_gate="tanh").validate()
    from megatron_ham.hf import HAMConfig

    with pytest.raises(ValueError, match="output_gate"):
        HAMConfig(output_gate="sigmoid")


def test_model_without_output_gate_trains_checkpoints_and_exports(tmp_path):
    r = run_worker("_output_gate_worker.py", tmp_path)
    assert r["silu"]["sections"] == [["q", "k", "v", "z", "beta", "a", "gate_rnn", "gate_kv"],
                                     ["q", "k", "v", "z", "beta", "a"]]
    assert r["none"]["sections"] == [["q", "k", "v", "beta", "a", "gate_rnn", "gate_kv"],
                                     ["q", "k", "v", "beta", "a"]]
    # 2 heads: the z section is H * V = 32 rows of in_proj
    assert [a - b for a, b in zip(r["silu"]["in_proj_rows"], r["none"]["in_proj_rows"])] == [32, 32]
    assert r["none"]["finite"] and r["silu"]["finite"]
    assert (r["silu"]["hf_output_gate"], r["none"]["hf_output_gate"]) == ("silu", "none")
    assert r["silu"]["hf_has_z_proj"] == [True, True] and r["none"]["hf_has_z_proj"] == [False, False]
