"""Where a training step's time goes: torch.profiler over steps of a recipe, by category.

    python tools/profile_step.py recipes/ham_800m.yaml --set train.global_batch_size=4 --out ham.json
    python tools/profile_step.py recipes/transformer_800m.yaml --steps 1 --warmup 2 --trace tr.json.gz
    python tools/profile_step.py recipes/tiny_cpu.yaml --set model.seq_length=128 --steps 1 --warmup 1  # CPU
    python tools/profile_step.py recipes/ham_800m.yaml --sync-debug   # + where the host waits for the GPU
    python tools/profile_step.py recipes/transformer_800m.yaml --host   # + where the host's time goes
    python tools/profile_step.py recipes/transformer_800m.yaml --top 40 --baseline HEAD~1   # a change vs a revision

Runs in this process at world size 1 (or under torchrun: every rank profiles, rank 0 reports):
set-up exactly as ham-train (training.loop.setup; the recipe's compile cache, synthetic tokens,
no checkpoints), `--warmup` unprofiled steps (compilation, autotuning, allocator growth), then
`--steps` steps of training.loop.train_step under torch.profiler (CPU and CUDA activities).

What is summed: on CUDA, every kernel, copy and memset the GPU ran (its duration); on CPU, every
operator's self time. Each item goes to the first category of CATEGORIES whose name pattern
matches the item's own name or whose context pattern matches one of the operators it ran under
(the launching op and its parents: autograd Functions such as _VocabParallelCrossEntropy or
ChunkGatedDeltaRuleFunction, `Optimizer.step#...`, c10d collectives). "host gaps" is the rest
of the wall time: on CUDA the time the GPU was idle (the profiled wall time minus the union of
its busy intervals: launch overhead, Python, synchronisation); on CPU the time outside every
operator. On CUDA the host gaps are then split by what the host was doing meanwhile ("while the
GPU idled"): each CPU operator's self time that falls inside a GPU-idle interval, by operator and
by its outermost operator (an autograd node, Optimizer.step, ...); "no operator" is idle time
while no operator ran (Python between ops, data loading). Percentages are of the wall time;
with overlapping streams (communication beside compute) the categories can sum past 100 %.
With --host, one more step runs under cProfile (autograd's backward on the calling thread, so its
Python is profiled too) and the Python functions with most own host time are listed: where the
host spends a step when the GPU idles waiting for it (the Transformer recipe, 2026-12-03).
With --sites, one more step runs under the profiler with Python stacks (with_stack=True) and the
launches (CUDA: kernels, memsets, copies; CPU: leaf operator calls) are counted by launching
operator and call site (the innermost frames outside torch): where the ~3,300 launches of a
ham_800m micro-batch come from. On torch 2.11 (the GPU machine, 2026-12-04) the profiler gave no
Python callers for them: the sites read "(no Python caller)" and the operator column (an
autograd node in backward) is the attribution.
With --sync-debug, one more step runs under torch.cuda.set_sync_debug_mode("warn") and the
calls that made the host wait for the GPU (.item(), .tolist(), nonzero, ...) are counted by
call site: each one drains the GPU's queue, so the host's Python after it shows up as GPU idle
time. The table prints ms per step, the percentage, how many kernels (CPU: operator calls) per
step with their mean length (many short kernels can leave the GPU waiting for the host's
launches: the unprofiled line below says whether it does), and
each category's biggest items; --out writes the same as JSON.
The profiler slows the host (it records every operator), so its host gaps overstate the GPU's
idle time: the same `--steps` then run once more without it, and the table ends with that
step time against the profiled GPU-busy time, i.e. how long the GPU idled in those steps
(2026-12-03: 20 % host gaps under the profiler, under 1 % without it, for ham_800m). With few
sequences per step that idle time includes the step's once-per-step work (optimizer, gradient
norm, logging): 23 % at a global batch of 2 on 2026-12-04, under 1 % in the recipe's 32 on the
same machine. The `GPU busy/sequence` line is what to hold against `bench_recipes.py --mode
recipe`'s step time per sequence.

With --baseline REV the same profile runs first for git revision REV (its megatron_ham, recipes
and tools extracted into a temporary directory; its own profile_step.py, in a subprocess, one
process), then for this checkout, and tools/compare_profiles.py's table of the two ends the
output (--out then also holds the baseline's summary, under "baseline").
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]  # megatron_ham, bench_recipes

#: (category, pattern on the kernel's / operator's own name, pattern on the names of the
#: operators it ran under, or None). First match wins; the last row takes everything else
#: (Inductor's fused elementwise/reduction kernels, norms, copies, memsets, casts).
CATEGORIES: Tuple[Tuple[str, str, Optional[str]], ...] = (
    ("communication", r"nccl|gloo|c10d|all_?reduce|reduce_?scatter|all_?gather", r"c10d::|nccl:|gloo:"),
    ("optimizer", r"adam|multi_tensor|foreach", r"Optimizer\.(step|zero_grad)|clip_grad"),
    ("cross-entropy", r"cross_?entropy|nll_loss|log_softmax", r"cross_?entropy|nll_loss"),
    ("attention/mixer",
     r"flash|fmha|sdpa|attention|attn|flex|staircase|delta_rule|chunk_(gated|fwd|bwd|local|scaled)"
     r"|solve_tril|kkt|recompute_w_u|wy_repr|tilelang|triton_tem|_error_kernel|_compaction_kernel",
     r"scaled_?dot_?product|flex_?attention|ChunkGatedDeltaRule|_GDNWithError|_StaircaseAttention"),
    ("GEMM", r"gemm|nvjet|cutlass|xmma|wgmma|cublas|^aten::(mm|addmm|bmm|baddbmm|_addmm_activation)$", None),
    ("norms/elementwise", r".", None),
)
_COMPILED = [(c, re.compile(n, re.I), re.compile(x, re.I) if x else None) for c, n, x in CATEGORIES]


def classify(name: str, parents: List[str]) -> str:
    """The category of an item called `name` that ran under the operators `parents`."""
    for cat, own, ctx in _COMPILED:
        if own.search(name) or (ctx is not None and any(ctx.search(p) for p in parents)):
            return cat
    return CATEGORIES[-1][0]  # pragma: no cover - the last pattern matches everything


def _parents(e) -> List[str]:
    out = []
    while e is not None:
        out.append(e.name)
        e = e.cpu_parent
    return out


def _merge(intervals: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    out: List[List[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _union_us(intervals: List[Tuple[float, float]]) -> float:
    """Total length covered by the intervals (overlaps once)."""
    return sum(b - a for a, b in _merge(intervals))


def _idle_intervals(busy: List[Tuple[float, float]], start: float, end: float) -> List[Tuple[float, float]]:
    """The parts of [start, end] that no busy interval covers, in order."""
    out, t = [], start
    for a, b in sorted(busy):
        if a > t:
            out.append((t, min(a, end)))
        t = max(t, b)
        if t >= end:
            break
    if t < end:
        out.append((t, end))
    return [(a, b) for a, b in out if b > a]


class _Covered:
    """Length of an interval's overlap with a fixed set of disjoint sorted intervals, O(log n)."""

    def __init__(self, intervals: List[Tuple[float, float]]):
        self.starts = [a for a, _ in intervals]
        self.ends = [b for _, b in intervals]
        self.cum = [0.0]
        for a, b in intervals:
            self.cum.append(self.cum[-1] + b - a)

    def _upto(self, x: float) -> float:  # covered length of (-inf, x]
        i = bisect.bisect_right(self.starts, x)
        return 0.0 if i == 0 else self.cum[i - 1] + min(x, self.ends[i - 1]) - self.starts[i - 1]

    def over(self, a: float, b: float) -> float:
        return self._upto(b) - self._upto(a) if b > a else 0.0


