"""Runs megatron_ham.kernels.conv1d under Triton's CPU interpreter against the reference.

Started by tests/test_short_conv.py in a fresh process (TRITON_INTERPRET must be set before the
kernel module is imported). Prints one line per case and exits non-zero (AssertionError naming
the case) on the first mismatch.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from megatron_ham.kernels import conv1d  # noqa: E402
from megatron_ham.ops.short_conv import causal_conv_silu  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def case(name, B, T, C, W, cu=None, strided=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # x as a column slice of a wider projection (unit channel stride only)
        x = torch.randn(B, T, C + 24, generator=g).to(dtype)[..., 8:8 + C]
    else:
        x = torch.randn(B, T, C, generator=g).to(dtype)
    w = torch.randn(C, W, generator=g).to(dtype)
    dy = torch.randn(B, T, C, generator=g).to(dtype)
    xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = conv1d.causal_conv_triton(xl, wl, cu)
    y.backward(dy)
    xr, wr = x.double().requires_grad_(True), w.double().requires_grad_(True)
    doc = None
    if cu is not None:  # the reference takes documents as ids
        doc = torch.searchsorted(cu[1:], torch.arange(T), right=True)[None]
    y_r = causal_conv_silu(xr, wr, doc, impl="reference", silu=False)
    y_r.backward(dy.double())
    assert y.shape == y_r.shape and y.dtype == dtype and y.is_contiguous(), name
    errs = {"y": rel(y, y_r), "dx": rel(xl.grad, xr.grad), "dw": rel(wl.grad, wr.grad)}
    print(f"{name}: " + " ".join(f"{n} {e:.1e}" for n, e in errs.items()), flush=True)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert max(errs.values()) < tol, (name, errs)


def main():
    case("B=1 T=100 C=40 W=4", 1, 100, 40, 4)                      # a partial tile, partial block
    case("B=3 T=130 C=160 W=4 strided", 3, 130, 160, 4, strided=True)
    case("W=3 (taps not a power of two)", 2, 70, 16, 3)
    case("W=1", 1, 65, 8, 1)
    cu = torch.tensor([0, 1, 30, 31, 90, 150])                      # one-token documents too
    case("documents", 1, 150, 136, 4, cu=cu)
    case("documents, fp16", 1, 150, 136, 4, cu=cu, dtype=torch.float16)
    case("T shorter than the taps", 2, 2, 8, 4)
    ds, de = conv1d.document_bounds(torch.tensor([0, 3, 3, 7]), 7)  # an empty document
    assert ds.tolist() == [0, 0, 0, 3, 3, 3, 3] and de.tolist() == [3, 3, 3, 7, 7, 7, 7], (ds, de)
    print("OK")


if __name__ == "__main__":
    main()
