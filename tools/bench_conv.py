#!/usr/bin/env python
"""GPU timing of the mixers' short convolution: fla's Triton conv against the compiled reference.

The GDN / HAM mixers' shape: x a strided view [1, T, C] of the fused in-projection (C = 3 x
heads x head dim, rows of C + extra), weight [C, 4], bf16, with and without documents,
forward+backward (dx, dw), CUDA-event medians; the ratio is against ``causal_conv_silu``'s
reference compiled by torch.compile (what the mixers ran before, ``model.fusions``) in the same run.

    python tools/bench_conv.py --T 16384 --C 4608
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median_ms(fn, warmup=5, iters=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[16384, 4096])
    ap.add_argument("--C", type=int, default=4608, help="conv channels (3 x heads x head dim)")
    ap.add_argument("--extra", type=int, default=1584, help="other projection columns per row")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_conv.py needs a CUDA GPU")
    from megatron_ham.layers.fusion import maybe_compiled
    from megatron_ham.ops.short_conv import causal_conv_silu

    dev, C = "cuda", args.C
    compiled = maybe_compiled(causal_conv_silu, True)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, C={C}, bf16, fwd+bwd")
    for T in args.T:
        for packed in (False, True):
            proj = torch.randn(1, T, C + args.extra, device=dev).bfloat16().requires_grad_()
            w = (torch.randn(C, 4, device=dev) * 0.5).bfloat16().requires_grad_()
            dy = torch.randn(1, T, C, device=dev).bfloat16()
            doc = cu = None
            if packed:
                lens = torch.tensor([T // 3, 1, T - T // 3 - 1], device=dev)
                doc = torch.repeat_interleave(torch.arange(3, device=dev), lens)[None]
                cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
            cu_cpu = None if cu is None else cu.cpu()

            def ref():
                compiled(proj[..., :C], w, doc).backward(dy)

            def fla():
                causal_conv_silu(proj[..., :C], w, doc, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu,
                                 impl="fla").backward(dy)
            t_ref, t_fla = median_ms(ref), median_ms(fla)
            gb = 4 * T * C * 2 / 1e9  # x, y read/written forward; dy, dx backward (ideal bytes)
            print(f"T={T:6d} documents={packed!s:5}: compiled reference {t_ref:.3f} ms, fla {t_fla:.3f} ms "
                  f"= {t_fla / t_ref:.2f}x  (fla at {gb / t_fla:.2f} TB/s of the 4 x T x C bf16 minimum)",
                  flush=True)


if __name__ == "__main__":
    main()
