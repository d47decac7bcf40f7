"""vocab_parallel_cross_entropy: the language model's loss. Our Triton kernels
(megatron_ham.kernels.cross_entropy) on the CPU under Triton's interpreter, on one rank and over
two gloo ranks; the reference against F.cross_entropy; the dispatch and its errors. The GPU parity
test is in tests/test_kernels_gpu.py; the model's losses at TP 1 and 2 in tests/test_parallel.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _interpreter import run_interpreted
from megatron_ham.ops.cross_entropy import cross_entropy_impl, vocab_parallel_cross_entropy


def test_cross_entropy_kernels_under_triton_interpreter():
    run_interpreted("_cross_entropy_interp_worker.py")


def test_reference_is_torch_cross_entropy_and_the_dispatch():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 2, 11, generator=g) * 5).requires_grad_(True)
    t = torch.randint(0, 11, (6, 2), generator=g)
    loss = vocab_parallel_cross_entropy(x, t)
    want = F.cross_entropy(x.reshape(-1, 11), t.reshape(-1), reduction="none").view(6, 2)
    torch.testing.assert_close(loss, want)
    gl = torch.rand(6, 2, generator=g)
    (dx,) = torch.autograd.grad(loss, x, gl)
    (dwant,) = torch.autograd.grad(want, x, gl)
    torch.testing.assert_close(dx, dwant)
    assert cross_entropy_impl(x) == "reference"                    # CPU: the reference
    with pytest.raises(ValueError, match="impl='triton' needs CUDA logits"):
        vocab_parallel_cross_entropy(x, t, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        vocab_parallel_cross_entropy(x, t, impl="fused")
    with pytest.raises(ValueError, match=r"target must have logits' shape without its last dim \[6, 2\]"):
        vocab_parallel_cross_entropy(x, t[:3])
    with pytest.raises(ValueError, match="target must hold integer token ids"):
        vocab_parallel_cross_entropy(x, t.float())
