"""Throughput and MFU of the four 800M recipes, side by side, on one GPU in one session.

    python tools/bench_recipes.py                      # H100/H200: both modes, ~4-6 min per recipe (HAM: + compile)
    python tools/bench_recipes.py --mode mbs1 --steps 30 --warmup 5 --out bench.json
    python tools/bench_recipes.py --set train.compile_cache_dir=/tmp/cc   # cold, then warm compile
    python tools/bench_recipes.py --recipes recipes/tiny_cpu.yaml --set model.seq_length=128 \
        --steps 3 --warmup 1 --recipe-steps 1 --recipe-warmup 1   # CPU smoke test of the tool itself
    python tools/bench_recipes.py --recipes recipes/ham_800m.yaml --mode recipe --gpus 1 2   # DP scaling
    python tools/bench_recipes.py --recipes recipes/ham_800m.yaml --mode recipe --baseline HEAD~1 --repeat 2
        # a change against a git revision: baseline, this checkout, this checkout, baseline

Each recipe runs the real training loop (`python -m megatron_ham.train`; one process, or with
`--gpus N` N data-parallel processes of one host through torchrun) at its own context (16,384
for the 800M recipes), synthetic tokens, no checkpoints, in one or both modes (`--mode`):

- `mbs1`: micro-batch 1 and global batch 1 per GPU (one 16k sequence per GPU and optimizer
  step), for `--warmup` + `--steps` steps: the kernels' speed, an optimizer step per sequence;
- `recipe`: the recipe's own global batch and micro-batch (the 800M recipes: 32 sequences per
  step = 32 micro-batches of 1 accumulated on one GPU), for `--recipe-warmup` +
  `--recipe-steps` steps: the throughput of the run as it trains.

The warm-up steps (kernel compilation, allocator growth) are excluded; tokens/s/GPU and MFU
(per optimizer step) are the mean over the measured steps as logged by the loop (MFU formula:
docs/training.md, the HAM scratchpad counted at its measured KV fraction). Each run also reports
its time from process start to the end of its first step (`ttfs`), split into set-up and the
first step, and whether the compile cache was warm (with `--set train.compile_cache_dir=DIR`
the first run of a recipe fills DIR and its second mode starts warm). Ratios are against the
Transformer of the same mode and GPU count measured in the same session; the host's CPU and
its per-operator overhead are printed and recorded (`machine`, tools/machine_info.py): a
launch-bound step runs at the host's speed, which differs between machines. Targets (issue #15):
MFU >= 40 %, HAM tokens/s >= 1.3 x Transformer. With several `--gpus`, each recipe and mode also
gets its data-parallel scaling: tokens/s per GPU at N GPUs over that at the first count given
(issue #15's target: >= 0.9 from 1 to 2 GPUs); the recipe mode keeps the recipe's global batch
(32 sequences: 16 micro-batches per GPU at 2 GPUs), as a run on more GPUs would.

Before/after a change: `--baseline REV` also runs every recipe from git revision REV (its
megatron_ham, recipes and tools, extracted into a temporary directory), in the same session and
interleaved with this checkout's runs: B A for the first of `--repeat` rounds, A B for the next,
and so on, so that a drift of the GPU over the session (clocks, temperature) does not fall on one
side. One run per side is not enough: on an H200 on 2026-12-03, one change measured -5.2 % and
-2.5 % in two such pairs (opposite orders), and one recipe ran at 48.9k-53.0k tokens/s on the
machines of one day. Each side's tokens/s is the mean over its runs, with their range;
`after/before` is this checkout's over the baseline's. `--repeat N` without a baseline runs this
checkout N times (the spread of a measurement).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]  # megatron_ham, machine_info

from megatron_ham.distributed import free_port  # noqa: E402
from megatron_ham.models.presets import PAPER_ARCHITECTURES  # noqa: E402
from megatron_ham.training.atomic import atomic_write_text  # noqa: E402
from megatron_ham.training.config import ConfigError, load_config  # noqa: E402
from machine_info import describe, machine_info  # noqa: E402

DEFAULT = [f"recipes/{a}_800m.yaml" for a in PAPER_ARCHITECTURES]


MODES = ("mbs1", "recipe")


def measurement_overrides(work: str, steps: int) -> list:
    """What every measurement run forces on a recipe (also tools/profile_step.py): synthetic
    tokens, `steps` steps, no validation, no checkpoints, logs under `work`."""
    return ["data.backend=synthetic", f"train.train_steps={steps}", "train.warmup_steps=1",
            "train.eval_interval=0", f"checkpoint.dir={work}/ckpt", "checkpoint.resume=false",
            "checkpoint.save_at_end=false", "checkpoint.interval=0",
            f"logging.jsonl={work}/metrics.jsonl", f"logging.tensorboard_dir={work}/tb"]


def _stop(p: subprocess.Popen, torchrun: bool) -> str:
    """End a run past --timeout with everything it started; returns its output so far. torchrun
    starts its workers in sessions of their own: SIGTERM lets it stop them (up to 60 s), then
    SIGKILL goes to its process group (one process: SIGKILL at once)."""
    if torchrun:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            return p.communicate(timeout=60)[0] or ""
        except subprocess.TimeoutExpired:
            pass
    os.killpg(p.pid, signal.SIGKILL)
    try:
        return p.communicate(timeout=10)[0] or ""
    except subprocess.TimeoutExpired:  # a worker that outlived its launcher still holds the pipe
        p.stdout.close()
        p.wait()
        return ""


def tree_env(tree: str) -> dict:
    """The environment of a process that runs the source tree `tree` (this checkout or a
    baseline's copy): its directory first on PYTHONPATH (its megatron_ham, not the one this
    script imported), no inherited rendezvous variables (the process starts its own world)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tree, env.get("PYTHONPATH")) if p)
    return env


