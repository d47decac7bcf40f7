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


def resolve_kernel_impl(op: str, impl: str, impls, kernel: str, runnable: bool, submodule: str,
                        needs: str) -> str:
    """The impl an op with one GPU kernel besides its reference runs. "auto" is ``kernel`` when
    the inputs can take it (``runnable``) and ``megatron_ham.kernels.<submodule>`` imports, else
    "reference"; ``kernel`` asked for where it cannot run raises ValueError saying what it
    ``needs``; an impl outside ``impls`` raises too."""
    if impl not in impls:
        raise ValueError(f"{op}: impl must be one of {list(impls)}, got {impl!r}")
    if impl == "reference" or (impl == "auto" and not runnable):
        return "reference"
    kernels = load_kernels()
    if runnable and kernels is not None and kernels.import_error(submodule) is None:
        return kernel
    if impl == "auto":
        return "reference"
    raise ValueError(f"{op}: impl={kernel!r} needs {needs}; import: {kernel_import_error(submodule)}")
