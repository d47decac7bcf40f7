"""Runs megatron_ham.kernels.staircase under Triton's CPU interpreter against the reference.

Started by tests/test_staircase_interpreter.py in a fresh process: TRITON_INTERPRET must be set
before the kernel module is imported (triton.jit reads it when it wraps each kernel). Prints one
line per case and exits non-zero (AssertionError naming the case) on the first mismatch.
Inputs are fp32 / fp16: the interpreter's tl.dot on bf16 operands is not numpy-exact (Triton 3.9).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from megatron_ham.kernels.staircase import scratchpad_attention_triton  # noqa: E402
from megatron_ham.ops.scratchpad import scratchpad_attention  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def case(name, T, H, K, V, routed, cu=None, tiles=(16, 16), dtype=torch.float32, B=1, scale=None,
         strided=False, seed=0, kv_layout="compact"):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    if strided:  # q, k, v as views of one [B,T,H,2K+V] projection (unit last stride only)
        qkv = r(B, T, H, 2 * K + V)
        q, k, v = qkv[..., :K], qkv[..., K:2 * K], qkv[..., 2 * K:]
    else:
        q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o = scratchpad_attention_triton(*leaves, routed, scale=scale, cu_seqlens=cu, tiles=tiles,
                                    kv_layout=kv_layout)
    do = torch.randn(o.shape, generator=g).to(dtype)
    o.backward(do)
    refs = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    o_r = scratchpad_attention(*refs, routed, scale=scale, cu_seqlens=cu, impl="reference")
    o_r.backward(do.double())
    assert o.shape == o_r.shape and o.dtype == dtype, name
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    errs = {"o": rel(o, o_r)}
    errs.update({n: rel(a.grad, b.grad) for n, a, b in zip(("dq", "dk", "dv"), leaves, refs)})
    print(f"{name} [{kv_layout}]: " + " ".join(f"{n} {e:.1e}" for n, e in errs.items()), flush=True)
    assert max(errs.values()) < tol, (name, errs)
    # exact zeros: unrouted keys get no gradient; queries that see no key give 0 and get 0
    unrouted = ~routed
    assert (leaves[1].grad[unrouted] == 0).all() and (leaves[2].grad[unrouted] == 0).all(), name
    blind = ~(o_r.detach() != 0).any(-1).any(-1)                        # [B,T]
    assert (o[blind] == 0).all() and (leaves[0].grad[blind] == 0).all(), name
    return blind


def main():
    g = torch.Generator().manual_seed(1)
    rand = lambda B, T, f: torch.rand(B, T, generator=g) < f  # noqa: E731
    case("T=100 f=0.3", 100, 2, 16, 32, rand(1, 100, 0.3))
    cu = torch.tensor([0, 30, 31, 90, 130])
    r = rand(1, 130, 0.5)
    for kv_layout in ("compact", "gather"):   # same inputs, both ways of reading K and V
        case("T=130 docs f=0.5 tiles 16x32", 130, 2, 16, 16, r, cu=cu, tiles=(16, 32),
             kv_layout=kv_layout)
    r = rand(1, 200, 0.3)
    r[:, :50] = False
    r[:, 120:150] = False                       # the third document starts with no routed key
    blind = case("T=200 docs, queries with no key", 200, 1, 16, 16, r,
                 cu=torch.tensor([0, 60, 120, 200]), tiles=(32, 16), scale=0.9)
    assert blind[0, :50].all() and blind[0, 120:150].all() and not blind.all()
    case("T=64 f=0", 64, 2, 16, 16, torch.zeros(1, 64, dtype=torch.bool))
    case("T=64 docs f=1", 64, 1, 16, 16, torch.ones(1, 64, dtype=torch.bool),
         cu=torch.tensor([0, 20, 64]), tiles=(32, 16))
    r = torch.cat([rand(1, 80, 0.2), rand(1, 80, 0.6)])
    for kv_layout in ("compact", "gather"):
        case("B=2 f=0.2/0.6 strided K=24 V=20", 80, 2, 24, 20, r, B=2, strided=True,
             kv_layout=kv_layout)
    # the schedule's groups: 6 batch x heads in groups of 4 (the last one short), and of 1
    r = torch.cat([rand(1, 70, 0.5), rand(1, 70, 0.3)])
    for group in (4, 1):
        case(f"B=2 H=3 heads per group {group}", 70, 3, 16, 16, r, B=2,
             tiles={"fwd": (16, 16), "dq": (16, 32), "dkdv": (32, 16), "group": group})
    case("T=96 fp16 f=0.4", 96, 2, 16, 16, rand(1, 96, 0.4), dtype=torch.float16, tiles=(32, 32))
    # dk/dv with each slot block's walk split over programs (partials summed in the scratch):
    # pieces of one tile and of several, empty pieces (walks shorter than the split), documents,
    # a partly routed last block, two batch rows; twice in a row (the scratch must be left zero)
    from megatron_ham.kernels import staircase as st
    r = rand(1, 130, 0.5)
    for split in (2, 3, 8):
        case(f"T=130 docs f=0.5 split {split}", 130, 2, 16, 16, r, cu=cu,
             tiles={"fwd": (16, 16), "dq": (16, 16), "dkdv": (16, 16), "split": split})
    r = torch.cat([rand(1, 150, 0.15), rand(1, 150, 0.4)])
    for _ in range(2):
        case("B=2 f=0.15/0.4 split 4 K=24 V=20", 150, 3, 24, 20, r, B=2,
             tiles={"fwd": (16, 16), "dq": (16, 16), "dkdv": (32, 16), "split": 4})
    for acc, locks in st._SPLIT_SCRATCH.values():
        assert (acc == 0).all() and (locks == 0).all(), "the split left its scratch dirty"
    assert st._SPLIT_SCRATCH, "no case split a walk"
    print("OK")


if __name__ == "__main__":
    main()