def run_one(recipe: str, mode: str, steps: int, warmup: int, extra, workdir: str, timeout: float,
            gpus: int = 1, repo: str = REPO, side: str = "current", round_: int = 0) -> dict:
    """One run of `recipe` from the source tree `repo` (this checkout, or a baseline's copy)."""
    name = os.path.splitext(os.path.basename(recipe))[0]
    d = os.path.join(workdir, name, mode, f"{gpus}gpu", f"{side}{round_}")
    os.makedirs(d, exist_ok=True)
    batch = [f"train.global_batch_size={gpus}", "train.micro_batch_size=1"] if mode == "mbs1" else []
    ov = [*measurement_overrides(d, steps + warmup), *batch, "logging.interval=1", *extra]
    env = tree_env(repo)
    env["PYTHONWARNINGS"] = "ignore"
    if gpus == 1:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        launch = [sys.executable]
    else:  # torchrun picks its own rendezvous port (--standalone)
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as slurm/ham.sbatch
    t0 = time.time()
    p = subprocess.Popen([*launch, "-m", "megatron_ham.train", os.path.join(repo, recipe), *ov], cwd=repo,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        log, _ = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        log, rc = _stop(p, torchrun=gpus > 1), "timeout"
    cfg = load_config(os.path.join(REPO, recipe), [*batch, *extra])
    t = cfg.train
    res = {"recipe": recipe, "mode": mode, "gpus": gpus, "side": side, "round": round_,
           "architecture": cfg.model.architecture, "rc": rc,
           "wall_s": round(time.time() - t0, 1), "global_batch_size": t.global_batch_size,
           "micro_batch_size": t.micro_batch_size,
           "micro_batches_per_step": t.global_batch_size // (t.micro_batch_size * gpus)}  # per GPU
    rows = []
    if os.path.exists(f"{d}/metrics.jsonl"):
        with open(f"{d}/metrics.jsonl") as f:
            rows = [json.loads(l) for l in f if l.strip()]
    start = next((r for r in rows if r.get("kind") == "startup"), None)
    if start:
        res.update(ttfs_s=start["time_to_first_step_s"], setup_s=start["setup_s"],
                   first_step_s=start["first_step_s"], cache_warm=start["compile_cache"]["warm"],
                   compile_counters=start["compile_counters"], code=start.get("code"))
    rows = [r for r in rows if r.get("kind") == "train" and r["step"] > warmup]
    if not rows:
        res["error"] = log[-3000:]
        return res
    mean = lambda k: statistics.fmean(r[k] for r in rows if r.get(k) is not None)  # noqa: E731
    res.update(
        measured_steps=len(rows),
        tokens_per_s_per_gpu=mean("tokens_per_s_per_device"),
        step_time_s=mean("step_time_s"),
        mfu=mean("mfu") if any(r.get("mfu") is not None for r in rows) else None,
        model_tflops_per_token=rows[-1].get("model_tflops_per_token"),
        mem_alloc_gib=max((r.get("mem_alloc_gib") or 0) for r in rows),
        loss_last=rows[-1]["loss"],
        kv_fraction_mean=(statistics.fmean(v["fraction"] for v in rows[-1]["kv"].values())
                          if rows[-1].get("kv") else None),
    )
    return res


def merge_runs(runs: list) -> dict:
    """The runs of one recipe, mode, GPU count and side as one result: the means of tokens/s,
    step time and MFU over the runs that measured, their range, the largest memory; set-up
    times from the first run (the one that may have compiled). A side whose runs all failed is
    its first run."""
    ok = [r for r in runs if "tokens_per_s_per_gpu" in r]
    if not ok:
        return dict(runs[0], runs=[])
    res = dict(ok[0])
    mean = lambda k: statistics.fmean(r[k] for r in ok)  # noqa: E731
    tps = [r["tokens_per_s_per_gpu"] for r in ok]
    res.update(tokens_per_s_per_gpu=mean("tokens_per_s_per_gpu"), step_time_s=mean("step_time_s"),
               mfu=None if ok[0]["mfu"] is None else mean("mfu"),
               mem_alloc_gib=max(r["mem_alloc_gib"] for r in ok), loss_last=ok[-1]["loss_last"],
               runs=tps, tokens_per_s_min=min(tps), tokens_per_s_max=max(tps),
               failed_runs=len(runs) - len(ok))
    return res


def ab_report(baseline: list, current: list, rev: str) -> None:
    """This checkout against the baseline revision, per recipe, mode and GPU count: each side's
    mean tokens/s over its runs with their range, and after/before. Adds `vs_baseline` to the
    current results."""
    print(f"\nagainst the baseline {rev} (runs interleaved; tokens/s per GPU: mean [min - max] of the runs)")
    print(f"{'recipe':<28} {'mode':<7} {'GPUs':>4} {'baseline':>26} {'this checkout':>26} {'after/before':>12} "
          f"{'mem GiB':>12} {'loss':>17}")
    for cur in current:
        key = (cur["recipe"], cur["mode"], cur["gpus"])
        base = next(b for b in baseline if (b["recipe"], b["mode"], b["gpus"]) == key)
        head = f"{cur['recipe']:<28} {cur['mode']:<7} {cur['gpus']:>4}"
        if not (base["runs"] and cur["runs"]):
            print(f"{head} {'FAILED' if not base['runs'] else 'ok':>26} {'FAILED' if not cur['runs'] else 'ok':>26}")
            continue
        side = lambda x: (f"{x['tokens_per_s_per_gpu']:.0f} [{x['tokens_per_s_min']:.0f} - "  # noqa: E731
                          f"{x['tokens_per_s_max']:.0f}] x{len(x['runs'])}")
        cur["vs_baseline"] = cur["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
        print(f"{head} {side(base):>26} {side(cur):>26} {cur['vs_baseline']:>11.3f}x "
              f"{base['mem_alloc_gib']:>5.1f}/{cur['mem_alloc_gib']:<6.1f} "
              f"{base['loss_last']:>8.4f}/{cur['loss_last']:<8.4f}")


def extract_revision(rev: str, dest: str) -> str:
    """megatron_ham, recipes and tools of git revision `rev` of this checkout, extracted under
    `dest` (a directory this tool created); returns the tree's path. ValueError naming the
    revision when git cannot produce it."""
    if not rev or rev.startswith("-"):  # never an option of git's
        raise ValueError(f"--baseline {rev!r}: a git revision (a commit, branch or tag) is expected")
    p = subprocess.run(["git", "-C", REPO, "archive", "--format=tar", rev, "megatron_ham", "recipes", "tools"],
                       capture_output=True)
    if p.returncode != 0:
        raise ValueError(f"--baseline {rev!r}: git archive failed: {p.stderr.decode(errors='replace').strip()}")
    tree = os.path.join(dest, "baseline")
    with tarfile.open(fileobj=io.BytesIO(p.stdout)) as tar:
        tar.extractall(tree, filter="data")  # no links or paths out of the tree
    return tree


def report(results: list, modes, gpus) -> None:
    """The table (ratios against the Transformer of the same mode and GPU count), the targets,
    and the data-parallel scaling of each recipe and mode over the GPU counts. Adds
    `vs_transformer` and `dp_scaling` to the result rows."""
    print(f"{'recipe':<28} {'mode':<7} {'GPUs':>4} {'gbs/mbs':>8} {'tok/s/GPU':>10} {'vs transf.':>10} {'MFU':>7} "
          f"{'step s':>8} {'mem GiB':>8} {'KV frac':>8} {'ttfs s':>7} {'(set-up+step)':>14} {'cache':>6}")
    ok = [x for x in results if "tokens_per_s_per_gpu" in x]
    for mode in modes:
        for n in gpus:
            base = next((x for x in ok if (x["mode"], x["gpus"], x["architecture"]) == (mode, n, "transformer")), None)
            for x in (x for x in results if (x["mode"], x["gpus"]) == (mode, n)):
                ttfs = (f"{x['ttfs_s']:>7.1f} {x['setup_s']:>6.1f}+{x['first_step_s']:<7.1f} "
                        f"{'warm' if x['cache_warm'] else 'cold':>6}") if "ttfs_s" in x else ""
                head = f"{x['recipe']:<28} {mode:<7} {n:>4} {x['global_batch_size']:>4}/{x['micro_batch_size']:<3}"
                if "tokens_per_s_per_gpu" not in x:
                    print(f"{head} {'FAILED (rc ' + str(x['rc']) + ')':>10}")
                    continue
                # no Transformer of this mode in the run: no ratio (None in the JSON, "-" here)
                ratio = x["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] if base else None
                x["vs_transformer"] = ratio
                vs = "-" if ratio is None else f"{ratio:.2f}x"
                mfu = "n/a" if x["mfu"] is None else f"{100 * x['mfu']:.1f}%"
                kv = "-" if x["kv_fraction_mean"] is None else f"{x['kv_fraction_mean']:.2f}"
                print(f"{head} {x['tokens_per_s_per_gpu']:>10.0f} {vs:>10} {mfu:>7} "
                      f"{x['step_time_s']:>8.3f} {x['mem_alloc_gib']:>8.1f} {kv:>8} {ttfs}")
            ham = next((x for x in ok if (x["mode"], x["gpus"], x["architecture"]) == (mode, n, "ham")), None)
            if ham and base:
                ok_mfu = ham["mfu"] is not None and ham["mfu"] >= 0.40
                ok_tps = ham["vs_transformer"] >= 1.3
                print(f"targets ({mode}, {n} GPU): HAM MFU >= 40%: {'PASS' if ok_mfu else 'FAIL'}; "
                      f"HAM tokens/s >= 1.3x Transformer: {'PASS' if ok_tps else 'FAIL'}")
    first = gpus[0]
    for x in ok:  # tokens/s per GPU at N GPUs over that at the first count, same recipe and mode
        one = next((y for y in ok if (y["recipe"], y["mode"], y["gpus"]) == (x["recipe"], x["mode"], first)), None)
        if one is None or x["gpus"] == first:
            continue
        x["dp_scaling"] = x["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"]
        print(f"data-parallel scaling {x['recipe']} ({x['mode']}): {first} -> {x['gpus']} GPUs, "
              f"{x['dp_scaling']:.3f} of the tokens/s per GPU (target >= 0.9)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=DEFAULT)
    ap.add_argument("--mode", choices=(*MODES, "both"), default="both",
                    help="mbs1: micro-batch = global batch = 1; recipe: the recipe's own batch (default: both)")
    ap.add_argument("--steps", type=int, default=30, help="mbs1 mode: measured steps per recipe (>= 30 for the report)")
    ap.add_argument("--warmup", type=int, default=5, help="mbs1 mode: unmeasured steps first")
    ap.add_argument("--recipe-steps", type=int, default=2,
                    help="recipe mode: measured optimizer steps (each one is a whole global batch)")
    ap.add_argument("--recipe-warmup", type=int, default=1, help="recipe mode: unmeasured steps first")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every recipe")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1], metavar="N",
                    help="data-parallel processes per run, one host (torchrun); several counts also "
                         "give the scaling between them (default: 1)")
    ap.add_argument("--timeout", type=float, default=420,
                    help="seconds per run (the first HAM step compiles TileLang + Inductor kernels: ~5 min cold)")
    ap.add_argument("--baseline", default=None, metavar="REV",
                    help="also run every recipe from this git revision (e.g. HEAD~1), interleaved "
                         "with this checkout's runs, and report after/before")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="runs per recipe, mode and GPU count (and side, with --baseline); the "
                         "report gives their mean and range (default: 1)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    for k in ("steps", "recipe_steps"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")
    for k in ("warmup", "recipe_warmup"):
        if getattr(args, k) < 0:
            ap.error(f"--{k.replace('_', '-')} must be >= 0")
    if any(n < 1 for n in args.gpus) or len(set(args.gpus)) != len(args.gpus):
        ap.error(f"--gpus: distinct counts >= 1, got {args.gpus}")
    for r in args.recipes:  # every recipe and override checked before the first (long) run
        try:
            load_config(os.path.join(REPO, r), list(args.set))
        except ConfigError as e:
            print(f"bench_recipes: config error: {e}", file=sys.stderr)
            return 2
    modes = MODES if args.mode == "both" else (args.mode,)
    plan = {"mbs1": (args.steps, args.warmup), "recipe": (args.recipe_steps, args.recipe_warmup)}
    machine = machine_info()  # the host's speed can set a launch-bound step's time
    print(describe(machine), flush=True)
    results, baseline = [], []
    with tempfile.TemporaryDirectory(prefix="bench_recipes_") as work:
        trees = {"current": REPO}
        if args.baseline:
            try:
                trees["baseline"] = extract_revision(args.baseline, work)
            except ValueError as e:
                print(f"bench_recipes: {e}", file=sys.stderr)
                return 2
        for r in args.recipes:
            for mode in modes:
                for n in args.gpus:
                    runs = {side: [] for side in trees}
                    for i in range(args.repeat):  # B A, A B, B A, ...: a drift falls on both sides
                        for side in (sorted(trees) if i % 2 == 0 else sorted(trees, reverse=True)):
                            res = run_one(r, mode, *plan[mode], args.set, work, args.timeout, gpus=n,
                                          repo=trees[side], side=side, round_=i)
                            runs[side].append(res)
                            print(json.dumps({k: v for k, v in res.items() if k != "error"}), flush=True)
                            if "error" in res:
                                print(f"--- {r} ({mode}, {n} GPU, {side} run {i + 1}) failed (rc {res['rc']}) "
                                      f"---\n{res['error']}", flush=True)
                    results.append(merge_runs(runs["current"]))
                    if args.baseline:
                        baseline.append(merge_runs(runs["baseline"]))
    for x in results + baseline:
        x["machine"] = machine
    print()
    print(describe(machine))
    report(results, modes, args.gpus)
    if args.baseline:
        ab_report(baseline, results, args.baseline)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write_text(args.out, json.dumps(results + baseline, indent=1))
    return 0 if all(x["runs"] and not x.get("failed_runs") for x in results + baseline) else 1


if __name__ == "__main__":
    sys.exit(main())
