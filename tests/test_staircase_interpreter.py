"""The Triton staircase kernel (megatron_ham.kernels.staircase) on the CPU, under Triton's
interpreter, against scratchpad_attention(impl="reference"): forward and dq, dk, dv, with
documents, f = 0 / 0.3 / 0.5 / 1, queries that see no key, batch rows with different routed
counts, strided inputs, fp32 and fp16, small tiles so that every phase of the walk is exercised.

The kernels run in a subprocess (tests/_staircase_interp_worker.py) because TRITON_INTERPRET must
be set before they are defined. The GPU parity tests are in tests/test_kernels_gpu.py.
"""
from __future__ import annotations

import pytest

from _interpreter import run_interpreted


def test_staircase_kernel_under_triton_interpreter():
    run_interpreted("_staircase_interp_worker.py")


def test_triton_impl_on_cpu_tensors_is_a_clear_error():
    import torch

    from megatron_ham.ops import scratchpad_attention

    q = torch.randn(1, 8, 2, 16)
    routed = torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        scratchpad_attention(q, q, q, routed, impl="triton")
    # auto on CPU is the compact path, unchanged
    ref = scratchpad_attention(q, q, q, routed, impl="reference")
    assert torch.allclose(scratchpad_attention(q, q, q, routed), ref, atol=1e-6)
