"""The README's main command: the whole pipeline on the embedded sample, on CPU, in minutes.

    python -m megatron_ham.demo [--out runs/demo] [--steps 40] [--nproc 2]

1. data     ham-prep-data on the shipped sample corpus (data_prep/sample, Long Data Collections
            layout) -> Megatron IndexedDatasets + blend.json        (skipped when already done)
2. train    a tiny HAM (recipes/tiny_cpu.yaml) on 2 CPU ranks with torch.distributed.run,
            stopped half-way (train.exit_after_steps) with a checkpoint
3. resume   the same command again: auto-resumes from `latest` and finishes
4. export   ham-convert-hf -> a Hugging Face model directory, then greedy generation with
            transformers (the exporter is megatron_ham/hf; see docs/export.md)
Prints where everything went.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "tiny_cpu.yaml")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, log_path: str, env=None) -> int:
    print("  $ " + " ".join(cmd), flush=True)
    with open(log_path, "a") as log:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        for line in p.stdout:
            log.write(line)
            if line.startswith(("step ", "[setup]", "[checkpoint]", "[train]", "ham-train",
                                "[ham-convert-hf] verify", "[ham-convert-hf] wrote")) or \
                    "Error" in line:
                print("    " + line.rstrip(), flush=True)
        return p.wait()


def _generate(hf_dir: str, prompt: str = "The Python", n: int = 16):
    """Greedy continuation of `prompt` by the exported model (transformers, CPU)."""
    try:
        import megatron_ham.hf  # noqa: F401  (registers the architecture)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(hf_dir)
        tok = AutoTokenizer.from_pretrained(hf_dir)
        ids = tok(prompt, return_tensors="pt").input_ids
        text = tok.decode(model.generate(ids, max_new_tokens=n, do_sample=False)[0])
        print(f"  generate({prompt!r}) -> {text!r}", flush=True)
        return text
    except Exception as e:  # the demo still reports everything else
        print(f"  generation failed: {type(e).__name__}: {e}", flush=True)
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="everything goes here")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--nproc", type=int, default=2, help="CPU ranks (data parallel)")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    data_dir, run_dir = os.path.join(out, "data"), os.path.join(out, "tiny-ham")
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "demo.log")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    t0 = time.time()

    print(f"[1/4] data: ham-prep-data on the embedded sample -> {data_dir}", flush=True)
    blend = os.path.join(data_dir, "blend.json")
    if not os.path.exists(blend):
        rc = _run([sys.executable, "-m", "data_prep.cli", "--manifest", "sample", "--out", data_dir],
                  log_path, env)
        if rc != 0:
            print(f"ham-prep-data failed ({rc}); see {log_path}")
            return rc
    else:
        print(f"  (already prepared: {blend})")

    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run every time
    half = max(1, args.steps // 2)
    overrides = [
        f"data.blend={blend}", f"checkpoint.dir={run_dir}/checkpoints",
        f"data.tokenizer={os.path.join(REPO, 'data_prep', 'sample', 'tokenizer')}",
        f"train.train_steps={args.steps}", f"checkpoint.interval={half}",
        f"train.eval_interval={half}",
    ]
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
              "--master-addr=127.0.0.1", "-m", "megatron_ham.train", RECIPE]

    print(f"[2/4] train: tiny HAM on {args.nproc} CPU ranks, stopping at step {half} "
          f"(as if preempted) -> {run_dir}", flush=True)
    rc = _run(launch[:4] + [f"--master-port={_port()}"] + launch[4:] + overrides +
              [f"train.exit_after_steps={half}"], log_path, env)
    if rc != 0:
        print(f"training failed ({rc}); see {log_path}")
        return rc

    print(f"[3/4] resume: same command, auto-resumes from {run_dir}/checkpoints/latest", flush=True)
    rc = _run(launch[:4] + [f"--master-port={_port()}"] + launch[4:] + overrides, log_path, env)
    if rc != 0:
        print(f"resumed training failed ({rc}); see {log_path}")
        return rc

    # Step 4 uses the HF exporter (megatron_ham/hf, docs/export.md), owned by the export work;
    # the lead may refine it (prompt, sampling, what is printed).
    hf_dir = os.path.join(out, "hf")
    print(f"[4/4] export + generate: ham-convert-hf -> {hf_dir}", flush=True)
    rc = _run([sys.executable, "-m", "megatron_ham.hf.convert", "--checkpoint",
               os.path.join(run_dir, "checkpoints"), "--output", hf_dir, "--overwrite", "--verify", "16"],
              log_path, env)
    sample = None
    if rc == 0:
        sample = _generate(hf_dir)
    else:
        print(f"  export failed ({rc}); see {log_path}", flush=True)

    ck = os.path.join(run_dir, "checkpoints")
    latest = open(os.path.join(ck, "latest")).read().strip()
    rows = []
    mpath = os.path.join(run_dir, "metrics.jsonl")
    with open(mpath) as f:
        rows = [json.loads(l) for l in f if l.strip()]
    train = [r for r in rows if r["kind"] == "train"]
    valid = [r for r in rows if r["kind"] == "valid"]
    print(f"\ndone in {time.time() - t0:.0f}s. Train loss {train[0]['loss']:.3f} (step {train[0]['step']}) "
          f"-> {train[-1]['loss']:.3f} (step {train[-1]['step']})"
          + (f"; validation loss {valid[-1]['loss']:.3f}" if valid else ""))
    print(f"  data (IndexedDataset + blend.json): {data_dir}")
    print(f"  checkpoints:                        {ck}  (latest -> {latest})")
    print(f"  metrics (JSON lines):               {mpath}")
    print(f"  TensorBoard:                        tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}")
    if sample is not None:
        print(f"  Hugging Face export:                {hf_dir}")
        print(f"  greedy sample: {sample!r}")
    print(f"  full log:                           {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
