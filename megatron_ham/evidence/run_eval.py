"""ham-eval on the checkpoints of one evidence run, in one process (kernels compile once).

    python -m megatron_ham.evidence.run_eval --run RUN_DIR --heldout DATA/heldout [options]

For every complete checkpoint of RUN_DIR/checkpoints, in step order, one ham-eval report in
RUN_DIR/eval (a report already there is not redone):
  step_XXXXXXXX.json  held-out recall over training (--over-tasks at --over-lengths)
  final.json          the newest checkpoint (redone when a newer one appears: a run stopped by
                      the runner's budget and resumed later): perplexity on the held-out documents (--heldout,
                      every document), the recall suite at --final-lengths (beyond the trained
                      context too), the routing report and its trace (HAM)
  kv_<f>.json         the newest checkpoint at other KV fractions (--kv-sweep, HAM only):
                      ham-eval --kv-fraction f, calibrated on recall examples (--over-tasks
                      at --over-lengths)
Recall examples come from --eval-seed (ham-eval's generators); the training mixture's example seeds
are >= 2^41 (data_prep/recall_mixture.py), so none of them was trained on.
--prune then deletes the run's checkpoints other than the newest (the runner's own files).
Exit codes: 0 ok, 1 a ham-eval call failed (the others still ran), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import List, Optional


def checkpoints(run_dir: str):
    """[(step, step_dir)] of the run's complete checkpoints, by step."""
    from megatron_ham.training.checkpoint import complete_checkpoints

    root = os.path.join(run_dir, "checkpoints")
    return complete_checkpoints(root) if os.path.isdir(root) else []


def _done(report: str, checkpoint: str) -> bool:
    """Whether `report` exists and evaluated `checkpoint` (the same step directory). A final
    report of a run stopped short (the runner's budget) is redone once the resumed run has a
    newer checkpoint."""
    try:
        with open(report, encoding="utf-8") as f:
            path = (json.load(f).get("model") or {}).get("path")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(path, str) and os.path.basename(os.path.normpath(path)) == os.path.basename(
        os.path.normpath(checkpoint))


def _ham_eval(argv: List[str]) -> int:
    from megatron_ham.eval.cli import main

    t0 = time.time()
    rc = main(argv)
    print(f"[run_eval] ham-eval {' '.join(argv)} -> rc {rc} in {time.time() - t0:.1f} s", file=sys.stderr,
          flush=True)
    return rc


def evaluate_run(args) -> int:
    ck = checkpoints(args.run)
    if not ck:
        print(f"[run_eval] {args.run}: no complete checkpoint", file=sys.stderr)
        return 0
    ev = os.path.join(args.run, "eval")
    os.makedirs(ev, exist_ok=True)
    common = ["--seed", str(args.eval_seed), "--samples", str(args.eval_samples), "--batch-size",
              str(args.eval_batch_size), "--no-plots", "--no-progress"]
    failed = 0
    newest_step, newest = ck[-1]
    for step, path in ck:
        out = os.path.join(ev, f"step_{step:08d}.json")
        if not os.path.exists(out):
            failed += _ham_eval(["--checkpoint", path, "--out", out, "--tasks", args.over_tasks,
                                 "--lengths", args.over_lengths, *common]) != 0
    out = os.path.join(ev, "final.json")
    if not _done(out, newest):
        tasks = "recall,routing" + (",ppl" if args.heldout else "")
        extra = ["--data", args.heldout, "--split", "all", "--ppl-samples", str(args.ppl_samples)] if args.heldout else []
        failed += _ham_eval(["--checkpoint", newest, "--out", out, "--tasks", tasks, "--lengths",
                             args.final_lengths, *extra, *common]) != 0
    from megatron_ham.eval.model_io import describe

    if args.kv_sweep and describe(checkpoint=newest).ham_layers:
        for f in args.kv_sweep.split(","):
            out = os.path.join(ev, f"kv_{float(f):g}.json")
            if not _done(out, newest):
                failed += _ham_eval(["--checkpoint", newest, "--out", out, "--tasks", args.over_tasks,
                                     "--lengths", args.over_lengths, "--kv-fraction", f, *common]) != 0
    if args.prune and not failed:
        for step, path in ck[:-1]:
            shutil.rmtree(path, ignore_errors=True)
    print(f"[run_eval] {args.run}: newest step {newest_step}, {len(ck)} checkpoint(s), {failed} failure(s)",
          file=sys.stderr, flush=True)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_ham.evidence.run_eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--run", required=True, help="the run directory (holds checkpoints/)")
    p.add_argument("--heldout", help="held-out IndexedDataset prefix for the final perplexity")
    p.add_argument("--ppl-samples", type=int, default=16, help="held-out sequences (16)")
    p.add_argument("--kv-sweep", default="", help="KV fractions to evaluate the final HAM at (e.g. 0.05,0.1,0.5,1)")
    p.add_argument("--prune", action="store_true", help="delete the checkpoints other than the newest afterwards")
    add_eval_arguments(p)
    return p


#: the evaluation settings the grid runner passes through by name
EVAL_ARGUMENTS = ("eval_seed", "eval_samples", "eval_batch_size", "over_tasks", "over_lengths", "final_lengths")


def add_eval_arguments(p) -> None:
    """The recall settings of the evaluation (shared with the grid runner, which forwards them)."""
    p.add_argument("--eval-seed", type=int, default=7, help="recall seed (7)")
    p.add_argument("--eval-samples", type=int, default=16, help="examples per task and length (16)")
    p.add_argument("--eval-batch-size", type=int, default=4, help="sequences per forward (4)")
    p.add_argument("--over-tasks", default="mqar,niah_multikey",
                   help="tasks over training and of the KV sweep (mqar,niah_multikey)")
    p.add_argument("--over-lengths", default="2k", help="lengths over training and of the KV sweep (2k)")
    p.add_argument("--final-lengths", default="1k,2k,4k,8k", help="lengths of the final model (1k,2k,4k,8k)")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.run):
        print(f"run_eval: error: --run {args.run}: not a directory", file=sys.stderr)
        return 2
    for f in filter(None, args.kv_sweep.split(",")):
        try:
            if not 0.0 <= float(f) <= 1.0:
                raise ValueError
        except ValueError:
            print(f"run_eval: error: --kv-sweep {f!r}: not a fraction in [0, 1]", file=sys.stderr)
            return 2
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    return evaluate_run(args)


if __name__ == "__main__":
    sys.exit(main())
