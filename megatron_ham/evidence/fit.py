"""Fit the grid to a wall-clock budget from a calibration (every configuration trained a few
steps at once on the machine the grid runs on).

measure(run_dirs) reads each calibration run's metrics.jsonl / run.json: the median step time
after the first steps (compilation excluded) with all of them running, the peak memory of a
process, the seconds before the first step (start-up and compilation).
fit_steps(...) then decides, for `runs` runs of equal length:
  concurrency  min(--concurrency, runs, what fits in memory: 90 % of the device (or host)
               memory over (peak + 3 GiB): on the H200, 2026-12-02, a process held 2.5-3.2 GiB
               beyond PyTorch's reserved peak (CUDA context, NCCL, the loaded Triton / TileLang
               kernels); with 1.5 GiB assumed, 20 processes ran out of memory)
  waves        ceil(runs / concurrency)
  step time    the slowest configuration's calibrated step time, scaled up linearly when more
               processes share the device than in the calibration (a saturated GPU or CPU
               divides its time between them; conservative when it was not saturated yet)
  steps        (time left - reserve - waves x start-up) / (waves x step time) x 0.9, rounded down
               to a multiple of 50 and clamped to [min_steps, max_steps]
and the overrides that scale the schedule with it: warm-up 5 %, a checkpoint (evaluated for
recall over training) every quarter, validation every fifth.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from typing import Dict, List

from .collect import read_metrics


def _host_or_device_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    import psutil

    return psutil.virtual_memory().total / 2 ** 30


def measure(run_dirs: List[str]) -> Dict:
    """Per configuration: step_time_s, mem_gib, startup_s, steps (see the module docstring)."""
    out = {}
    for d in run_dirs:
        try:
            rec = json.load(open(os.path.join(d, "run.json"), encoding="utf-8"))
        except (OSError, ValueError):
            continue
        ms = [m for m in read_metrics(os.path.join(d, "metrics.jsonl")) if m.get("kind") == "train"]
        if not ms:
            continue
        times = [m["step_time_s"] for m in ms]
        steady = times[min(len(times) - 1, max(2, len(times) // 3)):]
        mem = max(m.get("mem_reserved_gib", m.get("mem_rss_gib", 0.0)) for m in ms)
        wall = rec.get("train_wall_s") or 0.0
        out[rec["config"]] = {"step_time_s": statistics.median(steady), "mem_gib": round(mem, 2),
                              "startup_s": round(max(0.0, wall - sum(times)), 1), "steps": len(times)}
    return {"configs": out, "n": len(out)}


def fit_steps(m: Dict, *, runs: int, concurrency: int, left_s: float, reserve_s: float,
              gpu_mem_gib: float = 0.0, min_steps: int = 100, max_steps: int = 4000) -> Dict:
    """The grid's concurrency and steps (see the module docstring), with the overrides."""
    cfgs = m["configs"]
    if not cfgs:
        raise ValueError("calibration: no run logged a step (see OUT/calibration/*/seed*/train.log)")
    total = gpu_mem_gib or _host_or_device_gib()
    per_proc = max(c["mem_gib"] for c in cfgs.values()) + 3.0
    c = max(1, min(concurrency, runs, int(0.9 * total // per_proc)))
    waves = math.ceil(runs / c)
    t_step = max(x["step_time_s"] for x in cfgs.values()) * max(1.0, c / max(1, m["n"]))
    startup = 0.5 * max(x["startup_s"] for x in cfgs.values())  # the kernels are cached now
    avail = left_s - reserve_s - waves * startup
    raw = 0.9 * avail / (waves * t_step)
    steps = int(min(max_steps, max(min_steps, raw // 50 * 50)))
    reason = (f"{avail:.0f} s for {waves} wave(s) of {c} runs at {t_step:.3f} s/step"
              + (" (clamped)" if steps != raw // 50 * 50 else ""))
    overrides = [f"train.train_steps={steps}", f"train.warmup_steps={max(5, steps // 20)}",
                 f"checkpoint.interval={max(1, steps // 4)}", f"train.eval_interval={max(1, steps // 5)}"]
    return {"steps": steps, "concurrency": c, "waves": waves, "step_time_s": t_step, "startup_s": startup,
            "memory_gib": {"per_process": per_proc, "total": round(total, 1)}, "reason": reason,
            "overrides": overrides, "measured": m}


__all__ = ["measure", "fit_steps"]
