"""Run by tests/test_qkv_activation.py with TRITON_INTERPRET=1: the short conv fused with the q, k,
v activations (megatron_ham.kernels.qkv_activation, conv_qkv_activations_triton) on the CPU
against the op's reference: outputs, the in-projection's gradient (q, k, v columns and the other
sections') and the conv weight's. Prints OK at the end."""
import torch

from megatron_ham.kernels.qkv_activation import CONV_BT, CONV_SUB, conv_qkv_activations_triton
from megatron_ham.ops.gdn_activations import conv_qkv_activations

torch.manual_seed(0)


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


# K != V (masked columns), rows that are not a multiple of any tile, more tokens than one conv
# program (CONV_BT * CONV_SUB), documents (a 1-token one, one that starts inside a tile), a row
# whose q head is all zeros (the norm clamped at eps), a transposed u (the mixers' [s, b] layout)
T_long = CONV_BT * CONV_SUB + 37
for B, T, H, K, V, W, docs in ((2, 45, 2, 16, 32, 4, False), (1, T_long, 1, 32, 16, 3, True),
                               (2, 45, 2, 16, 32, 4, True), (3, 7, 1, 16, 16, 1, False)):
    C, sections = H * (2 * K + V), [V * H, H, 3]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        # [T, B, D] storage viewed as [B, T, D], as the mixer's projection
        u = (torch.randn(T, B, C + sum(sections)) * 2).to(dtype).transpose(0, 1)
        u[0, 1:3, :K] = 0.0
        w = torch.randn(C, W).to(dtype)
        doc = None
        if docs:
            cut = sorted({1, 2, T // 3, T - 1})
            ids = torch.zeros(B, T, dtype=torch.int64)
            for c in cut:
                ids[:, c:] += 1
            doc = ids + torch.arange(B)[:, None] * 100  # ids over the flattened batch
        for branches in (1, 2):
            ut, wt = u.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
            ur, wr = u.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
            out = conv_qkv_activations_triton(ut, wt, H, K, V, doc, branches, sections)
            ref = conv_qkv_activations(ur, wr, H, K, V, doc, branches, sections, impl="reference")
            assert len(out) == len(ref) == 3 * branches + len(sections)
            grads = [torch.randn(o.shape) for o in ref]
            used = [i for i in range(len(ref)) if i != 1]  # k of the first branch: no gradient
            torch.autograd.backward([out[i].float() for i in used], [grads[i] for i in used])
            torch.autograd.backward([ref[i] for i in used], [grads[i] for i in used])
            for i, (a, b) in enumerate(zip(out, ref)):
                assert a.dtype == dtype and rel(a, b) < tol, (B, T, W, docs, dtype, "out", i, rel(a, b))
            for name, a, b in (("du", ut.grad, ur.grad), ("dw", wt.grad, wr.grad)):
                assert a.dtype == dtype and rel(a, b) < tol, (B, T, W, docs, dtype, branches, name, rel(a, b))
            # the other sections are views of u, and their gradients land in u's
            assert out[-1].data_ptr() == ut[..., -3:].data_ptr()
            assert torch.equal(ut.grad[..., C + V * H: C + V * H + H], grads[3 * branches + 1].to(dtype))
# a section without a gradient: its columns of u's gradient are zero
u = torch.randn(1, 9, 2 * (16 + 16 + 16) + 5, requires_grad=True)
out = conv_qkv_activations_triton(u, torch.randn(96, 4), 2, 16, 16, None, 1, [5])
out[0].sum().backward()
assert not u.grad[..., -5:].any() and u.grad[..., :32].abs().sum() > 0
print("OK")
