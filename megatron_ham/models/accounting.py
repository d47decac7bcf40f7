"""Parameter counts and inference-memory accounting of a ModelConfig (analytic, no build).

Per layer: the norms and the SwiGLU MLP here, the mixer from its layer kind
(LayerKind.parameters / cache_bytes, megatron_ham/layers/kinds). The count matches
build_model(cfg) parameter for parameter (tests/test_models.py checks it on a small config of
every architecture).
"""
from __future__ import annotations

from typing import Dict

from megatron_ham.layers.kinds import get_kind, parse_pattern

from .config import ModelConfig


def layer_parameters(cfg: ModelConfig, kind: str) -> int:
    """Parameters of one layer (norms + mixer + SwiGLU MLP) of the layer kind named `kind`."""
    h, f = cfg.hidden_size, cfg.resolved_ffn_hidden_size()
    n = 2 * h * (2 if cfg.normalization == "LayerNorm" else 1) + 3 * h * f
    return n + get_kind(kind).parameters(cfg)


def count_parameters(cfg: ModelConfig) -> Dict[str, int]:
    """{"embedding", "output", "layers", "final_norm", "total"} for the whole (unsharded) model."""
    kinds = parse_pattern(cfg.resolved_pattern(), cfg.num_layers)
    h, vp = cfg.hidden_size, cfg.padded_vocab_size()
    out = {
        "embedding": vp * h,
        "output": 0 if cfg.tie_embeddings else vp * h,
        "layers": sum(layer_parameters(cfg, k.name) for k in kinds),
        "final_norm": h * (2 if cfg.normalization == "LayerNorm" else 1),
    }
    out["total"] = sum(out.values())
    return out


def cache_bytes(cfg: ModelConfig, context: int, kv_bytes: int = 2, state_bytes: int = 4) -> Dict[str, float]:
    """Inference memory per sequence of `context` tokens, summed over the layers' kinds.

    kv_per_token: bytes of K and V per token (attention layers 2*groups*d*kv_bytes each; HAM
        layers kv_fraction * H*(K+V)*kv_bytes each: only routed tokens are stored).
    state_per_seq: the constant recurrent memory per sequence (GDN/HAM: the state
        H*K*V*state_bytes (fp32) plus the conv tail H*(2K+V)*(kernel-1)*kv_bytes).
    total_per_token: kv_per_token + state_per_seq / context (state amortised over the context).
    """
    kv = state = 0.0
    for k in parse_pattern(cfg.resolved_pattern(), cfg.num_layers):
        a, b = k.cache_bytes(cfg, kv_bytes, state_bytes)
        kv, state = kv + a, state + b
    return {"kv_per_token": kv, "state_per_seq": state, "total_per_token": kv + state / context}
