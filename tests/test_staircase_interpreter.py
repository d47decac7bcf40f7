"""The Triton staircase kernel (megatron_ham.kernels.staircase) on the CPU, under Triton's
interpreter, against scratchpad_attention(impl="reference"): forward and dq, dk, dv, with
documents, f = 0 / 0.3 / 0.5 / 1, queries that see no key, batch rows with different routed
counts, strided inputs, fp32 and fp16, small tiles so that every phase of the walk is exercised.

The kernels run in a subprocess (tests/_staircase_interp_worker.py) because TRITON_INTERPRET must
be set before they are defined. The GPU parity tests are in tests/test_kernels_gpu.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_staircase_kernel_under_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "_staircase_interp_worker.py")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr[-4000:]


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
