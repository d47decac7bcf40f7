"""Layer-level checks of the HAM / GDN mixers on real megatron-core (one process)."""
from __future__ import annotations

import torch

from _dist import run_world


def _layers_worker(rank, world):
    import torch.nn.functional as F
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from megatron_ham import distributed as D
    from megatron_ham.layers import HAMMixer, get_backend, get_kind
    from megatron_ham.models import ModelConfig, build_model, step_kv_controllers
    from megatron_ham.models.builder import transformer_config

    D.initialize(tp=1, seed=2)
    cfg = ModelConfig(architecture="ham", hidden_size=32, mixer_num_heads=2, mixer_key_head_dim=8,
                      mixer_value_head_dim=8, dtype="fp32", use_cpu_initialization=True,
                      impl="chunk")
    tc = transformer_config(cfg)
    m = build_module(get_kind("ham").spec(get_backend("local"), cfg), config=tc,
                     layer_number=1, pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
                     pp_layer_offset=0, name="decoder.layers.0.self_attention",
                     cp_comm_type=None)  # 0.19-style kwargs are accepted

    # the mixer's causal conv op == torch's Conv1d with left padding (no documents)
    from megatron_ham.ops import causal_conv_silu

    x = torch.randn(2, 10, m.conv1d.weight.shape[0])
    ref = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), m.conv1d.weight,
                          groups=x.shape[-1])).transpose(1, 2)
    assert torch.allclose(causal_conv_silu(x, m.conv1d.weight[:, 0, :]), ref, atol=1e-6)

    # checkpoint: fused tensors are saved as named, TP-sharded sections
    from megatron.core.dist_checkpointing.mapping import apply_factories

    sd = m.sharded_state_dict(prefix="mix.")
    apply_factories(sd)
    keys = {t.key for v in sd.values() for t in (v if isinstance(v, list) else [v])}
    for name in ("q", "k", "v", "z", "beta", "a", "gate_rnn", "gate_kv"):
        assert f"mix.in_proj.weight.{name}" in keys, sorted(keys)
    for name in ("q", "k", "v"):
        assert f"mix.conv1d.weight.{name}" in keys, sorted(keys)
    assert "mix.kv_controller.tau" in keys and "mix.A_log" in keys

    # recording protocol: train mode records one [b, s] per micro-batch, eval records nothing
    h = torch.randn(6, 2, 32)
    m.train()
    m(h, None)
    m(h[:4], None)
    m.eval()
    with torch.no_grad():
        m(h, None)
    rec = m.pop_recorded_scores()
    assert rec is not None and rec.numel() == 6 * 2 + 4 * 2, None if rec is None else rec.shape
    assert m.pop_recorded_scores() is None

    # full activation recomputation: same loss and grads, scores recorded once per micro-batch;
    # also with the compiled fusions (their no-grad forward, then the recomputation with grads)
    small = dict(architecture="ham", num_layers=2, hidden_size=32, mixer_num_heads=2,
                 mixer_key_head_dim=8, mixer_value_head_dim=8, ffn_hidden_size=64,
                 vocab_size=64, make_vocab_size_divisible_by=64, seq_length=12, dtype="fp32",
                 use_cpu_initialization=True, impl="chunk")
    toks = torch.randint(0, 64, (2, 12))
    pos = torch.arange(12)[None].expand(2, -1)
    res = []
    for rc, fusions in (("", "off"), ("full", "off"), ("full", "on")):
        torch.manual_seed(4)
        model = build_model(ModelConfig(**small, fusions=fusions))
        if rc:  # as the training loop does (train.recompute): set on the built config
            model.config.recompute_granularity = "full"
            model.config.recompute_method = "uniform"
            model.config.recompute_num_layers = 1
        model.train()
        calls = []
        for mx in model.modules():
            if isinstance(mx, HAMMixer):
                mx.register_forward_hook(lambda *a: calls.append(1))
        loss = model(toks, pos, None, labels=toks).sum()
        loss.backward()
        assert len(calls) == (4 if rc else 2), (rc, len(calls))  # recompute re-runs the mixers
        counts = [len(mx._recorded) for mx in model.modules() if isinstance(mx, HAMMixer)]
        assert counts == [1, 1], (rc, counts)
        stats = step_kv_controllers([model])
        assert sorted(stats) == [1, 2] and all(0 <= s["fraction"] <= 1 for s in stats.values())
        res.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    for other in res[1:]:
        assert torch.allclose(res[0][0], other[0], atol=1e-5)
        for n, g in res[0][1].items():
            assert torch.allclose(g, other[1][n], atol=1e-5), n


def test_layers_in_one_process():
    """Mixer accepts 0.19 kwargs; manual conv == Conv1d; sectioned checkpoint keys; controller
    recording protocol (train records per micro-batch, eval nothing, full recompute once, also
    with the compiled fusions)."""
    run_world(_layers_worker, 1)