def idle_activity(cpu_events, idle: List[Tuple[float, float]], top: int = 8) -> dict:
    """What the host did while the GPU idled: each CPU operator's self time inside the idle
    intervals (its overlap minus its children's), summed by name (`ops`) and by its outermost
    operator (`roots`); `no_operator` = idle time no operator on any thread covered. In us."""
    cov = _Covered(idle)
    by_op: Dict[str, float] = {}
    by_root: Dict[str, float] = {}
    roots = []
    for e in cpu_events:
        s, t = e.time_range.start, e.time_range.end
        own = cov.over(s, t) - sum(cov.over(c.time_range.start, c.time_range.end) for c in e.cpu_children)
        if e.cpu_parent is None:
            roots.append((s, t))
        if own <= 0:
            continue
        r = e
        while r.cpu_parent is not None:
            r = r.cpu_parent
        by_op[e.name] = by_op.get(e.name, 0.0) + own
        by_root[r.name] = by_root.get(r.name, 0.0) + own
    any_op = _Covered(_merge(roots))
    no_op = sum(b - a for a, b in idle) - sum(any_op.over(a, b) for a, b in idle)
    order = lambda d: [[n[:120], us] for n, us in sorted(d.items(), key=lambda kv: -kv[1])[:top]]  # noqa: E731
    return {"ops": order(by_op), "roots": order(by_root), "no_operator": no_op,
            "intervals": len(idle), "over_1ms": sum(1 for a, b in idle if b - a >= 1000)}


