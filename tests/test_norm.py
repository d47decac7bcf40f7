"""The pre-norm with its residual branch (ops.hidden_norm_with_residual, layers.norm.HAMNorm
has_residual) and the MLP's SwiGLU (ops.swiglu): our RMSNorm kernels on the CPU under Triton's
interpreter against the reference, the dispatch and its errors, the module in a pre-norm block.
The GPU parity tests are in tests/test_kernels_gpu.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from _dist import run_world
from _interpreter import run_interpreted
from _parallel_workers import _swiglu_module_worker
from megatron_ham.layers.norm import HAMNorm
from megatron_ham.ops.norm import hidden_norm, hidden_norm_with_residual, norm_impl
from megatron_ham.ops.swiglu import swiglu, swiglu_impl


def test_rms_norm_kernels_under_triton_interpreter():
    run_interpreted("_rms_norm_interp_worker.py")


def test_reference_and_dispatch():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 2, 8, generator=g), torch.rand(8, generator=g), torch.randn(8, generator=g)
    y, r = hidden_norm_with_residual(x, w, eps=1e-6)
    assert r is x and torch.equal(y, hidden_norm(x, w, eps=1e-6))
    y, r = hidden_norm_with_residual(x, w, b, eps=1e-6)                       # LayerNorm: reference
    assert r is x and torch.equal(y, F.layer_norm(x, (8,), w, b, 1e-6))
    assert norm_impl(x, w) == "reference"                                     # CPU: the reference
    with pytest.raises(ValueError, match="impl='triton' needs a CUDA RMSNorm"):
        hidden_norm_with_residual(x, w, eps=1e-6, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        hidden_norm_with_residual(x, w, eps=1e-6, impl="cuda")
    with pytest.raises(ValueError, match=r"weight must have shape \[h\]"):
        hidden_norm_with_residual(x, w[:4], eps=1e-6)


def test_pre_norm_module_returns_the_residual_and_the_same_gradients():
    """HAMNorm(has_residual=True) in a pre-norm block (out = residual + f(norm(x)), as megatron's
    TransformerLayer uses its tuple) gives the plain norm's output and gradients; zero-centred
    weights too."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, 16, generator=g)
    for zero_centered in (False, True):
        cfg = SimpleNamespace(normalization="RMSNorm", params_dtype=torch.float32, sequence_parallel=False,
                              layernorm_zero_centered_gamma=zero_centered, use_cpu_initialization=True)
        res = []
        for has_residual in (False, True):
            norm = HAMNorm(cfg, 16, eps=1e-5, has_residual=has_residual)
            with torch.no_grad():
                norm.weight.add_(torch.linspace(-0.3, 0.3, 16))
            x = x0.clone().requires_grad_(True)
            out = norm(x)
            assert isinstance(out, tuple) == has_residual
            y, residual = out if has_residual else (out, x)
            (residual + torch.tanh(y) * 2).pow(2).sum().backward()
            res.append((y.detach(), x.grad, norm.weight.grad))
        for a, b in zip(*res):
            torch.testing.assert_close(a, b)


def test_swiglu_reference_and_dispatch():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 1, 12, generator=g)
    torch.testing.assert_close(swiglu(x), F.silu(x[..., :6]) * x[..., 6:])
    assert swiglu_impl(x) == "reference"
    with pytest.raises(ValueError, match="impl='liger' needs CUDA x and liger-kernel"):
        swiglu(x, impl="liger")
    with pytest.raises(ValueError, match=r"\[..., 2F\]"):
        swiglu(x[..., 1:])


def test_swiglu_module_in_megatron_mlp():
    """megatron-core's MLP with our SwiGLU module (its activation-module hook) == its own SwiGLU:
    output and gradients, and the same state dict keys."""
    run_world(_swiglu_module_worker, 1)
