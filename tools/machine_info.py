"""The host a benchmark ran on: its CPU, and how fast it dispatches a small PyTorch operator.

The host issues every kernel launch. Where a step launches thousands of kernels (ham_800m: ~3,300
per 16k micro-batch), the host's speed can set the step time, and it differs between machines of
one kind: on 2026-12-04 the same HAM run left an H200 idle 27 % of the time on one machine and
9.8 % on another (docs/benchmarks.md). bench_recipes.py and profile_step.py record this next to
their figures, so that runs from different machines can be told apart.

    python tools/machine_info.py            # prints it
    python tools/machine_info.py --json     # as bench_recipes.py records it
"""
from __future__ import annotations

import os
import platform
import statistics
import time


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere platform.processor())."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def dispatch_us(calls: int = 2000, rounds: int = 5) -> float:
    """Median over `rounds` of the mean time, in microseconds, of one ``torch.add`` on 1-element
    CPU tensors: PyTorch's per-operator host overhead (dispatch, argument parsing), which every
    eager GPU launch pays as well, on this machine's CPU."""
    import torch

    a, b, out = torch.ones(1), torch.ones(1), torch.empty(1)
    for _ in range(calls // 10):                       # warm-up: the dispatcher's caches
        torch.add(a, b, out=out)
    means = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.add(a, b, out=out)
        means.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(means)


def machine_info() -> dict:
    """{"cpu": model name, "logical_cpus": n, "dispatch_us": :func:`dispatch_us`}."""
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count() or 0, "dispatch_us": dispatch_us()}


def describe(info: dict) -> str:
    return (f"host: {info['cpu']}, {info['logical_cpus']} logical CPUs, "
            f"{info['dispatch_us']:.2f} us per eager PyTorch operator (median of 5 x 2,000 torch.add)")


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the record as JSON")
    args = ap.parse_args()
    info = machine_info()
    print(json.dumps(info) if args.json else describe(info))
