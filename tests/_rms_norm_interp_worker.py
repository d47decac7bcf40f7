"""Run by tests/test_norm.py with TRITON_INTERPRET=1: our RMSNorm-with-residual kernels
(megatron_ham.kernels.rms_norm) on the CPU against the reference (F.rms_norm, the residual being
x itself), forward and backward. Prints OK at the end."""
import torch

from megatron_ham.kernels.rms_norm import INTERPRETER_TILE, rms_norm_with_residual_triton
from megatron_ham.ops.norm import hidden_norm_with_residual

torch.manual_seed(0)
# h not a power of two (masked columns), a row count that is not a multiple of the tile and
# more tiles than the interpreter's 3 backward programs (each walks several), a zero row,
# 3-d input as the layers pass it ([s, b, h]), weights in x's dtype and in fp32
BT = INTERPRETER_TILE[0]
for shape in ((7 * BT + 3, 2, 20), (1, 1, 16)):
    for dtype, wdtype, tol in ((torch.float32, torch.float32, 1e-5), (torch.bfloat16, torch.bfloat16, 2e-2),
                               (torch.bfloat16, torch.float32, 2e-2)):
        x = (torch.randn(shape) * 3).to(dtype)
        x[0, 0] = 0.0
        w = (torch.rand(shape[-1]) + 0.5).to(wdtype)
        for used in ("both", "norm", "residual"):
            xt, wt = x.clone().requires_grad_(True), w.clone().requires_grad_(True)  # leaves
            xr, wr = x.float().clone().requires_grad_(True), w.float().clone().requires_grad_(True)
            out = rms_norm_with_residual_triton(xt, wt, 1e-5)
            ref = hidden_norm_with_residual(xr, wr, eps=1e-5, impl="reference")
            assert out[1].data_ptr() == xt.data_ptr() and out[0].dtype == dtype, "residual is x"
            gy, gr = torch.randn(shape), torch.randn(shape)
            pick = {"both": (gy, gr), "norm": (gy, None), "residual": (None, gr)}[used]
            for o, g in zip(out, pick):
                if g is not None:
                    (o.float() * g).sum().backward(retain_graph=True)
            for o, g in zip(ref, pick):
                if g is not None:
                    (o * g).sum().backward(retain_graph=True)
            pairs = [("y", out[0], ref[0]), ("dx", xt.grad, xr.grad)]
            if used != "residual":
                pairs.append(("dw", wt.grad, wr.grad))
            for name, a, b in pairs:
                err = (a.float() - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
                assert err < tol, (shape, dtype, wdtype, used, name, err)
            if used == "residual":
                assert wt.grad is None or wt.grad.abs().max() == 0
print("OK")
