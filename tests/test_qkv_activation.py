"""qkv_activations: the SiLU + per-head L2 norm of the conv's q, k, v. Our Triton kernels
(megatron_ham.kernels.qkv_activation) on the CPU under Triton's interpreter against the
reference; the dispatch and its errors. The GPU parity test is in tests/test_kernels_gpu.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _interpreter import run_interpreted
from megatron_ham.ops.gdn_activations import decay_and_beta, gdn_activations, qkv_activations, qkv_impl


def test_qkv_kernels_under_triton_interpreter():
    run_interpreted("_qkv_activation_interp_worker.py")


def test_halves_are_the_whole_and_the_dispatch():
    g = torch.Generator().manual_seed(0)
    H, K, V = 2, 4, 3
    x = torch.randn(1, 5, H * (2 * K + V), generator=g)
    a, b = torch.randn(1, 5, H, generator=g), torch.randn(1, 5, H, generator=g)
    A_log, dt = torch.randn(H, generator=g), torch.randn(H, generator=g)
    whole = gdn_activations(x, a, b, A_log, dt, H, K, V, silu=True)
    halves = qkv_activations(x, H, K, V, silu=True) + decay_and_beta(a, b, A_log, dt)
    for w, h in zip(whole, halves):
        torch.testing.assert_close(w, h)
    torch.testing.assert_close(whole[0], F.normalize(F.silu(x[..., :H * K]).view(1, 5, H, K), dim=-1))
    assert qkv_impl(x) == "reference"                       # CPU: the reference
    with pytest.raises(ValueError, match="impl='triton' needs CUDA bf16/fp16 qkv and silu=True"):
        qkv_activations(x, H, K, V, silu=True, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        qkv_activations(x, H, K, V, impl="cuda")
    with pytest.raises(ValueError, match="qkv"):
        qkv_activations(x[..., 1:], H, K, V)