def _launches(events, device) -> List[Tuple[str, float, object]]:
    """(kernel name, us, the CPU event that launched it or None) of every device event.

    torch >= 2.12 links a device event to its launching CPU event (`linked_correlation_id`);
    older versions (2.11 on the GPU machine) only list each CPU event's kernels
    (`FunctionEvent.kernels`, attached to the runtime call that launched them): then the kernels
    are taken from there, and device time no CPU event claims is kept as "(unattributed)".
    """
    from torch.autograd import DeviceType

    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    if hasattr(device[0], "linked_correlation_id"):
        cpu_by_id = {e.id: e for e in cpu if e.id > 0}
        return [(e.name, e.time_range.elapsed_us(), cpu_by_id.get(e.linked_correlation_id)) for e in device]
    items = [(k.name, float(k.duration), e) for e in cpu for k in e.kernels]
    rest = sum(e.time_range.elapsed_us() for e in device) - sum(us for _, us, _ in items)
    if rest > 0:
        items.append(("(unattributed)", rest, None))
    return items


def _device_items(events, device) -> List[Tuple[str, float, List[str]]]:
    """(kernel name, us, names of the operators that launched it) of every device event."""
    return [(name, us, _parents(e)) for name, us, e in _launches(events, device)]


_PY = re.compile(r"\.py\(\d+\): |^<built-in ")  # the profiler's Python events (with_stack=True)


def _site_and_op(e, frames: int = 3) -> Tuple[str, Optional[str]]:
    """Where CPU event `e` was called from and the outermost operator above it before Python.

    With `with_stack=True` the profiler records Python calls as events of their own
    ("megatron_ham/layers/ham_mixer.py(120): forward", "<built-in method zeros ...>"), parents of
    the operators they ran. The site is the innermost `frames` of them outside torch (and Python's
    built-ins), as 'file(line): function <- ...'; the operator is the outermost non-Python event
    between `e` and its first Python caller (aten::zeros rather than the aten::fill_ it ran, an
    autograd node in backward)."""
    def mine(frame: str) -> bool:
        return "torch/" not in frame and not frame.startswith("<built-in ")

    op, own = None, []
    while e is not None and len(own) < frames:
        python = _PY.search(e.name)
        if not own and not python and not re.match(r"cuda[A-Z]|cu[A-Z]", e.name):  # not the runtime call
            op = e.name
        if python and mine(e.name):
            own.append(e.name)
        own += [f for f in getattr(e, "stack", None) or () if mine(f)]  # a stack recorded on the op itself
        e = e.cpu_parent
    own = [f.replace(REPO + os.sep, "").split("site-packages/")[-1] for f in own[:frames]]
    return " <- ".join(own) or "(no Python caller)", op


def launch_sites(events, steps: int, top: int = 40) -> List[list]:
    """[operator, kernel, call site, launches per step, device ms per step] of the `top` most
    frequent triples: where a launch-bound step's kernels, memsets and copies come from. CUDA:
    each device event, by the operator above its runtime call (`_site_and_op`; a Triton kernel
    launched from Python: its own name); CPU: each leaf operator call (kernel = its name)."""
    from torch.autograd import DeviceType

    device = [e for e in events if e.device_type == DeviceType.CUDA]
    found = []
    if device:
        for name, us, e in _launches(events, device):
            site, op = _site_and_op(e)
            found.append((op or name, name, site, us))
    else:
        for e in events:
            if e.device_type == DeviceType.CPU and not e.is_async and not e.cpu_children and not _PY.search(e.name):
                found.append((e.name, e.name, _site_and_op(e)[0], e.self_cpu_time_total))
    by: Dict[Tuple[str, str, str], List[float]] = {}
    for op, kernel, site, us in found:
        n_us = by.setdefault((op, _short_kernel(kernel), site), [0, 0.0])
        n_us[0] += 1
        n_us[1] += us
    rows = sorted(by.items(), key=lambda kv: -kv[1][0])[:top]
    return [[op[:70], kernel, site, n / steps, us / 1e3 / steps] for (op, kernel, site), (n, us) in rows]


