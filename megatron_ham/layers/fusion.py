"""Compiled elementwise chains of the mixers (`model.fusions`; on by default with CUDA).

The ops the mixers call between their matmuls and kernels (short conv, activations, gated norm,
combination) are eager PyTorch in megatron_ham.ops -- the CPU reference. With fusions on, the
mixers call the same functions through ``torch.compile``: each chain of elementwise ops becomes
a few fused kernels that also save fewer activations for backward. One compiled graph per
function and input signature (static shapes: training never recompiles);
tests/test_kernels_gpu.py checks compiled == eager on the GPU, tests/test_models.py on CPU.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

_COMPILED: Dict[Callable, Callable] = {}


def maybe_compiled(fn: Callable, enabled: bool) -> Callable:
    """`fn` itself, or (enabled) its cached ``torch.compile(fn, dynamic=False)``."""
    if not enabled:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]
