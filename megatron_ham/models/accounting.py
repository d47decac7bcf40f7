"""Parameter counts and inference-memory accounting of a ModelConfig (analytic, no build).

The count matches build_model(cfg) parameter for parameter (tests/test_models.py checks it on a
small config of every architecture).
"""
from __future__ import annotations

from typing import Dict

from .config import ModelConfig


def layer_parameters(cfg: ModelConfig, kind: str) -> int:
    """Parameters of one layer (norms + mixer + SwiGLU MLP), kind in ham / gdn / attention."""
    h, f = cfg.hidden_size, cfg.resolved_ffn_hidden_size()
    n = 2 * h * (2 if cfg.normalization == "LayerNorm" else 1) + 3 * h * f
    if kind == "attention":
        nh, ng, d = cfg.num_attention_heads, cfg.resolved_num_query_groups(), cfg.resolved_kv_channels()
        return n + h * (nh * d + 2 * ng * d) + nh * d * h
    H, K, V = cfg.mixer_num_heads, cfg.mixer_key_head_dim, cfg.mixer_value_head_dim
    per_head = 2 * K + 2 * V + 2 + (2 if kind == "ham" else 0)
    n += h * H * per_head + H * (2 * K + V) * cfg.conv_kernel + 2 * H + V + H * V * h
    if kind == "ham" and cfg.router == "learned":
        rh = cfg.router_hidden_size or max(1, h // 4)
        n += h * rh + rh + rh + 1
    return n


def count_parameters(cfg: ModelConfig) -> Dict[str, int]:
    """{"embedding", "output", "layers", "final_norm", "total"} for the whole (unsharded) model."""
    from megatron_ham.layers.specs import parse_pattern

    kinds = parse_pattern(cfg.resolved_pattern(), cfg.num_layers)
    h, vp = cfg.hidden_size, cfg.padded_vocab_size()
    out = {
        "embedding": vp * h,
        "output": 0 if cfg.tie_embeddings else vp * h,
        "layers": sum(layer_parameters(cfg, k) for k in kinds),
        "final_norm": h * (2 if cfg.normalization == "LayerNorm" else 1),
    }
    out["total"] = sum(out.values())
    return out


def cache_bytes(cfg: ModelConfig, context: int, kv_bytes: int = 2, state_bytes: int = 4) -> Dict[str, float]:
    """Inference memory per sequence of `context` tokens.

    kv_per_token: bytes of K and V per token: attention layers 2*groups*d*kv_bytes each; HAM
        layers kv_fraction * H*(K+V)*kv_bytes each (only routed tokens are stored).
    state_per_seq: the constant recurrent memory of GDN/HAM layers per sequence: the state
        H*K*V*state_bytes (fp32) plus the conv tail H*(2K+V)*(kernel-1)*kv_bytes.
    total_per_token: kv_per_token + state_per_seq / context (state amortised over the context).
    """
    from megatron_ham.layers.specs import parse_pattern

    kinds = parse_pattern(cfg.resolved_pattern(), cfg.num_layers)
    H, K, V = cfg.mixer_num_heads, cfg.mixer_key_head_dim, cfg.mixer_value_head_dim
    kv = 0.0
    state = 0.0
    for k in kinds:
        if k == "attention":
            kv += 2 * cfg.resolved_num_query_groups() * cfg.resolved_kv_channels() * kv_bytes
        else:
            state += H * K * V * state_bytes + H * (2 * K + V) * (cfg.conv_kernel - 1) * kv_bytes
            if k == "ham":
                kv += float(cfg.kv_fraction) * H * (K + V) * kv_bytes
    return {"kv_per_token": kv, "state_per_seq": state, "total_per_token": kv + state / context}