def _short_kernel(name: str) -> str:
    """A kernel's name without its template noise: 'void at::native::vectorized_elementwise_kernel<8,
    at::native::bfloat16_copy_kernel_cuda(...' -> 'elementwise bfloat16_copy_kernel_cuda'."""
    m = "elementwise" in name and re.search(r"(\w*(?:copy_kernel_cuda|Functor\w*)(?:<[\w:]+>)?)", name)
    return f"elementwise {m.group(1)}" if m else name[:60]


def summarise(events, wall_s: float, steps: int, top: int = 5) -> dict:
    """The category table of a profiler's events (prof.events()) over `wall_s` seconds."""
    from torch.autograd import DeviceType

    device = [e for e in events if e.device_type == DeviceType.CUDA]
    items: List[Tuple[str, float, List[str]]] = []  # (name, us, parent names)
    gaps = None
    if device:
        items = _device_items(events, device)
        busy = _merge([(e.time_range.start, e.time_range.end) for e in device])  # sorted, disjoint
        busy_us = _union_us(busy)
        cpu = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
        start = min(e.time_range.start for e in cpu + device)
        idle = _idle_intervals(busy, start, max(e.time_range.end for e in cpu + device))
        gaps = idle_activity(cpu, idle, top)
    else:
        for e in events:
            if e.device_type == DeviceType.CPU and not e.is_async and e.self_cpu_time_total > 0:
                items.append((e.name, e.self_cpu_time_total, _parents(e.cpu_parent)))
        busy_us = sum(us for _, us, _ in items)
    wall_us = wall_s * 1e6
    by_cat: Dict[str, Dict[str, float]] = {c: {} for c, _, _ in CATEGORIES}
    count: Dict[str, int] = {c: 0 for c, _, _ in CATEGORIES}
    per_name: Dict[str, List[float]] = {}  # name -> [launches (CUDA) or calls (CPU), us]
    for name, us, parents in items:
        cat = classify(name, parents)
        by_cat[cat][name] = by_cat[cat].get(name, 0.0) + us
        count[cat] += 1
        n_us = per_name.setdefault(name, [0, 0.0])
        n_us[0] += 1
        n_us[1] += us
    rows = []
    for cat, names in by_cat.items():
        us = sum(names.values())
        biggest = sorted(names.items(), key=lambda kv: -kv[1])[:top]
        # how many kernels (CUDA) or operator calls (CPU), and their mean length: a category of
        # many short kernels can be launch-bound (the host needs ~5-20 us per launch)
        rows.append({"category": cat, "ms_per_step": us / 1e3 / steps, "percent": 100 * us / wall_us,
                     "count_per_step": count[cat] / steps, "mean_us": us / count[cat] if count[cat] else 0.0,
                     "top": [[n[:120], u / 1e3 / steps] for n, u in biggest]})
    gap_us = max(0.0, wall_us - busy_us)
    rows.append({"category": "host gaps", "ms_per_step": gap_us / 1e3 / steps,
                 "percent": 100 * gap_us / wall_us, "top": []})
    # the items run most often: where a launch-bound step's launches come from
    often = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    out = {"timeline": "cuda" if device else "cpu", "steps": steps, "step_wall_ms": wall_us / 1e3 / steps,
           "busy_ms_per_step": busy_us / 1e3 / steps, "categories": rows,
           "most_frequent": [[n[:120], c / steps, u / 1e3 / steps] for n, (c, u) in often]}
    if gaps is not None:  # per step, ms
        per = lambda us: us / 1e3 / steps  # noqa: E731
        out["while_gpu_idle"] = {"ops": [[n, per(us)] for n, us in gaps["ops"]],
                                 "roots": [[n, per(us)] for n, us in gaps["roots"]],
                                 "no_operator_ms": per(gaps["no_operator"]),
                                 "idle_intervals": gaps["intervals"] / steps,
                                 "idle_intervals_over_1ms": gaps["over_1ms"] / steps}
    return out


