"""The paper's ~800M configurations (hidden 1536, Llama-2 32k vocab, 16,384 context)."""
from __future__ import annotations

from .config import ModelConfig


def paper_800m(architecture: str) -> ModelConfig:
    """~800M config of `architecture` ("transformer" | "gdn" | "gdn_gsa" | "ham"); placeholder,
    sizes tuned by tools/model_table.py to be within 3% of each other."""
    base = dict(
        architecture=architecture, hidden_size=1536, vocab_size=32000, seq_length=16384,
        num_attention_heads=12, kv_channels=128, mixer_num_heads=12, mixer_key_head_dim=128,
        mixer_value_head_dim=128, ffn_hidden_size=4096, dtype="bf16", kv_fraction=0.5,
        router="learned",
    )
    layers = {"transformer": 24, "gdn": 22, "gdn_gsa": 22, "ham": 22}
    if architecture not in layers:
        raise ValueError(f"architecture must be one of {sorted(layers)}, got {architecture!r}")
    return ModelConfig(num_layers=layers[architecture], **base)
