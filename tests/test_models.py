"""Model configuration, specs, documents and accounting (real megatron-core, one process)."""
from __future__ import annotations

import pytest
import torch

from _dist import run_world


# ----------------------------------------------------------------------------- bad configs

@pytest.mark.parametrize("kw, tp, setting", [
    (dict(architecture="mamba"), 1, "architecture"),
    (dict(architecture="hybrid", pattern="HGX*", num_layers=4), 1, "pattern"),
    (dict(architecture="ham", pattern="HH", num_layers=3), 1, "pattern"),
    (dict(architecture="ham", pattern="H*", num_layers=2), 1, "pattern"),
    (dict(kv_fraction=1.5), 1, "kv_fraction"),
    (dict(kv_fraction=-0.1), 1, "kv_fraction"),
    (dict(router="oracle"), 1, "router"),
    (dict(scratchpad_impl="fast"), 1, "scratchpad_impl"),
    (dict(mixer_norm_eps=0.0), 1, "mixer_norm_eps"),
    (dict(mixer_num_heads=3), 2, "mixer_num_heads"),
    (dict(architecture="transformer", num_attention_heads=6, hidden_size=48), 4, "num_attention_heads"),
    (dict(architecture="transformer", num_query_groups=1), 2, "num_query_groups"),
    (dict(backend="flash"), 1, "backend"),
    (dict(dtype="fp8"), 1, "dtype"),
    (dict(fusions="yes"), 1, "fusions"),
    (dict(num_layers=3), 1, "num_layers"),  # pp=2 below
    (dict(vocab_size=200, make_vocab_size_divisible_by=100, mixer_num_heads=3), 3,
     "make_vocab_size_divisible_by"),
    (dict(hidden_size=0), 1, "hidden_size"),
    (dict(router_score="probability"), 1, "router_score"),
    (dict(controller_gain=1.5), 1, "controller_gain"),
])
def test_bad_config_names_the_setting(kw, tp, setting):
    from megatron_ham.models import ModelConfig

    pp = 2 if setting == "num_layers" else 1
    with pytest.raises(ValueError, match=setting):
        ModelConfig(**kw).validate(tp=tp, pp=pp)


def test_setting_error_names_key_expected_and_value():
    from megatron_ham.models import ModelConfig, SettingError

    with pytest.raises(SettingError) as e:
        ModelConfig(router="oracle").validate()
    assert (e.value.key, e.value.got) == ("router", "oracle")
    assert str(e.value) == ("key 'router': expected one of ['error_l2', 'error_cosine', 'learned', 'random'], "
                            "got 'oracle'")


def test_registry_refuses_a_clashing_kind():
    from megatron_ham.layers.kinds import LayerKind, register, symbols

    class Clash(LayerKind):
        name, symbol = "not_ham", "H"

    with pytest.raises(ValueError, match="clashes with the registered 'ham'"):
        register(Clash())
    assert symbols() == {"*": "attention", "G": "gdn", "H": "ham"}


def test_te_backend_clear_error_when_absent():
    from megatron_ham.layers import get_backend

    try:
        import transformer_engine.pytorch  # noqa: F401
        pytest.skip("Transformer Engine present")
    except Exception:
        pass
    with pytest.raises(ImportError, match="backend='te'"):
        get_backend("te")


def test_document_forward_kwargs_boundaries():
    from megatron_ham.models import document_forward_kwargs

    tokens = torch.tensor([[5, 0, 7, 8, 0, 9], [0, 1, 2, 3, 4, 0]])
    psp = document_forward_kwargs(tokens, eod_id=0)["packed_seq_params"]
    # doc ends WITH its EOD; every row starts a document; boundaries over the flattened batch
    assert psp.cu_seqlens_q.tolist() == [0, 2, 5, 6, 7, 12]
    assert psp.cu_seqlens_q.dtype == torch.int32
    assert psp.qkv_format == "sbhd" and psp.max_seqlen_q == 6
    # the host copy the layers hand to the kernels as cu_seqlens_cpu (int64, on the host)
    from megatron_ham.layers.documents import host_cu_seqlens
    host = host_cu_seqlens(psp)
    assert host.device.type == "cpu" and host.dtype == torch.int64 and host.tolist() == [0, 2, 5, 6, 7, 12]
    # an explicit device: the boundaries go there, read from the host tokens
    psp2 = document_forward_kwargs(tokens, 0, device="cpu")["packed_seq_params"]
    assert psp2.cu_seqlens_q.tolist() == [0, 2, 5, 6, 7, 12]
    with pytest.raises(ValueError, match="tokens"):
        document_forward_kwargs(tokens[0], 0)


