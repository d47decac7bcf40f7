"""The paper's ~800M configurations: hidden 1536, Llama-2 32k vocab, 16,384 context, SwiGLU
FFN 4096, 12 heads of 128 everywhere; layer counts chosen so the four parameter counts are
within 3% of each other (tools/model_table.py prints them):
  transformer 24 x '*'; gdn 22 x 'G'; gdn_gsa 23 layers 'G*G*...G' (12 GDN + 11 attention);
  ham 22 x 'H' at 50% KV with the learned router. HAM at 50% KV stores as many KV bytes per
  token as GDN-GSA's 11 attention layers (the paper's memory-matched comparison).
The recipes recipes/{transformer,gdn,gdn_gsa,ham}_800m.yaml are the same models
(tests/test_models.py checks paper_800m(a) == the recipe's model section).
"""
from __future__ import annotations

from .config import ModelConfig

_LAYERS = {"transformer": 24, "gdn": 22, "gdn_gsa": 23, "ham": 22}
#: the paper's four architectures, as recipes/<architecture>_800m.yaml (tests check equality)
PAPER_ARCHITECTURES = tuple(_LAYERS)
#: speed settings of one architecture's recipe (same math): the Transformer keeps torch's pre-norms
#: and megatron-core's SwiGLU (measured faster for it, docs/benchmarks.md 2026-12-03)
_SPEED = {"transformer": dict(norm_mlp_kernels=False)}


def paper_800m(architecture: str, **overrides) -> ModelConfig:
    """~800M ModelConfig of `architecture` ("transformer" | "gdn" | "gdn_gsa" | "ham")."""
    if architecture not in _LAYERS:
        raise ValueError(f"architecture must be one of {sorted(_LAYERS)}, got {architecture!r}")
    base = dict(
        architecture=architecture, num_layers=_LAYERS[architecture], hidden_size=1536,
        ffn_hidden_size=4096, vocab_size=32000, seq_length=16384, num_attention_heads=12,
        kv_channels=128, mixer_num_heads=12, mixer_key_head_dim=128, mixer_value_head_dim=128,
        dtype="bf16", kv_fraction=0.5, router="learned", router_score="logit", gsa_attention_every=2,
    )
    base.update(_SPEED.get(architecture, {}))
    base.update(overrides)
    return ModelConfig(**base)
