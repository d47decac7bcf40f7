"""Layer kinds: one module per kind declares everything the code asks of it (registry.py).

Built in: attention ('*'), gdn ('G'), ham ('H'). A new kind is one module that subclasses
LayerKind and calls register() (CONTRIBUTING.md "How to add a layer kind").
"""
from .registry import (
    Fused,
    LayerKind,
    Section,
    SettingError,
    divisible,
    get_kind,
    kinds,
    parse_pattern,
    positive_int,
    register,
    symbols,
    unregister,
)
from . import attention, gdn, ham  # noqa: E402,F401  (register the built-in kinds)
from .ham import step_kv_controllers  # noqa: E402

__all__ = [
    "Fused", "LayerKind", "Section", "SettingError", "divisible", "get_kind", "kinds",
    "parse_pattern", "positive_int", "register", "symbols", "unregister", "step_kv_controllers",
]
