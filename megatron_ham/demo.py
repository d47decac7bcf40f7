"""The README's main command: the whole pipeline on the embedded sample, on CPU, in minutes.

    python -m megatron_ham.demo [--out runs/demo] [--steps 40] [--nproc 2]

1. data     ham-prep-data on the shipped sample corpus (data_prep/sample, Long Data Collections
            layout) -> Megatron IndexedDatasets + blend.json        (skipped when already done)
2. train    a tiny HAM (recipes/tiny_cpu.yaml) on 2 CPU ranks (one process per rank, as srun
            starts them), preempted half-way: once step N/2 is logged every rank gets SIGUSR1
            (what Slurm sends before a preemption), finishes its step, checkpoints and exits 75
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
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "tiny_cpu.yaml")
EXIT_REQUEUE = 75  # ham-train's exit code after a preemption signal (training/signals.py)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_ECHO = ("step ", "[setup]", "[checkpoint]", "[train]", "[signal]", "ham-train",
         "[ham-convert-hf] verify", "[ham-convert-hf] wrote")


def _echo(line: str, log) -> None:
    log.write(line)
    if line.startswith(_ECHO) or "Error" in line:
        print("    " + line.rstrip(), flush=True)


def _run(cmd, log_path: str, env=None) -> int:
    print("  $ " + " ".join(cmd), flush=True)
    with open(log_path, "a") as log:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        for line in p.stdout:
            _echo(line, log)
        return p.wait()


def _run_ranks(cmd, n: int, log_path: str, env, preempt_at: int = 0):
    """Start `n` ranks of `cmd` the way srun does (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* in
    the environment); rank 0's output is echoed and logged, the others' go to <log>.rank<r>.
    preempt_at > 0: once rank 0 logs a step >= preempt_at, every rank gets SIGUSR1 (a
    preemption). Returns the exit codes."""
    print(f"  $ {n} x " + " ".join(cmd), flush=True)
    port, procs, logs = str(_port()), [], []
    for r in range(n):
        e = dict(env, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port)
        out = subprocess.PIPE
        if r:
            logs.append(open(f"{log_path}.rank{r}", "a"))
            out = logs[-1]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=e, stdout=out, stderr=subprocess.STDOUT, text=True))
    sent = False
    with open(log_path, "a") as log:
        for line in procs[0].stdout:
            _echo(line, log)
            if preempt_at and not sent and line.startswith("step ") and \
                    int(line.split()[1].split("/")[0]) >= preempt_at:
                print(f"  -> SIGUSR1 to the {n} ranks (preemption)", flush=True)
                for p in procs:
                    p.send_signal(signal.SIGUSR1)
                sent = True
    codes = [p.wait() for p in procs]
    for f in logs:
        f.close()
    return codes


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
    train = [sys.executable, "-m", "megatron_ham.train", RECIPE] + overrides

    print(f"[2/4] train: tiny HAM on {args.nproc} CPU ranks, preempted at step {half} -> {run_dir}",
          flush=True)
    codes = _run_ranks(train, args.nproc, log_path, env, preempt_at=half)
    if codes != [EXIT_REQUEUE] * args.nproc:
        print(f"training did not stop as a preempted job (exit codes {codes}, expected "
              f"{EXIT_REQUEUE}); see {log_path}")
        return 1

    print(f"[3/4] resume: same command, auto-resumes from {run_dir}/checkpoints/latest", flush=True)
    codes = _run_ranks(train, args.nproc, log_path, env)
    if codes != [0] * args.nproc:
        print(f"resumed training failed (exit codes {codes}); see {log_path}")
        return 1

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