@pytest.mark.parametrize("arch", ["transformer", "gdn", "gdn_gsa", "ham"])
def test_presets_equal_the_recipes(arch):
    """paper_800m(a) is the model of recipes/<a>_800m.yaml, setting for setting."""
    import os

    from megatron_ham.models import PAPER_ARCHITECTURES, paper_800m
    from megatron_ham.training.config import load_config

    assert arch in PAPER_ARCHITECTURES
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert paper_800m(arch) == load_config(os.path.join(repo, "recipes", f"{arch}_800m.yaml")).model


def test_presets_within_3_percent():
    from megatron_ham.models import paper_800m
    from megatron_ham.models.accounting import cache_bytes, count_parameters

    n = {a: count_parameters(paper_800m(a))["total"] for a in ("transformer", "gdn", "gdn_gsa", "ham")}
    assert max(n.values()) / min(n.values()) < 1.03, n
    assert all(7.0e8 < v < 9.0e8 for v in n.values()), n
    # HAM at 50% KV is memory-matched to GDN-GSA
    ham, gsa = cache_bytes(paper_800m("ham"), 16384), cache_bytes(paper_800m("gdn_gsa"), 16384)
    assert ham["kv_per_token"] == gsa["kv_per_token"]


# ----------------------------------------------------------------------------- one-process world

def _single_worker(rank, world):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ham import distributed as D
    from megatron_ham.layers import SDPACoreAttention
    from megatron_ham.models import ModelConfig, build_model, document_forward_kwargs
    from megatron_ham.models.accounting import count_parameters
    from megatron_ham.models.builder import transformer_config

    D.initialize(tp=1, seed=3)
    small = dict(num_layers=3, hidden_size=32, num_attention_heads=4, mixer_num_heads=2,
                 mixer_key_head_dim=8, mixer_value_head_dim=16, ffn_hidden_size=64,
                 vocab_size=100, make_vocab_size_divisible_by=64, seq_length=24, dtype="fp32",
                 use_cpu_initialization=True, impl="chunk")

    # analytic parameter count == built model, every architecture and both routers
    for arch, extra in [("transformer", {}), ("gdn", {}), ("gdn_gsa", {}), ("ham", {}),
                        ("ham", {"router": "learned"}), ("hybrid", {"pattern": "H*G"})]:
        cfg = ModelConfig(architecture=arch, **small, **extra)
        m = build_model(cfg)
        built = sum(p.numel() for p in m.parameters())
        assert built == count_parameters(cfg)["total"], (arch, extra, built, count_parameters(cfg))

    # SDPACoreAttention == Megatron's DotProductAttention (causal, GQA)
    tc = transformer_config(ModelConfig(architecture="transformer", num_query_groups=2, **small))
    pg = ProcessGroupCollection.use_mpu_process_groups()
    ref = DotProductAttention(tc, 1, AttnMaskType.causal, "self", pg_collection=pg)
    sdpa = SDPACoreAttention(tc, 1, AttnMaskType.causal, "self", pg_collection=pg)
    g = torch.Generator().manual_seed(0)
    s, b = 24, 2
    q = torch.randn(s, b, 4, 8, generator=g)
    k = torch.randn(s, b, 2, 8, generator=g)
    v = torch.randn(s, b, 2, 8, generator=g)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]
    a = ref(q, k, v, causal, attn_mask_type=AttnMaskType.causal)
    c = sdpa(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    assert torch.allclose(a, c, atol=1e-5), (a - c).abs().max()

    # documents do not leak: in a packed row [doc A | doc B], doc B's logits equal doc B alone
    for arch, extra in [("hybrid", {"pattern": "H*G"}), ("hybrid", {"pattern": "H*G", "router": "learned"})]:
        cfg = ModelConfig(architecture=arch, **{**small, **extra})
        torch.manual_seed(1)
        m = build_model(cfg)
        m.eval()
        for mx in m.modules():
            if hasattr(mx, "kv_controller"):
                mx.kv_controller.set_tau(0.3 if cfg.router == "error_l2" else 0.5)
        toks = torch.randint(1, 100, (1, 24), generator=g)
        toks[0, 9] = 0  # doc A = tokens 0..9 (ends with EOD), doc B = 10..23
        pos = torch.arange(24)[None]
        with torch.no_grad():
            packed = m(toks, pos, None, **document_forward_kwargs(toks, 0))
            alone = m(toks[:, 10:], torch.arange(14)[None], None)
            leaky = m(toks, pos, None)
        assert torch.allclose(packed[:, 10:], alone, atol=1e-4), (packed[:, 10:] - alone).abs().max()
        assert not torch.allclose(leaky[:, 10:], alone, atol=1e-4)  # the boundary matters
        assert torch.allclose(packed[:, :10], leaky[:, :10], atol=1e-5)  # causal: A unaffected

    # compiled fusions (the default on CUDA: Megatron's SwiGLU, and the mixers' conv,
    # activations, gated norm and combination) change no math (fused cross entropy: bf16 only)
    toks = torch.randint(1, 100, (2, 24), generator=g)
    pos = torch.arange(24)[None].expand(2, 24)
    results = []
    for fusions in ("off", "on"):
        cfg = ModelConfig(architecture="hybrid", pattern="H*G", fusions=fusions, **small)
        assert transformer_config(cfg).bias_activation_fusion == (fusions == "on")
        torch.manual_seed(2)
        m = build_model(cfg)
        for mx in m.modules():
            if hasattr(mx, "kv_controller"):
                assert mx.fuse_elementwise == (fusions == "on")
                mx.kv_controller.set_tau(0.3)
        loss = m(toks, pos, None, labels=toks.roll(-1, 1)).mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-5), (l0, l1)
    bad = [n for (n, _), a, b in zip(m.named_parameters(), g0, g1) if not torch.allclose(a, b, atol=1e-5)]
    assert not bad, bad


