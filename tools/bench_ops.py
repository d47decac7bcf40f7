#!/usr/bin/env python
"""CPU timing of megatron_ham.ops.gated_delta_rule: impl="chunk" against impl="naive" (the
sequential recurrence, the baseline), measured in the same run.

For each implementation it times the forward pass (no grad) and forward+backward (gradients of
q, k, v, g, beta through autograd), with return_error=True and output_final_state=True, and
prints the median time of --repeats runs after --warmup runs plus the speed-up naive/chunk.

Example:
    python tools/bench_ops.py                      # B=1 T=2048 H=4 K=V=64, fp32
    python tools/bench_ops.py --T 4096 --threads 2 --dtype bf16
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _load_op():
    from megatron_ham.ops import gated_delta_rule

    return gated_delta_rule


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=(
            "Time gated_delta_rule impl='chunk' vs impl='naive' on CPU (forward, and "
            "forward+backward) and print both times and the speed-up ratio naive/chunk."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--B", type=int, default=1, help="batch size")
    p.add_argument("--T", type=int, default=2048, help="sequence length (tokens)")
    p.add_argument("--H", type=int, default=4, help="number of heads")
    p.add_argument("--K", type=int, default=64, help="key/query head dim")
    p.add_argument("--V", type=int, default=64, help="value head dim")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="input dtype (computation is fp32 internally either way)")
    p.add_argument("--metric", choices=["l2", "cosine"], default="l2", help="error_metric")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per measurement")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads value (0 = leave torch's default); on a shared, busy "
                        "machine use 1: intra-op threads then stall on every small op")
    p.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    p.add_argument("--seed", type=int, default=0, help="RNG seed of the random inputs")
    return p.parse_args(argv)


def make_inputs(a, dtype):
    gen = torch.Generator().manual_seed(a.seed)
    q = torch.nn.functional.normalize(torch.randn(a.B, a.T, a.H, a.K, generator=gen), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(a.B, a.T, a.H, a.K, generator=gen), dim=-1)
    v = torch.randn(a.B, a.T, a.H, a.V, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(a.B, a.T, a.H, generator=gen) + 3.0)
    beta = torch.sigmoid(torch.randn(a.B, a.T, a.H, generator=gen))
    return [x.to(dtype) for x in (q, k, v, g, beta)]


def time_it(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    a = parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    op = _load_op()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    inputs = make_inputs(a, dtype)

    def fwd(impl):
        def f():
            with torch.no_grad():
                op(*inputs, output_final_state=True, return_error=True, error_metric=a.metric, impl=impl)
        return f

    def fwd_bwd(impl):
        def f():
            leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
            o, s, e = op(*leaves, output_final_state=True, return_error=True, error_metric=a.metric, impl=impl)
            (o.float().sum() + s.sum() + e.sum()).backward()
        return f

    print(f"gated_delta_rule on CPU: B={a.B} T={a.T} H={a.H} K={a.K} V={a.V} dtype={a.dtype} "
          f"metric={a.metric} threads={torch.get_num_threads()} torch={torch.__version__}")
    rows = [("forward", fwd)]
    if not a.no_backward:
        rows.append(("forward+backward", fwd_bwd))
    for name, mk in rows:
        t_naive = time_it(mk("naive"), a.warmup, a.repeats)
        t_chunk = time_it(mk("chunk"), a.warmup, a.repeats)
        print(f"{name:>17}: naive {t_naive * 1e3:10.1f} ms | chunk {t_chunk * 1e3:10.1f} ms | "
              f"speed-up naive/chunk {t_naive / t_chunk:6.1f}x")


if __name__ == "__main__":
    main()
