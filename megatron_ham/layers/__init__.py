"""Megatron-Core modules and ModuleSpecs of megatron-ham (layout [s, b, h], heads split over TP);
the layer kinds (megatron_ham.layers.kinds) say which mixer each pattern symbol builds.

Names are imported on first use, so `megatron_ham.layers.kinds` (the registry, which the model
config and the recipe loader need) does not import megatron-core.
"""
import importlib

_EXPORTS = {
    "document_forward_kwargs": "documents",
    "GDNMixer": "gdn_mixer", "GDNMixerSubmodules": "gdn_mixer",
    "HAMMixer": "ham_mixer",
    "LayerKind": "kinds", "get_kind": "kinds", "kinds": "kinds", "parse_pattern": "kinds",
    "register": "kinds", "step_kv_controllers": "kinds",
    "HAMNorm": "norm",
    "SDPACoreAttention": "sdpa_attention",
    "SectionedMixer": "sectioned",
    "BACKENDS": "specs", "get_backend": "specs", "layer_spec": "specs",
    "all_reduce_backward": "tp_utils",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megatron_ham.layers' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