def format_table(s: dict) -> str:
    unit = "kernels" if s["timeline"] == "cuda" else "op calls"
    lines = [f"{'category':<20} {'ms/step':>10} {'% of step':>10} {unit + '/step':>13} {'mean us':>8}   "
             f"biggest items (ms/step)"]
    for r in s["categories"]:
        top = ", ".join(f"{n[:48]} {ms:.2f}" for n, ms in r["top"][:3])
        counted = f"{r['count_per_step']:>13.0f} {r['mean_us']:>8.1f}" if "count_per_step" in r else " " * 22
        lines.append(f"{r['category']:<20} {r['ms_per_step']:>10.2f} {r['percent']:>9.1f}% {counted}   {top}")
    lines.append(f"{'step (wall)':<20} {s['step_wall_ms']:>10.2f} {100.0:>9.1f}%   "
                 f"({s['timeline']} timeline; {'GPU busy' if s['timeline'] == 'cuda' else 'in operators'} "
                 f"{s['busy_ms_per_step']:.2f} ms/step)")
    if "unprofiled_step_ms" in s:  # what the step takes without the profiler's host overhead
        un, busy = s["unprofiled_step_ms"], s["busy_ms_per_step"]
        line = f"{'step (unprofiled)':<20} {un:>10.2f}   (the same steps without the profiler"
        if s["timeline"] == "cuda":
            idle = max(0.0, un - busy)
            line += (f": in these steps the GPU idles about {idle:.2f} ms/step, {100 * idle / un:.1f}%; "
                     "the host gaps above include the profiler's own overhead")
        lines.append(line + ")")
        gbs = s.get("global_batch_size")
        if s["timeline"] == "cuda" and gbs:
            # a step's once-per-step work (optimizer, grad norm, logging) spread over few sequences
            # counts as idle here; the recipe spreads it over its whole global batch
            lines.append(f"{'GPU busy/sequence':<20} {busy / gbs:>10.2f}   (ms per sequence of the global batch of "
                         f"{gbs}: with few sequences per step the idle time above includes the step's "
                         "once-per-step work; for the recipe's idle time compare bench_recipes.py --mode "
                         "recipe's step time per sequence with this)")
    if s.get("most_frequent"):
        lines.append(f"most frequent ({unit}/step, ms/step): " + ", ".join(
            f"{n[:40]} {c:.0f} {ms:.2f}" for n, c, ms in s["most_frequent"][:8]))
    g = s.get("while_gpu_idle")
    if g:
        lines.append(f"while the GPU idled ({g['idle_intervals']:.0f} intervals per step, "
                     f"{g['idle_intervals_over_1ms']:.0f} of them >= 1 ms): no operator {g['no_operator_ms']:.2f} ms/step")
        for key, what in (("ops", "operator (self)"), ("roots", "outermost op")):
            lines.append(f"  by {what}: " + ", ".join(f"{n[:56]} {ms:.2f}" for n, ms in g[key][:6]))
    return "\n".join(lines)


def _site(frames) -> str:
    """The innermost frames outside torch of a stack, as 'file:line <- file:line ...'."""
    def short(f):
        name = f.filename
        name = name.split("site-packages/")[-1] if "site-packages/" in name else os.path.relpath(name, REPO)
        return f"{name}:{f.lineno} ({f.name})"

    own = [f for f in frames if "/torch/" not in f.filename and not f.filename.endswith("warnings.py")]
    return " <- ".join(short(f) for f in own[::-1][:5]) or "(no Python frame)"


