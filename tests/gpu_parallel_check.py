#!/usr/bin/env python
"""The 2-GPU (NCCL) versions of tests/test_parallel.py without needing pytest on the machine.

    python tests/gpu_parallel_check.py        # needs 2 GPUs; exits non-zero on any mismatch

It lives with the tests because it runs their workers (tests/_parallel_workers.py).

Runs, each in a spawned 2-process NCCL world: the HAM/GDN mixer TP=2 (SP off/on) == TP=1 check,
the model TP=2+SP <-> TP=1 checkpoint / logits / gradients check, and PP=2 == PP=1 through
Megatron's pipeline schedule.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(here))
sys.path.insert(0, here)


def main():
    import torch

    if torch.cuda.device_count() < 2:
        sys.exit(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    from _dist import run_world
    from _parallel_workers import _mixer_worker, _model_worker, _pp_worker

    failed = 0
    for name, fn, args in [
        ("mixer TP=2 (SP off/on) == TP=1", _mixer_worker, ("cuda",)),
        ("model TP=2+SP <-> TP=1 checkpoint, logits, grads", _model_worker, ("cuda", None)),
        ("PP=2 == PP=1 through the schedule", _pp_worker, (None, "cuda")),
    ]:
        with tempfile.TemporaryDirectory() as tmp:
            args = tuple(tmp if a is None else a for a in args)
            t0 = time.time()
            try:
                run_world(fn, 2, *args)
                print(f"PASS {name} ({time.time() - t0:.1f} s)", flush=True)
            except Exception as e:  # noqa: BLE001 - report and continue
                failed += 1
                print(f"FAIL {name}: {e}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
