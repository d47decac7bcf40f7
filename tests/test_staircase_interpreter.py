"""The Triton staircase kernel (megatron_ham.kernels.staircase) on the CPU, under Triton's
interpreter, against scratchpad_attention(impl="reference"): forward and dq, dk, dv, with
documents, f = 0 / 0.3 / 0.5 / 1, queries that see no key, batch rows with different routed
counts, strided inputs, fp32 and fp16, small tiles so that every phase of the walk is exercised,
the schedule's head groups (a short last group, one head per group).

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


def test_heads_per_group_fits_the_l2_budget():
    """The schedule's groups: a power of two of heads whose walked rows fit the budget, >= 1."""
    from megatron_ham.kernels.staircase import L2_BUDGET, heads_per_group

    assert heads_per_group(16384, 128, 128, 2) == 4               # 8 MiB per head, 32 MiB budget
    assert heads_per_group(16384, 128, 128, 4) == 2
    assert heads_per_group(4096, 128, 128, 2) == 16
    assert heads_per_group(3 * 4096, 128, 128, 2) == 4             # 5.3 heads fit: rounded down
    assert heads_per_group(1 << 20, 128, 128, 2) == 1              # one head over the budget
    for T in (1, 1000, 16384, 100_000):
        g = heads_per_group(T, 64, 96, 2)
        assert g & (g - 1) == 0 and (g == 1 or g * T * 160 * 2 <= L2_BUDGET)
