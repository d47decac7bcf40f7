"""The ops' one door to the optional GPU kernels (``megatron_ham.kernels``).

An exported Hugging Face directory carries the ops files but not the kernels package, so the
ops reach it only through :func:`load_kernels`, which returns None where it cannot be imported.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional


def load_kernels(submodule: str = "") -> Optional[ModuleType]:
    """``megatron_ham.kernels`` (or ``megatron_ham.kernels.<submodule>``), None if not importable."""
    name = "megatron_ham.kernels" + (f".{submodule}" if submodule else "")
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def kernel_import_error(submodule: str) -> str:
    """Why ``megatron_ham.kernels.<submodule>`` cannot run here, for error messages."""
    kernels = load_kernels()
    if kernels is None:
        return "megatron_ham.kernels is not importable"
    return str(kernels.import_error(submodule))
