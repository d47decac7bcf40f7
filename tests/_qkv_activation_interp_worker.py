"""Run by tests/test_qkv_activation.py with TRITON_INTERPRET=1: our q, k, v activation kernels
(megatron_ham.kernels.qkv_activation) on the CPU against the reference, forward and backward.
Prints OK at the end."""
import torch

from megatron_ham.kernels.qkv_activation import BT, qkv_activations_triton
from megatron_ham.ops.gdn_activations import qkv_activations

torch.manual_seed(0)
# K != V (masked columns: BD = 32 > K), a row count that is not a multiple of the tile, a
# row whose q head is all zeros (the norm clamped at eps) and one with a large scale
for B, T, H, K, V in ((2, BT + 5, 3, 16, 32), (1, 3, 1, 32, 16)):
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x = (torch.randn(B, T, H * (2 * K + V)) * 2).to(dtype)
        x[0, 1, :K] = 0.0
        x[-1, -1, H * K: H * K + K] *= 50
        x.requires_grad_(True)
        xr = x.detach().float().requires_grad_(True)
        out = qkv_activations_triton(x, H, K, V)
        ref = qkv_activations(xr, H, K, V, silu=True, impl="reference")
        grads = [torch.randn(o.shape) for o in ref]
        torch.autograd.backward([o.float() for o in out], grads)
        torch.autograd.backward(ref, grads)
        for name, a, b in zip(("q", "k", "v", "dx"), list(out) + [x.grad], list(ref) + [xr.grad]):
            assert a.dtype == dtype and a.is_contiguous(), (name, a.dtype)
            err = (a.float() - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
            assert err < tol, (B, T, H, K, V, dtype, name, err)
        # a gradient for q only (k, v unused): the others count as zero
        x.grad = None
        out = qkv_activations_triton(x, H, K, V)
        out[0].float().sum().backward()
        xr.grad = None
        qkv_activations(xr, H, K, V, silu=True, impl="reference")[0].sum().backward()
        err = (x.grad.float() - xr.grad).abs().max().item() / xr.grad.abs().max().item()
        assert err < tol, ("q only", dtype, err)
        # two branches (HAM's state and scratchpad): the same values; each copy's gradient counts
        x.grad = None
        out = qkv_activations_triton(x, H, K, V, branches=2)
        assert len(out) == 6 and all(torch.equal(a, b) for a, b in zip(out[:3], out[3:]))
        g1, g2 = [torch.randn(o.shape) for o in ref], [torch.randn(o.shape) for o in ref]
        torch.autograd.backward([o.float() for o in out[:3]] + [out[3].float(), out[5].float()],
                                g1 + [g2[0], g2[2]])
        xr.grad = None
        torch.autograd.backward(qkv_activations(xr, H, K, V, silu=True, impl="reference"),
                                [g1[0] + g2[0], g1[1], g1[2] + g2[2]])
        err = (x.grad.float() - xr.grad).abs().max().item() / xr.grad.abs().max().item()
        assert err < tol, ("two branches", dtype, err)
print("OK")
