"""The Hugging Face side of the layer kinds: the module class each kind builds, the decoder-layer
attribute that holds it, and the section table it builds its projections from.

In the package these come from the registry (megatron_ham.layers.kinds: LayerKind.hf_module,
hf_slot, fused). An export directory, loaded without megatron_ham, has its own layer_kinds.py
with the same three functions for the kinds of that model, written by ham-convert-hf
(convert.write_layer_kinds).
"""
from __future__ import annotations

from typing import Dict, List


def mixer_class(kind: str):
    """The HF module class of layer kind `kind` (built as cls(config, layer_idx))."""
    from megatron_ham.layers.kinds import get_kind

    m = get_kind(kind).hf_module
    if isinstance(m, str):  # "modeling_ham.<Class>": a class of the shipped modeling code
        from . import modeling_ham

        return getattr(modeling_ham, m.split(".", 1)[1])
    return m


def mixer_slot(kind: str) -> str:
    """The HAMDecoderLayer attribute holding the module of layer kind `kind`."""
    from megatron_ham.layers.kinds import get_kind

    return get_kind(kind).hf_slot


def section_table(kind, cfg) -> Dict[str, List[list]]:
    """LayerKind `kind`'s fused parameters for ModelConfig `cfg`, as HAMConfig.fused_sections
    holds them: {Megatron parameter: [[HF name, rows], ...]}."""
    return {f.param: [[s.hf, s.width * f.units] for s in f.sections] for f in kind.fused(cfg)}


def kind_sections(config, kind: str) -> Dict[str, List[list]]:
    """The section table of layer kind `kind` for HAMConfig `config`: config.fused_sections, or
    for a config written before that field, the registry's table at the config's sizes."""
    if config.fused_sections is not None:
        return config.fused_sections[kind]
    from megatron_ham.layers.kinds import get_kind
    from megatron_ham.models.config import ModelConfig

    sizes = ModelConfig(
        hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_key_value_heads, kv_channels=config.head_dim,
        mixer_num_heads=config.mixer_num_heads, mixer_key_head_dim=config.mixer_key_head_dim,
        mixer_value_head_dim=config.mixer_value_head_dim, conv_kernel=config.conv_kernel)
    return section_table(get_kind(kind), sizes)
