#!/usr/bin/env python
"""Tile and K/V-layout sweep of the Triton staircase kernel, against causal SDPA in the same run.

B=1, H heads, head dim D, bf16, T (default 16384), routing drawn at random at exactly each KV
fraction f (f = 1 routes every key: the kernel then does causal attention, SDPA's own work, so
its TFLOP/s against SDPA's is the kernel's efficiency and nothing else). For each K/V layout
(``compact``: the forward and dq kernels read copies gathered into slot order; ``gather``: they
read K and V through the order inside the loop) and each candidate configuration (BLOCK_M,
BLOCK_N, warps, stages) of each kernel:

  fwd     forward alone (plan + gathers + forward kernel), per forward configuration
  bwd/dq  backward alone (torch.autograd.grad on a kept graph) per dq configuration, dk/dv fixed
  bwd/dkdv  the same per dk/dv configuration (BLOCK_N = key slots), dq fixed
  best    the best of each, forward + backward together
  kernels the best configuration's kernels under torch.profiler: ms per call by kernel (the
          plan, the K/V copies, forward, dq, dk/dv)
  group   with --groups: the kernels' own (autotuned) tiles, the schedule's heads per group
          set to each value given ("auto": the kernel's rule, staircase.heads_per_group)
  split   with --splits: the same, the dk/dv kernel's walks split in at most each number of
          pieces given ("auto": the kernel's rule, staircase.split_plan; 1: never split);
          --groups-only skips the tile sweep

Times are CUDA-event medians; TFLOP/s count the visible (query, key) pairs P (4 P D H forward,
2.5x that backward: FlashAttention's convention, whatever the kernel recomputes). Every
configuration is compiled first in parallel worker processes at a small T (same binaries: T is
not a compile-time constant), so the timed runs only load them from the Triton cache.

    python tools/sweep_staircase.py --json $OUT/sweep.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (BLOCK_M, BLOCK_N, num_warps, num_stages); for dkdv BLOCK_N is the key-slot block
# (2026-12-03: deeper pipelines and 8 warps on 64-slot dk/dv blocks added to the first sweep's set)
FWD = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 2),
       (64, 128, 4, 3), (64, 64, 4, 4), (64, 64, 4, 5)]
DQ = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3), (128, 128, 8, 2),
      (128, 64, 8, 4), (64, 64, 4, 4)]
DKDV = [(32, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3), (16, 128, 8, 3),
        (64, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 4), (32, 64, 4, 5), (32, 64, 8, 3),
        (64, 64, 8, 3), (32, 128, 8, 4)]
LAYOUTS = ("compact", "gather")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--T", type=int, default=16384, help="sequence length")
    p.add_argument("--H", type=int, default=16, help="heads")
    p.add_argument("--D", type=int, default=128, help="head dim (K = V = D)")
    p.add_argument("--fracs", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0],
                   help="KV fractions (1.0 = every key: causal attention)")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--compile-workers", type=int, default=8,
                   help="processes that compile the configurations before timing (0: compile "
                        "while timing)")
    p.add_argument("--groups", nargs="+", default=[],
                   help="also time the autotuned kernels with these heads per group of the "
                        "schedule (ints, or 'auto' for the kernel's own rule)")
    p.add_argument("--splits", nargs="+", default=[],
                   help="also time the autotuned kernels with the dk/dv kernel's walks split in "
                        "this many pieces (ints; 1 = never; 'auto' for the kernel's own rule, "
                        "staircase.split_plan)")
    p.add_argument("--groups-only", action="store_true",
                   help="only the --groups / --splits rows (no tile sweep)")
    p.add_argument("--json", type=str, default=None, help="write all rows to this JSON file")
    p.add_argument("--compile-only", type=str, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def median_ms(fn, warmup, iters):
    from bench_kernels import cuda_median_ms  # tools/, this script's directory
    return cuda_median_ms(fn, warmup, iters)[0]


def inputs(T, H, D, frac, seed=0):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
               .requires_grad_(True) for _ in range(3))
    n = round(frac * T)
    routed = torch.zeros(1, T, dtype=torch.bool, device="cuda")
    routed[0, torch.randperm(T, device="cuda", generator=g)[:n]] = True
    return q, k, v, routed


def visible_pairs(routed) -> int:
    import torch
    return int(torch.cumsum(routed.long(), dim=1).sum())


def tflops(pairs, H, D, ms, factor):
    return 4.0 * pairs * D * H * factor / (ms * 1e-3) / 1e12


def run_case(st, q, k, v, routed, job, warmup, iters):
    """(fwd ms, bwd ms) of one job."""
    import torch
    kw = dict(tiles=_tiles(job), kv_layout=job["layout"])

    def fwd():
        with torch.no_grad():
            st.scratchpad_attention_triton(q, k, v, routed, **kw)
    o = st.scratchpad_attention_triton(q, k, v, routed, **kw)
    do = torch.randn_like(o)

    def bwd():
        torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
    return median_ms(fwd, warmup, iters), median_ms(bwd, warmup, iters)


def _tiles(job):
    """The tiles= argument of a job: per-kernel tuples, and "group" / "split" (ints) where set."""
    return {n: c if n in ("group", "split") else tuple(c) for n, c in job["tiles"].items()}


def jobs(layouts):
    """Every run of the sweep: dicts of layout, the kernel varied and the tiles."""
    base = {"fwd": FWD[0], "dq": DQ[0], "dkdv": DKDV[0]}
    vary = [("fwd", c) for c in FWD] + [("dq", c) for c in DQ[1:]] + [("dkdv", c) for c in DKDV[1:]]
    return [{"layout": layout, "kernel": kern, "tiles": {**base, kern: c}}
            for layout in layouts for kern, c in vary]


def kernel_times(st, q, k, v, routed, job, reps=5):
    """ms per call of each GPU kernel of one fwd+bwd of job, from torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    kw = dict(tiles=_tiles(job), kv_layout=job["layout"])
    do = torch.randn_like(q)
    for _ in range(2):
        torch.autograd.grad(st.scratchpad_attention_triton(q, k, v, routed, **kw), (q, k, v), do)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            o = st.scratchpad_attention_triton(q, k, v, routed, **kw)
            torch.autograd.grad(o, (q, k, v), do)
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0 and e.key.startswith(("_", "void", "triton", "at::", "Memset", "index")):
            out[e.key[:60]] = us / 1e3 / reps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def compile_only(spec: str):
    """Worker: compile the given jobs (JSON) by running them once at a small T."""
    from megatron_ham.kernels import staircase as st
    args = json.loads(spec)
    q, k, v, routed = inputs(256, args["H"], args["D"], 0.5)
    for job in args["jobs"]:
        tiles = {n: tuple(c) for n, c in job["tiles"].items()}
        o = st.scratchpad_attention_triton(q, k, v, routed, tiles=tiles, kv_layout=job["layout"])
        o.sum().backward()