def test_models_in_one_process():
    """Analytic parameter counts == built models (4 archs, learned router, hybrid); SDPA core
    attention == Megatron's DotProductAttention; packed documents do not leak (state, conv,
    scratchpad and attention all restart at the boundary); compiled fusions on == off."""
    run_world(_single_worker, 1)


def _rope_worker(rank, world):
    """The `local` backend's RoPE (SDPACoreAttention + ops.apply_rope) equals Megatron's rotary
    embedding on the same weights: logits with and without documents, GQA, fp32."""
    import dataclasses

    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from megatron_ham import distributed as D
    from megatron_ham.layers import SDPACoreAttention
    from megatron_ham.layers.kinds import parse_pattern
    from megatron_ham.layers.specs import get_backend, layer_spec
    from megatron_ham.models import ModelConfig, build_model, document_forward_kwargs
    from megatron_ham.models.builder import transformer_config

    D.initialize(tp=1, seed=0)
    cfg = ModelConfig(architecture="transformer", num_layers=2, hidden_size=64, num_attention_heads=4,
                      num_query_groups=2, seq_length=32, vocab_size=128, dtype="fp32",
                      use_cpu_initialization=True, fusions="off")
    ours = build_model(cfg).eval()
    assert ours.position_embedding_type == "none"  # the core attention rotates q and k itself

    class MegatronRope(SDPACoreAttention):
        applies_rope = False  # Megatron's RotaryEmbedding and apply_rotary_pos_emb instead

    backend = dataclasses.replace(get_backend("local"), core_attention=MegatronRope)
    specs = [layer_spec(k, backend, cfg) for k in parse_pattern(cfg.resolved_pattern(), cfg.num_layers)]
    ref = GPTModel(config=transformer_config(cfg), transformer_layer_spec=TransformerBlockSubmodules(
        layer_specs=specs, layer_norm=backend.norm), vocab_size=cfg.padded_vocab_size(),
        max_sequence_length=cfg.seq_length, position_embedding_type="rope", rotary_base=cfg.rotary_base,
        share_embeddings_and_output_weights=cfg.tie_embeddings).eval()
    ref.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 128, (2, 32), generator=g)
    tokens[0, 9] = tokens[1, 20] = 0  # EOD: three documents
    pos = torch.arange(32).expand(2, 32)
    with torch.no_grad():
        for kw in ({}, document_forward_kwargs(tokens, 0)):
            a, b = ours(tokens, pos, None, **kw), ref(tokens, pos, None, **kw)
            assert torch.allclose(a, b, atol=1e-5), (bool(kw), (a - b).abs().max())


def test_local_rope_equals_megatron_rotary_embedding():
    run_world(_rope_worker, 1)
