"""Megatron-Core modules and ModuleSpecs of megatron-ham (layout [s, b, h], heads split over TP)."""
from .gdn_mixer import GDNMixer, GDNMixerSubmodules, MixerOptions
from .ham_mixer import HAMMixer
from .norm import HAMNorm
from .sdpa_attention import SDPACoreAttention
from .specs import BACKENDS, LAYER_SYMBOLS, get_backend, layer_spec, mixer_spec, parse_pattern
from .tp_utils import all_reduce_backward

__all__ = [
    "GDNMixer", "GDNMixerSubmodules", "MixerOptions", "HAMMixer", "HAMNorm", "SDPACoreAttention",
    "BACKENDS", "LAYER_SYMBOLS", "get_backend", "layer_spec", "mixer_spec", "parse_pattern",
    "all_reduce_backward",
]
