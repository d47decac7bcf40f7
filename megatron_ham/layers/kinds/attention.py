"""Layer kind "attention" ('*'): causal softmax attention with RoPE and grouped query heads.

Megatron's SelfAttention (fused linear_qkv, rows per query group [q x heads/groups, k, v] x
head_dim; linear_proj) with the backend's core attention (SDPACoreAttention on `local`). Its
settings are Megatron's own (num_attention_heads, num_query_groups, kv_channels, rotary_base),
reaching it through the TransformerConfig (models/builder.transformer_config). On `local`,
SDPACoreAttention applies RoPE itself (fused with model.fusions) and takes sdpa_backend, through
the spec's params; on `te`, Megatron's rotary embedding and TE's attention do.
"""
from __future__ import annotations

from .registry import Fused, LayerKind, Section, SettingError, divisible, register


class AttentionKind(LayerKind):
    name = "attention"
    symbol = "*"
    architecture = "transformer"
    uses_rope = True
    hf_module = "modeling_ham.HAMAttention"
    hf_slot = "self_attn"

    def check(self, cfg, tp: int) -> None:
        from megatron_ham.layers.sdpa_attention import SDPA_BACKENDS

        if cfg.sdpa_backend not in SDPA_BACKENDS:
            raise SettingError("sdpa_backend", f"one of {list(SDPA_BACKENDS)}", cfg.sdpa_backend)
        nh = cfg.num_attention_heads
        if cfg.hidden_size % nh and not cfg.kv_channels:
            raise SettingError("num_attention_heads", f"a divisor of hidden_size={cfg.hidden_size} "
                               "(or set kv_channels)", nh)
        divisible("num_attention_heads", nh, tp, "tensor_model_parallel_size")
        g = cfg.resolved_num_query_groups()
        if nh % g:
            raise SettingError("num_query_groups", f"a divisor of num_attention_heads={nh}", g)
        divisible("num_query_groups", g, tp, "tensor_model_parallel_size")

    def spec(self, backend, cfg):
        from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.transformer.identity_op import IdentityOp
        from megatron.core.transformer.spec_utils import ModuleSpec

        core = backend.core_attention
        if getattr(core, "applies_rope", False):
            core = ModuleSpec(module=core, params={"sdpa_backend": cfg.sdpa_backend,
                                                   "rotary_base": float(cfg.rotary_base),
                                                   "fuse_rope": cfg.resolved_fusions()})
        return ModuleSpec(
            module=SelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=backend.column_parallel_linear,
                core_attention=core,
                linear_proj=backend.row_parallel_linear,
                q_layernorm=IdentityOp,
                k_layernorm=IdentityOp,
            ),
        )

    def fused(self, cfg):
        nh, ng, d = cfg.num_attention_heads, cfg.resolved_num_query_groups(), cfg.resolved_kv_channels()
        per_group = (Section("q", nh // ng * d, "q"), Section("k", d, "k"), Section("v", d, "v"))
        return [Fused("linear_qkv.weight", per_group, ng, cfg.hidden_size, "{}_proj.weight",
                      interleaved=True)]

    def renames(self, cfg):
        return {"linear_proj.weight": "o_proj.weight"}

    def parameters(self, cfg) -> int:
        nh, d = cfg.num_attention_heads, cfg.resolved_kv_channels()
        return sum(f.numel() for f in self.fused(cfg)) + nh * d * cfg.hidden_size

    def flops_per_token(self, cfg, kv_fraction=None) -> float:
        # scores and scores x values: 2 x 2 x heads x head_dim per visible key, s_avg keys
        s_avg = (cfg.seq_length + 1) / 2.0
        return 4.0 * cfg.num_attention_heads * cfg.resolved_kv_channels() * s_avg

    def cache_bytes(self, cfg, kv_bytes: int = 2, state_bytes: int = 4):
        return 2.0 * cfg.resolved_num_query_groups() * cfg.resolved_kv_channels() * kv_bytes, 0.0

    def hf_settings(self, cfg):
        return {"num_attention_heads": cfg.num_attention_heads,
                "num_key_value_heads": cfg.resolved_num_query_groups(),
                "head_dim": cfg.resolved_kv_channels(), "rope_theta": float(cfg.rotary_base)}


ATTENTION = register(AttentionKind())
