#!/usr/bin/env python
"""Host cost of torch SDPA's causal attention per backend: does a call make the GPU wait?

The Transformer recipe's GPU idles inside cuDNN SDPA's calls (profile_step.py: "while the GPU
idled ... aten::_cudnn_attention_forward / _backward"). For each backend (cudnn, flash), at the
recipe's shape ([1, heads, T, d] bf16, causal), this measures in one run:

  gpu ms     forward+backward with the GPU kept busy (CUDA events around 10 calls queued back to
             back): the kernels' time
  host ms    the host's time to issue one forward+backward while the GPU is still busy with a
             queued ~--busy-ms matmul loop: what the call costs the host (median of --reps)
  waits      whether issuing the forward or the backward made the host wait for that queued
             work (host ms ~ the queue: a synchronising call, after which the GPU idles while
             the host catches up)

    python tools/bench_sdpa_host.py            # T = 16384, 12 heads x 128
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=16384)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--busy-ms", type=float, default=50.0, help="GPU work queued before each issue")
    p.add_argument("--reps", type=int, default=5)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_sdpa_host.py needs a CUDA GPU")
    dev = "cuda"
    q, k, v = (torch.randn(1, args.heads, args.T, args.dim, device=dev, dtype=torch.bfloat16)
               .requires_grad_() for _ in range(3))
    do = torch.randn_like(q)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)

    def step():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)

    # the matmul loop length that keeps the GPU busy for ~busy-ms
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    n_mm = max(1, round(args.busy_ms / ((time.perf_counter() - t) * 1e3 / 10)))
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; [1, {args.heads}, {args.T}, "
          f"{args.dim}] bf16 causal; {n_mm} matmuls queued (~{args.busy_ms:.0f} ms) before each issue")
    print(f"{'backend':<8}{'gpu ms':>9}{'host ms':>9}  waits")
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel([backend]):
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(10):
                step()
            e1.record()
            torch.cuda.synchronize()
            gpu = e0.elapsed_time(e1) / 10
            host = []
            for _ in range(args.reps):
                torch.cuda.synchronize()
                for _ in range(n_mm):
                    a @ a
                t0 = time.perf_counter()
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                t1 = time.perf_counter()
                o.backward(do)
                t2 = time.perf_counter()
                host.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3))
                torch.cuda.synchronize()
            fwd, bwd = (sorted(h[i] for h in host)[len(host) // 2] for i in (0, 1))
            waits = [n for n, h in (("forward", fwd), ("backward", bwd)) if h > 0.5 * args.busy_ms]
            print(f"{name:<8}{gpu:>9.3f}{fwd + bwd:>9.3f}  {' and '.join(waits) or 'no'} "
                  f"(host ms: forward {fwd:.3f}, backward {bwd:.3f})")


if __name__ == "__main__":
    main()