def synchronizing_calls(run_step, top: int = 15) -> dict:
    """Run `run_step()` under torch.cuda.set_sync_debug_mode("warn") and count the calls that
    made the host wait for the GPU, by call site (the innermost frames outside torch)."""
    import traceback
    import warnings

    import torch

    counts: Dict[str, int] = {}

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            site = _site(traceback.extract_stack()[:-1])
            counts[site] = counts.get(site, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_step()
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    order = sorted(counts.items(), key=lambda kv: -kv[1])
    return {"total": sum(counts.values()), "sites": [[k, n] for k, n in order[:top]]}


def host_functions(run, top: int = 25, calls: int = 1) -> dict:
    """Run `run()` `calls` times under cProfile with autograd's backward on this thread (so its
    Python is seen too): the host's ms per run and the functions with most own time, [(function,
    own ms per run, calls per run)]. cProfile slows Python, so read the shares, not the absolute
    times. (tools/bench_norm_mlp.py --host uses it too.)"""
    import cProfile
    import pstats

    import torch

    prof = cProfile.Profile()
    with torch.autograd.set_multithreading_enabled(False):
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(calls):
            run()
        prof.disable()
        host = time.perf_counter() - t0
    rows = [(f"{os.path.basename(f)}:{line} {name}", tt * 1e3 / calls, round(nc / calls))
            for (f, line, name), (_, nc, tt, _, _) in pstats.Stats(prof).stats.items()]
    rows.sort(key=lambda r: -r[1])
    return dict(host_ms=host * 1e3 / calls, functions=rows[:top])


def profile(recipe: str, overrides: List[str], steps: int, warmup: int, work: str,
            trace: Optional[str] = None, sync_debug: bool = False, top: int = 5,
            host: bool = False, sites: bool = False) -> dict:
    """Set up the recipe as ham-train does, run `warmup` steps, profile `steps` steps."""
    import warnings

    warnings.filterwarnings("ignore")
    from bench_recipes import measurement_overrides
    from megatron_ham.distributed import free_port
    from megatron_ham.training import compile_cache
    from megatron_ham.training.config import load_config

    # warm-up, profiled, unprofiled and (--sync-debug, --host, --sites) one more each: the schedule covers them all
    forced = measurement_overrides(work, warmup + 2 * steps + 3) + ["logging.log_kv_layers=false"]
    cfg = load_config(recipe, [*overrides, *forced])
    cache = compile_cache.configure(cfg.train.compile_cache_dir, cfg.train.compile_cache_local)
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", str(free_port()))):
        os.environ.setdefault(k, v)
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from megatron_ham.training.loop import setup, train_step

    tr = setup(cfg)
    rank0 = dist.get_rank() == 0
    if rank0:
        print(cache.describe(), flush=True)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    try:
        t0 = time.perf_counter()
        for i in range(warmup):
            train_step(tr)
            sync()
            if rank0:
                print(f"[profile] warm-up step {i + 1}/{warmup} done ({time.perf_counter() - t0:.1f} s)", flush=True)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with torch_profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(tr)
            sync()
            wall = time.perf_counter() - t0
        summary = summarise(prof.events(), wall, steps, top=top)
        t0 = time.perf_counter()  # the same steps without the profiler: its host overhead aside
        for _ in range(steps):
            train_step(tr)
        sync()
        summary["unprofiled_step_ms"] = (time.perf_counter() - t0) * 1e3 / steps
        if trace and rank0:
            prof.export_chrome_trace(trace)
        if sync_debug and torch.cuda.is_available():
            summary["synchronizing_calls"] = synchronizing_calls(lambda: train_step(tr))
        if host:
            summary["host"] = host_functions(lambda: (train_step(tr), sync()))
        if sites:  # Python stacks slow the host further: a step of its own, not the timed ones
            with torch_profile(activities=acts, with_stack=True) as prof:
                train_step(tr)
                sync()
            summary["launch_sites"] = launch_sites(prof.events(), 1, top=max(top, 40))
    finally:
        tr.log.close()
        dist.destroy_process_group()
        compile_cache.sync_back(cache)  # a node-local copy's new entries (nothing without one)
    t = cfg.train
    summary.update(recipe=recipe, overrides=overrides, device=str(tr.device),
                   device_name=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   torch=torch.__version__, global_batch_size=t.global_batch_size,
                   micro_batch_size=t.micro_batch_size, seq_length=cfg.model.seq_length,
                   world_size=tr.dist_info.world_size, rank=tr.dist_info.rank,
                   compile_cache=cache.summary())
    return summary


def profile_baseline(rev: str, recipe: str, args, work: str) -> dict:
    """The same profile of git revision `rev` (extracted under `work`): its profile_step.py in a
    subprocess, on its copy of the recipe, from this working directory (so relative paths in
    --set mean the same). Its summary; ValueError naming the revision when it cannot run."""
    import subprocess

    from bench_recipes import extract_revision, tree_env
    from compare_profiles import ProfileError, load

    tree = extract_revision(rev, work)
    rel = os.path.relpath(os.path.abspath(recipe), REPO)
    theirs = os.path.abspath(recipe) if rel.startswith("..") else os.path.join(tree, rel)
    out = os.path.join(work, "baseline.json")
    cmd = [sys.executable, os.path.join(tree, "tools", "profile_step.py"), theirs, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--top", str(args.top), "--out", out]
    if args.set:
        cmd += ["--set", *args.set]
    print(f"[profile] the baseline {rev}, from {tree}", flush=True)
    rc = subprocess.run(cmd, env=tree_env(tree)).returncode  # its output streams through
    if rc != 0:
        raise ValueError(f"--baseline {rev!r}: its profile_step.py exited with status {rc}")
    try:
        return load(out)
    except ProfileError as e:
        raise ValueError(f"--baseline {rev!r}: {e}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", help="recipe YAML (e.g. recipes/ham_800m.yaml)")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value",
                    help="recipe overrides, e.g. train.global_batch_size=4 train.compile_cache_dir=/tmp/cc")
    ap.add_argument("--steps", type=int, default=1, help="profiled optimizer steps (default 1)")
    ap.add_argument("--warmup", type=int, default=2, help="unprofiled steps first (default 2)")
    ap.add_argument("--out", default=None, help="write the summary as JSON here")
    ap.add_argument("--top", type=int, default=5,
                    help="biggest kernels kept per category in the JSON (the table prints 3)")
    ap.add_argument("--trace", default=None, help="also write the Chrome trace here (rank 0; large)")
    ap.add_argument("--sync-debug", action="store_true",
                    help="CUDA: run one more step under torch.cuda.set_sync_debug_mode('warn') and "
                         "list the calls that made the host wait for the GPU, by call site")
    ap.add_argument("--host", action="store_true",
                    help="run one more step under cProfile (backward on the calling thread) and list "
                         "the Python functions with most own host time: what keeps the host busy "
                         "when the GPU idles")
    ap.add_argument("--sites", action="store_true",
                    help="run one more step under the profiler with Python stacks and list the most "
                         "frequent launches (kernels, memsets, copies; CPU: operator calls) by "
                         "launching operator and call site: where a launch-bound step's launches come from")
    ap.add_argument("--baseline", default=None, metavar="REV",
                    help="profile git revision REV the same way first, then compare (one process only)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if args.baseline and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        ap.error("--baseline runs in one process, not under torchrun")
    if not os.path.isfile(args.recipe):
        print(f"profile_step: {args.recipe}: recipe file not found", file=sys.stderr)
        return 2
    from megatron_ham.training.config import ConfigError

    from machine_info import describe, machine_info

    machine = machine_info()  # measured before the profiled process starts its work
    before = None
    try:
        with tempfile.TemporaryDirectory(prefix="profile_step_") as work:
            if args.baseline:
                try:
                    before = profile_baseline(args.baseline, args.recipe, args, work)
                except ValueError as e:  # the revision, or its run
                    print(f"profile_step: {e}", file=sys.stderr)
                    return 2
            s = profile(args.recipe, args.set, args.steps, args.warmup, work, args.trace, args.sync_debug,
                        top=args.top, host=args.host, sites=args.sites)
    except ConfigError as e:
        print(f"profile_step: config error: {e}", file=sys.stderr)
        return 2
    if s["rank"] != 0:
        return 0
    s["machine"] = machine
    print(f"\n{s['recipe']} {' '.join(s['overrides'])}: {s['device_name']}, global batch "
          f"{s['global_batch_size']} x {s['seq_length']} tokens in micro-batches of {s['micro_batch_size']}, "
          f"{s['steps']} profiled step(s)")
    print(format_table(s))
    print(describe(machine))
    sc = s.get("synchronizing_calls")
    if sc is not None:
        print(f"\nsynchronizing calls in one more step: {sc['total']}")
        for site, n in sc["sites"]:
            print(f"  {n:6d}  {site}")
    hs = s.get("host")
    if hs is not None:
        print(f"\nhost functions of one more step under cProfile ({hs['host_ms']:.0f} ms of host time, "
              f"cProfile's overhead included), most own time first:")
        for name, ms, calls in hs["functions"]:
            print(f"  {ms:9.2f} ms  {calls:7d} calls  {name[:100]}")
    ls = s.get("launch_sites")
    if ls is not None:
        print("\nlaunches of one more step by operator and call site (per step, device ms), most first:")
        for op, kernel, site, n, ms in ls:
            print(f"  {n:7.0f}  {ms:8.2f} ms  {op[:60]:<60}  {kernel[:50]:<50}  {site[:160]}")
    if before is not None:
        from compare_profiles import compare

        print(f"\nagainst the baseline {args.baseline}:")
        print(compare(before, s, items=15))
        s["baseline"] = dict(revision=args.baseline, summary=before)
    if args.out:
        from megatron_ham.training.atomic import atomic_write_text

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write_text(args.out, json.dumps(s, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