def precompile(args, all_jobs):
    n = max(1, args.compile_workers)
    chunks = [all_jobs[i::n] for i in range(n)]
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)

    def one(chunk):
        spec = json.dumps({"H": args.H, "D": args.D, "jobs": chunk})
        r = subprocess.run([sys.executable, __file__, "--compile-only", spec], env=env,
                           capture_output=True, text=True)
        return r.returncode, r.stderr[-2000:]
    t0 = datetime.datetime.now()
    with ThreadPoolExecutor(n) as ex:
        for rc, err in ex.map(one, [c for c in chunks if c]):
            if rc != 0:
                print(f"compile worker failed (rc {rc}):\n{err}", file=sys.stderr)
    print(f"compiled {len(all_jobs)} configurations in {n} processes: "
          f"{(datetime.datetime.now() - t0).total_seconds():.0f} s", flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.compile_only:
        return compile_only(args.compile_only)
    import torch
    import torch.nn.functional as F
    if not torch.cuda.is_available():
        raise SystemExit("sweep_staircase.py needs a CUDA GPU")
    from megatron_ham.kernels import staircase as st

    # schedule variants of the autotuned kernels: (tiles key, value or None for the kernel's rule)
    variants = [("group", None if g == "auto" else int(g)) for g in args.groups] + \
               [("split", None if n == "auto" else int(n)) for n in args.splits]
    all_jobs = [] if args.groups_only else jobs(args.layouts)
    if args.groups_only and not variants:
        raise SystemExit("--groups-only needs --groups or --splits")
    if args.compile_workers > 0 and all_jobs:
        precompile(args, all_jobs)
    T, H, D = args.T, args.H, args.D
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  "
          f"{torch.cuda.get_device_name()}  torch {torch.__version__}  T={T} H={H} D={D} bf16",
          flush=True)

    q, k, v, _ = inputs(T, H, D, 1.0)
    sdpa = lambda: F.scaled_dot_product_attention(  # noqa: E731
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)

    def sdpa_fwd():
        with torch.no_grad():
            sdpa()
    o = sdpa()
    do = torch.randn_like(o)
    s_fwd = median_ms(sdpa_fwd, args.warmup, args.iters)
    s_bwd = median_ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True),
                      args.warmup, args.iters)
    causal = T * (T + 1) // 2
    rows = [{"case": "sdpa", "f": 1.0, "fwd_ms": s_fwd, "bwd_ms": s_bwd,
             "fwd_tflops": tflops(causal, H, D, s_fwd, 1),
             "bwd_tflops": tflops(causal, H, D, s_bwd, 2.5)}]
    print(f"sdpa: fwd {s_fwd:.3f} ms ({rows[0]['fwd_tflops']:.0f} TFLOP/s)  bwd {s_bwd:.3f} ms "
          f"({rows[0]['bwd_tflops']:.0f})", flush=True)
    del o, do
    _, _, _, routed = inputs(T, H, D, 0.5)
    order = st.compaction_plan(routed, None)[1]
    g_ms = median_ms(lambda: (st._compacted(k, order), st._compacted(v, order)), args.warmup,
                     args.iters)
    rows.append({"case": "kv_copies", "ms": g_ms})
    print(f"K and V copies in slot order (kv_layout=compact, once per forward and backward): "
          f"{g_ms:.3f} ms", flush=True)

    hdr = f"{'f':>5} {'layout':>8} {'kernel':>5} {'config':>18} {'fwd ms':>8} {'bwd ms':>8} " \
          f"{'fwd TF/s':>8} {'bwd TF/s':>8} {'x f*SDPA':>8}"
    print(hdr, flush=True)
    for frac in args.fracs:
        q, k, v, routed = inputs(T, H, D, frac)
        pairs = visible_pairs(routed)
        ref = frac * (s_fwd + s_bwd)
        mine = []
        for job in all_jobs:
            f_ms, b_ms = run_case(st, q, k, v, routed, job, args.warmup, args.iters)
            cfg = job["tiles"][job["kernel"]]
            row = {"case": "staircase", "f": frac, **job, "fwd_ms": f_ms, "bwd_ms": b_ms,
                   "fwd_tflops": tflops(pairs, H, D, f_ms, 1),
                   "bwd_tflops": tflops(pairs, H, D, b_ms, 2.5), "x_f_sdpa": (f_ms + b_ms) / ref}
            mine.append(row)
            print(f"{frac:>5} {job['layout']:>8} {job['kernel']:>5} {str(cfg):>18} {f_ms:8.3f} "
                  f"{b_ms:8.3f} {row['fwd_tflops']:8.0f} {row['bwd_tflops']:8.0f} "
                  f"{row['x_f_sdpa']:8.2f}", flush=True)
        rows += mine
        for name, val in variants:
            job = {"layout": "compact", "kernel": name, "tiles": {} if val is None else {name: val}}
            f_ms, b_ms = run_case(st, q, k, v, routed, job, args.warmup, args.iters)
            if name == "group":
                used = st.heads_per_group(T, D, D, q.element_size()) if val is None else val
            else:
                used = st.split_plan(job["tiles"], T, H, q.device).n_max
            row = {"case": name, "f": frac, name: used, "auto": val is None, "fwd_ms": f_ms,
                   "bwd_ms": b_ms, "total_ms": f_ms + b_ms, "x_f_sdpa": (f_ms + b_ms) / ref,
                   "kernels_ms": kernel_times(st, q, k, v, routed, job)}
            rows.append(row)
            what = "heads per group" if name == "group" else "dk/dv pieces (at most)"
            print(f"{name.upper()} f={frac} {what} {used}{' (auto)' if val is None else ''}: fwd "
                  f"{f_ms:.3f} + bwd {b_ms:.3f} = {f_ms + b_ms:.3f} ms, {row['x_f_sdpa']:.2f}x "
                  f"(f x SDPA); kernels " + ", ".join(
                      f"{n[:24]} {ms:.3f}" for n, ms in row["kernels_ms"].items()), flush=True)
        if not mine:
            continue
        for lay in args.layouts:
            cand = [r for r in mine if r["layout"] == lay]
            best = {"fwd": min((r for r in cand if r["kernel"] == "fwd"),
                               key=lambda r: r["fwd_ms"])["tiles"]["fwd"]}
            for kern, other, base in (("dq", "dkdv", DKDV[0]), ("dkdv", "dq", DQ[0])):
                best[kern] = min((r for r in cand if r["tiles"][other] == base),
                                 key=lambda r: r["bwd_ms"])["tiles"][kern]
            job = {"layout": lay, "kernel": "best", "tiles": best}
            f_ms, b_ms = run_case(st, q, k, v, routed, job, args.warmup, args.iters)
            row = {"case": "best", "f": frac, **job, "fwd_ms": f_ms, "bwd_ms": b_ms,
                   "total_ms": f_ms + b_ms, "x_sdpa": (f_ms + b_ms) / (s_fwd + s_bwd),
                   "x_f_sdpa": (f_ms + b_ms) / ref, "tflops": tflops(pairs, H, D, f_ms + b_ms, 3.5),
                   "kernels_ms": kernel_times(st, q, k, v, routed, job)}
            rows.append(row)
            print(f"BEST f={frac} {lay}: {best}  fwd {f_ms:.3f} + bwd {b_ms:.3f} = "
                  f"{f_ms + b_ms:.3f} ms, {row['x_sdpa']:.3f}x SDPA, {row['x_f_sdpa']:.2f}x "
                  f"(f x SDPA), {row['tflops']:.0f} TFLOP/s", flush=True)
            print("   kernels (ms per fwd+bwd): " + ", ".join(
                f"{n} {ms:.3f}" for n, ms in row["kernels_ms"].items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"T": T, "H": H, "D": D, "rows": rows,
                                               "device": torch.cuda.get_device_name(),
                                               "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()
