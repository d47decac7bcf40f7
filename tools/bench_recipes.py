"""Throughput and MFU of the four 800M recipes, side by side, on one GPU in one session.

    python tools/bench_recipes.py                      # H100/H200: ~1-2 min per recipe (HAM: +~2 min compile)
    python tools/bench_recipes.py --steps 30 --warmup 5 --out bench.json
    python tools/bench_recipes.py --recipes recipes/tiny_cpu.yaml --set model.seq_length=128 \
        --steps 3 --warmup 1                           # CPU smoke test of the tool itself

Each recipe runs the real training loop (`python -m megatron_ham.train`, one process, world
size 1) at its own context (16,384 for the 800M recipes) with micro-batch 1 and global batch 1
(one 16k sequence per step), synthetic tokens, no checkpoints, for warmup + steps steps. The
warm-up steps (kernel compilation, allocator growth) are excluded; tokens/s/GPU and MFU are
the mean over the measured steps as logged by the loop (MFU formula: docs/training.md, the HAM
scratchpad counted at its measured KV fraction). Ratios are against the Transformer measured in
the same session. Targets (issue #5): HAM MFU >= 40 %, HAM tokens/s >= 1.0 x Transformer.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_ham.models.presets import PAPER_ARCHITECTURES  # noqa: E402
from megatron_ham.training.config import load_config  # noqa: E402

DEFAULT = [f"recipes/{a}_800m.yaml" for a in PAPER_ARCHITECTURES]


def run_one(recipe: str, steps: int, warmup: int, extra, workdir: str, timeout: float) -> dict:
    name = os.path.splitext(os.path.basename(recipe))[0]
    d = os.path.join(workdir, name)
    os.makedirs(d, exist_ok=True)
    ov = [
        "data.backend=synthetic", "train.global_batch_size=1", "train.micro_batch_size=1",
        f"train.train_steps={steps + warmup}", "train.warmup_steps=1", "train.eval_interval=0",
        f"checkpoint.dir={d}/ckpt", "checkpoint.resume=false", "checkpoint.save_at_end=false",
        "checkpoint.interval=0", f"logging.jsonl={d}/metrics.jsonl", f"logging.tensorboard_dir={d}/tb",
        "logging.interval=1", *extra,
    ]
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29500 + (os.getpid() % 1000)), PYTHONWARNINGS="ignore")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as slurm/ham.sbatch
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), REPO) if p)
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "megatron_ham.train", os.path.join(REPO, recipe), *ov],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        rc, log = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, log = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    res = {"recipe": recipe, "architecture": load_config(os.path.join(REPO, recipe), list(extra)).model.architecture,
           "rc": rc, "wall_s": round(time.time() - t0, 1)}
    rows = []
    if os.path.exists(f"{d}/metrics.jsonl"):
        with open(f"{d}/metrics.jsonl") as f:
            rows = [json.loads(l) for l in f if l.strip()]
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="+", default=DEFAULT)
    ap.add_argument("--steps", type=int, default=30, help="measured steps per recipe (>= 30 for the report)")
    ap.add_argument("--warmup", type=int, default=5, help="unmeasured steps first")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every recipe")
    ap.add_argument("--timeout", type=float, default=420,
                    help="seconds per recipe (the first HAM step compiles TileLang + Inductor kernels: ~100 s)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_recipes_") as work:
        for r in args.recipes:
            res = run_one(r, args.steps, args.warmup, args.set, work, args.timeout)
            results.append(res)
            brief = {k: v for k, v in res.items() if k != "error"}
            print(json.dumps(brief), flush=True)
            if "error" in res:
                print(f"--- {r} failed (rc {res['rc']}) ---\n{res['error']}", flush=True)
    base = next((x for x in results if x["architecture"] == "transformer" and "tokens_per_s_per_gpu" in x), None)
    print()
    print(f"{'recipe':<32} {'tok/s/GPU':>10} {'vs transf.':>10} {'MFU':>7} {'step s':>8} {'mem GiB':>8} {'KV frac':>8}")
    for x in results:
        if "tokens_per_s_per_gpu" not in x:
            print(f"{x['recipe']:<32} {'FAILED (rc ' + str(x['rc']) + ')':>10}")
            continue
        ratio = x["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] if base else float("nan")
        x["vs_transformer"] = ratio
        mfu = "n/a" if x["mfu"] is None else f"{100 * x['mfu']:.1f}%"
        kv = "-" if x["kv_fraction_mean"] is None else f"{x['kv_fraction_mean']:.2f}"
        print(f"{x['recipe']:<32} {x['tokens_per_s_per_gpu']:>10.0f} {ratio:>9.2f}x {mfu:>7} "
              f"{x['step_time_s']:>8.3f} {x['mem_alloc_gib']:>8.1f} {kv:>8}")
    ham = next((x for x in results if x["architecture"] == "ham" and "tokens_per_s_per_gpu" in x), None)
    if ham and base:
        ok_mfu = ham["mfu"] is not None and ham["mfu"] >= 0.40
        ok_tps = ham["vs_transformer"] >= 1.0
        print(f"\ntargets: HAM MFU >= 40%: {'PASS' if ok_mfu else 'FAIL'}; "
              f"HAM tokens/s >= 1.0x Transformer: {'PASS' if ok_tps else 'FAIL'}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all("tokens_per_s_per_gpu" in x for x in results) else 1


if __name__ == "__main__":
    sys.exit(main())
