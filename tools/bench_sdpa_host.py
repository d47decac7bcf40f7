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

Then the documents of a packed batch (SDPACoreAttention's one call per document), per backend:

  new length     host ms of a forward+backward at a sequence length never attended before (the
                 median over --new-lengths lengths near T/2): cuDNN plans a kernel per shape
  on windows     the same lengths on their windows (layers.sdpa_attention.window_length, the
                 lengths the layer attends documents on), the windows attended once before

    python tools/bench_sdpa_host.py            # T = 16384, 12 heads x 128
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

BACKENDS = (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=16384)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--busy-ms", type=float, default=50.0, help="GPU work queued before each issue")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--new-lengths", type=int, default=8, help="document lengths per backend (0: skip)")
    return p.parse_args(argv)


class Busy:
    """Issues ~busy_ms of queued matmuls, so a host measurement does not include the GPU's time."""

    def __init__(self, busy_ms: float):
        self.a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            self.a @ self.a
        torch.cuda.synchronize()
        self.n = max(1, round(busy_ms / ((time.perf_counter() - t) * 1e3 / 10)))

    def host_ms(self, q, k, v, do):
        """(forward, backward) host ms of one causal SDPA issued behind the queued work."""
        torch.cuda.synchronize()
        for _ in range(self.n):
            self.a @ self.a
        t0 = time.perf_counter()
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        t1 = time.perf_counter()
        o.backward(do)
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def median(xs):
    return sorted(xs)[len(xs) // 2]


def inputs(args, T):
    q, k, v = (torch.randn(1, args.heads, T, args.dim, device="cuda", dtype=torch.bfloat16)
               .requires_grad_() for _ in range(3))
    return q, k, v, torch.randn_like(q)


def backends(args, busy):
    print(f"{'backend':<8}{'gpu ms':>9}{'host ms':>9}  waits")
    q, k, v, do = inputs(args, args.T)
    for name, backend in BACKENDS:
        with sdpa_kernel([backend]):
            for _ in range(3):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(10):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)
            e1.record()
            torch.cuda.synchronize()
            gpu = e0.elapsed_time(e1) / 10
            host = [busy.host_ms(q, k, v, do) for _ in range(args.reps)]
            fwd, bwd = (median([h[i] for h in host]) for i in (0, 1))
            waits = [n for n, h in (("forward", fwd), ("backward", bwd)) if h > 0.5 * args.busy_ms]
            print(f"{name:<8}{gpu:>9.3f}{fwd + bwd:>9.3f}  {' and '.join(waits) or 'no'} "
                  f"(host ms: forward {fwd:.3f}, backward {bwd:.3f})")


def documents(args, busy):
    from megatron_ham.layers.sdpa_attention import window_length

    lengths = [args.T // 2 + 1 + 37 * i for i in range(args.new_lengths)]
    print(f"\ndocuments: {len(lengths)} lengths {lengths[0]}..{lengths[-1]}, host ms of one "
          f"forward+backward (median)")
    print(f"{'backend':<8}{'new length':>12}{'on windows':>12}")
    for j, (name, backend) in enumerate(BACKENDS):
        with sdpa_kernel([backend]):
            fresh = [sum(busy.host_ms(*inputs(args, n + j))) for n in lengths]  # + j: new to each
            windows = [window_length(n) for n in lengths]
            for w in set(windows):
                busy.host_ms(*inputs(args, w))
            seen = [sum(busy.host_ms(*inputs(args, w))) for w in windows]
        print(f"{name:<8}{median(fresh):>12.3f}{median(seen):>12.3f}")


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_sdpa_host.py needs a CUDA GPU")
    busy = Busy(args.busy_ms)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; [1, {args.heads}, {args.T}, "
          f"{args.dim}] bf16 causal; {busy.n} matmuls queued (~{args.busy_ms:.0f} ms) before each issue")
    backends(args, busy)
    if args.new_lengths:
        documents(args, busy)


if __name__ == "__main__":
    main()
