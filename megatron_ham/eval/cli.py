"""ham-eval: evaluate a megatron-ham checkpoint or HF export (perplexity, recall, routing).

    ham-eval --checkpoint RUN_OR_STEP_DIR | --hf HF_DIR --out report.json [options]
    python -m megatron_ham.eval ...

Steps: read the model's config (no weights) and check the arguments and the data against it
(bad input: exit 2 before anything is loaded); load the model (model_io); set the routing
threshold (--tau, or --kv-fraction calibrated on the evaluated data); perplexity on held-out
data (heldout, perplexity); the synthetic recall suite (recall, recall_suite); the routing
report and one per-position trace (routing); then the plots, the JSON report (atomic) and the
table on stdout. docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from typing import List, Optional

PROG = "ham-eval"
RECALL = ("mqar", "niah_single", "niah_multikey", "niah_multivalue")
TASK_WORDS = ("all", "ppl", "recall", "routing") + RECALL


def log(msg: str) -> None:
    print(f"[{PROG}] {msg}", file=sys.stderr, flush=True)


# ============================================================================ argument parsing
def parse_length(text: str, what: str) -> int:
    t = str(text).strip().lower()
    mult = 1
    if t.endswith("k"):
        t, mult = t[:-1], 1024
    try:
        v = int(float(t) * mult)
        if v != float(t) * mult:
            raise ValueError
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a length (e.g. 4096 or 4k)") from None
    if v < 0:
        raise ValueError(f"{what}: {text!r} must not be negative")
    return v


def parse_lengths(text: str, what: str, minimum: int = 1) -> List[int]:
    vals = [parse_length(x, what) for x in str(text).split(",") if x.strip()]
    if not vals:
        raise ValueError(f"{what}: no value in {text!r}")
    bad = [v for v in vals if v < minimum]
    if bad:
        raise ValueError(f"{what}: {bad[0]} is below {minimum}")
    return vals


def parse_tasks(text: str) -> List[str]:
    words = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in words if w not in TASK_WORDS]
    if bad or not words:
        raise ValueError(f"--tasks: unknown task {bad[0] if bad else text!r} (valid: {', '.join(TASK_WORDS)})")
    out: List[str] = []
    for w in words:
        add = {"all": ["ppl", *RECALL, "routing"], "recall": list(RECALL)}.get(w, [w])
        out += [x for x in add if x not in out]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Evaluate a megatron-ham model: a training checkpoint (any TP/PP layout, loaded in one "
            "process) or its Hugging Face export, with the same numbers from both.\n"
            "  ppl      perplexity on held-out data (the run's validation/test split of a blend, or "
            "every document\n           of an IndexedDataset prefix), with the loss by position bucket\n"
            "  recall   synthetic recall generated from a seed: mqar (key-value pairs then queries), "
            "niah_single,\n           niah_multikey, niah_multivalue (needles in a haystack of "
            "random tokens or real text);\n           accuracy over the answer tokens per task and length\n"
            "  routing  per HAM layer: routed fraction, score distribution, and a per-position trace "
            "of one example\n"
            "Writes the JSON report (--out), PNG plots next to it, and a table on stdout. "
            "Exit codes: 0 ok, 2 bad input."),
        epilog=(
            "examples:\n"
            "  ham-eval --checkpoint runs/ham-800m/checkpoints --data /data/ldc/blend.json --out eval/ham.json\n"
            "  ham-eval --hf exports/ham-800m --tasks recall --lengths 1k,4k,16k --kv-fraction 0.1 --out eval/kv10.json\n"
            "  ham-eval --hf exports/tiny --data runs/data/sample/licenses --tasks ppl --out /tmp/ppl.json\n"
            "See docs/evaluation.md (also: lm-evaluation-harness on the export)."),
    )
    src = p.add_argument_group("model (one of)")
    g = src.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", metavar="DIR", help="a ham-train checkpoint: the run's checkpoint "
                   "dir (its `latest`) or one step_XXXXXXXX dir")
    g.add_argument("--hf", metavar="HF_DIR", help="a ham-convert-hf export directory")
    p.add_argument("--out", required=True, metavar="REPORT.json",
                   help="the JSON report; plots go next to it as REPORT.<kind>.png")
    p.add_argument("--tasks", default="all",
                   help=f"comma list of {', '.join(TASK_WORDS)} (default all; ppl is skipped "
                        "without data)")
    d = p.add_argument_group("held-out data (ppl)")
    d.add_argument("--data", metavar="BLEND_OR_PREFIX",
                   help="a ham-prep-data blend file or an IndexedDataset prefix (default: the run's "
                        "data.blend when it exists here)")
    d.add_argument("--split", choices=("valid", "test", "all"),
                   help="which documents: the run's validation or test split (as ham-train splits "
                        "the blend), or all (default: valid for a blend, all for a prefix)")
    d.add_argument("--run-config", metavar="YAML",
                   help="run config / recipe whose data.split, train.seed and sizes define the split "
                        "(default: the checkpoint's config.yaml; for an export, the one of the "
                        "checkpoint it came from if it still exists)")
    d.add_argument("--ppl-samples", type=int, metavar="N",
                   help="held-out sequences (default: the run's validation size eval_iters x "
                        "global_batch_size when it validated, else 64)")
    d.add_argument("--ppl-length", metavar="L", help="sequence length (default: the trained context)")
    d.add_argument("--buckets", default="0,1k,2k,4k,8k,16k", metavar="EDGES",
                   help="position-bucket edges (default 0,1k,2k,4k,8k,16k; the last is open)")
    d.add_argument("--cache-dir", metavar="DIR",
                   help="keep GPTDataset's index cache here (default: a temp dir, removed)")
    r = p.add_argument_group("recall suite")
    r.add_argument("--lengths", default="1k,2k,4k,8k,16k", metavar="L,...",
                   help="example lengths (default 1k,2k,4k,8k,16k); above the trained context is "
                        "allowed (a warning: length generalisation)")
    r.add_argument("--samples", type=int, default=16, metavar="N", help="examples per task and length (16)")
    r.add_argument("--seed", type=int, default=0, help="recall seed: example j is generate(..., seed*1000003+j)")
    r.add_argument("--num-pairs", type=int, default=16, help="mqar: key-value pairs (16)")
    r.add_argument("--num-queries", type=int, help="mqar: pairs asked (default all)")
    r.add_argument("--num-needles", type=int, default=4, help="niah_multikey/multivalue: needles (4)")
    r.add_argument("--key-len", type=int, default=2, help="niah: key tokens (2)")
    r.add_argument("--value-len", type=int, default=3, help="niah: value tokens (3)")
    r.add_argument("--haystack", default="random", metavar="random|PREFIX",
                   help="needle haystack: random tokens, or real text from an IndexedDataset prefix")
    r.add_argument("--trace-task", choices=RECALL,
                   help="task of the routing trace example (default niah_single, at the shortest length)")
    k = p.add_argument_group("routing threshold (HAM; default: the checkpoint's tau)")
    kg = k.add_mutually_exclusive_group()
    kg.add_argument("--kv-fraction", type=float, metavar="F",
                    help="calibrate tau per layer so a fraction F of the evaluated tokens is routed")
    kg.add_argument("--tau", type=float, metavar="X", help="tau = X in every HAM layer (--tau=inf: nothing "
                    "routed, --tau=-inf: everything)")
    k.add_argument("--calib-samples", type=int, default=8, metavar="N",
                   help="sequences --kv-fraction calibrates on: the first N held-out sequences, else "
                        "recall examples at the shortest length (8)")
    x = p.add_argument_group("execution")
    x.add_argument("--batch-size", type=int, default=4, help="sequences per forward (4)")
    x.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    x.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="compute dtype (auto: the checkpoint's on GPU, fp32 on CPU)")
    x.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    x.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# ============================================================================ the run
class _Run:
    """State of one ham-eval invocation (arguments, model, data, warnings, report parts)."""

    def __init__(self, args):
        self.args = args
        self.warnings: List[str] = []
        self.model = None
        self.heldout = None
        self.haystack = None

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        log(f"warning: {msg}")


def _check_args(args) -> None:
    from .errors import EvalError
    from .perplexity import check_edges

    for name in ("samples", "batch_size", "calib_samples", "num_pairs", "num_needles", "key_len", "value_len"):
        v = getattr(args, name)
        if v is None or v < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.ppl_samples is not None and args.ppl_samples < 1:
        raise EvalError(f"--ppl-samples must be >= 1, got {args.ppl_samples}")
    if args.num_queries is not None and not 1 <= args.num_queries <= args.num_pairs:
        raise EvalError(f"--num-queries must be in [1, --num-pairs={args.num_pairs}], got {args.num_queries}")
    if args.kv_fraction is not None and not 0.0 <= args.kv_fraction <= 1.0:
        raise EvalError(f"--kv-fraction must be in [0, 1], got {args.kv_fraction}")
    if args.tau is not None and math.isnan(args.tau):
        raise EvalError("--tau must not be NaN")
    if os.path.isdir(args.out):
        raise EvalError(f"--out {args.out}: is a directory (expected a .json file path)")
    try:
        args.tasks_v = parse_tasks(args.tasks)
        args.lengths_v = parse_lengths(args.lengths, "--lengths", minimum=8)
        args.buckets_v = check_edges(parse_lengths(args.buckets, "--buckets", minimum=0))
        args.ppl_length_v = parse_length(args.ppl_length, "--ppl-length") if args.ppl_length else None
    except ValueError as e:
        raise EvalError(str(e)) from e
    if args.ppl_length_v is not None and args.ppl_length_v < 2:
        raise EvalError(f"--ppl-length must be >= 2, got {args.ppl_length}")


def _recall_params(args) -> dict:
    niah = {"key_len": args.key_len, "value_len": args.value_len}
    return {"mqar": {"num_pairs": args.num_pairs, "num_queries": args.num_queries},
            "niah_single": dict(niah),
            "niah_multikey": dict(niah, num_needles=args.num_needles),
            "niah_multivalue": dict(niah, num_needles=args.num_needles)}


def _prepare(run: _Run) -> None:
    """Everything that can be checked before the weights are loaded."""
    from .errors import EvalError
    from .heldout import data_kind
    from .model_io import describe
    from .recall import min_length

    args = run.args
    _check_args(args)
    info = describe(checkpoint=args.checkpoint, hf=args.hf, run_config=args.run_config)
    run.info = info
    for n in info.notes:
        run.warn(n)
    tasks = list(args.tasks_v)
    explicit = [w.strip() for w in args.tasks.split(",")]
    has_ham = bool(info.ham_layers)
    if (args.tau is not None or args.kv_fraction is not None) and not has_ham:
        flag = "--tau" if args.tau is not None else "--kv-fraction"
        raise EvalError(f"{flag}: the model has no HAM layers (pattern {info.pattern!r})")
    if "routing" in tasks and not has_ham:
        tasks.remove("routing")
        if "routing" in explicit:
            run.warn(f"--tasks routing: the model has no HAM layers (pattern {info.pattern!r})")
    # held-out data
    data = args.data
    if data is None and "ppl" in tasks:
        blend = getattr(info.run_config.data, "blend", None) if info.run_config is not None else None
        if blend and os.path.isfile(blend):
            data = blend
            log(f"--data not given: the run's blend {blend}")
        elif "ppl" in explicit:
            raise EvalError("--tasks ppl needs --data BLEND_OR_PREFIX (the run's data.blend "
                            f"{blend!r} is not here)")
        else:
            tasks.remove("ppl")
            run.warn("no held-out data (--data): perplexity skipped")
    if data is not None:
        data_kind(data)
    run.data = data
    if args.ppl_length_v and args.ppl_length_v > info.seq_length:
        run.warn(f"--ppl-length {args.ppl_length_v} exceeds the model's trained context "
                 f"{info.seq_length}: this measures length generalisation")
    # recall
    recall = [t for t in tasks if t in RECALL]
    params = _recall_params(args)
    for t in recall:
        try:
            need = min_length(t, **params[t])
        except ValueError as e:
            raise EvalError(f"--tasks {t}: {e}") from e
        short = [L for L in args.lengths_v if L < need]
        if short:
            raise EvalError(f"--lengths {short[0]}: too short for {t} with {params[t]} (needs >= {need} tokens)")
    long = [L for L in args.lengths_v if L > info.seq_length] if recall else []
    if long:
        run.warn(f"recall lengths {long} exceed the model's trained context {info.seq_length}: "
                 "this measures length generalisation")
    if recall and args.haystack != "random":
        from .recall import TextHaystack

        try:
            run.haystack = TextHaystack(args.haystack)
        except ValueError as e:
            raise EvalError(f"--haystack {e}") from e
    if not recall and "ppl" not in tasks:
        raise EvalError(f"--tasks {args.tasks}: nothing to evaluate (routing is observed on the ppl "
                        "data and the recall examples: add ppl with --data, or a recall task)")
    run.tasks, run.recall, run.params = tasks, recall, params


def _heldout(run: _Run):
    from .heldout import data_kind, heldout
    from .model_io import training_blend

    args, info = run.args, run.info
    rc = info.run_config
    n = args.ppl_samples
    split = args.split or ("valid" if data_kind(run.data) == "blend" else "all")
    if n is None:  # the loop's validation set when the run validated, so the numbers compare
        validated = rc.train.eval_interval > 0 and info.run_config_path is not None
        n = rc.train.eval_iters * rc.train.global_batch_size if split == "valid" and validated else 64
    s = args.ppl_length_v or info.seq_length
    ho = heldout(run.data, rc, split=split, num_samples=n, seq_length=s, model_vocab=info.vocab_size,
                 eod_id=info.eod_id, cache_dir=args.cache_dir, train_blend=training_blend(rc))
    for w in ho.warnings:
        run.warn(w)
    return ho


def _space(info):
    from .recall import TokenSpace

    return TokenSpace(info.vocab_size, exclude=(info.eod_id,) if info.eod_id is not None else ())


def _calibration_batches(run: _Run, plan):
    """([int [b, s] batches], description) of the sequences --kv-fraction calibrates on."""
    import torch

    args = run.args
    n, bs = args.calib_samples, args.batch_size
    if run.heldout is not None:
        n = min(n, run.heldout.num_samples)
        seqs = [torch.as_tensor(run.heldout.dataset[i]["tokens"]).long() for i in range(n)]
        src = f"held-out data ({run.heldout.info['split']} split)"
    else:
        L = min(args.lengths_v)
        seqs = [torch.from_numpy(plan.example(plan.tasks[j % len(plan.tasks)], L, j // len(plan.tasks)).tokens)
                for j in range(n)]
        src = f"recall examples at length {L} ({', '.join(plan.tasks)})"
    batches = [torch.stack(seqs[i:i + bs]) for i in range(0, len(seqs), bs)]
    return batches, {"source": src, "sequences": len(seqs), "tokens": int(sum(x.numel() for x in seqs))}


def _evaluate(run: _Run) -> dict:
    from .calibrate import calibrate
    from .perplexity import perplexity
    from .recall_suite import RecallPlan, run_recall
    from .routing import RoutingRecorder, routed_at, routing_trace

    args, info, model = run.args, run.info, run.model
    progress = not args.no_progress
    space = _space(info)
    plan = None
    if run.recall:
        plan = RecallPlan(run.recall, args.lengths_v, args.samples, args.seed, space,
                          {t: run.params[t] for t in run.recall}, run.haystack)
    setup = {"mode": "checkpoint", "tau": None, "kv_fraction": None, "calibration": None}
    if args.tau is not None:
        setup.update(mode="tau", tau=args.tau)
        model.set_taus({i: args.tau for i in model.ham_layers})
    elif args.kv_fraction is not None:
        if plan is None and run.heldout is None:
            from .errors import EvalError

            raise EvalError("--kv-fraction needs data to calibrate on: --data or a recall task")
        batches, cal = _calibration_batches(run, plan)
        t0 = time.time()
        calibrate(model, batches, args.kv_fraction, progress=progress)
        log(f"calibrated tau on {cal['tokens']} tokens of {cal['source']} in {time.time() - t0:.1f} s")
        setup.update(mode="kv_fraction", kv_fraction=args.kv_fraction, calibration=cal)
    setup["taus"] = model.taus()
    recorder = RoutingRecorder(model.ham_layers) if "routing" in run.tasks else None
    out = {"routing_setup": setup, "perplexity": None, "recall": None, "routing": None}
    if run.heldout is not None:
        res = perplexity(model, run.heldout, batch_size=args.batch_size, edges=args.buckets_v,
                         recorder=recorder, progress=progress)
        out["perplexity"] = dict(run.heldout.describe(), **res)
    if plan is not None:
        try:
            rows = run_recall(model, plan, batch_size=args.batch_size, recorder=recorder, progress=progress)
        except ValueError as e:  # an example that cannot be built from this haystack / vocabulary
            from .errors import EvalError

            raise EvalError(f"recall: {e}") from e
        out["recall"] = {"seed": args.seed, "samples": args.samples,
                         "haystack": "random" if run.haystack is None else run.haystack.prefix,
                         "markers": space.markers, "excluded_ids": list(space.exclude),
                         "params": plan.params, "results": rows}
    if recorder is not None:
        taus = model.taus()
        trace = None
        if plan is not None:
            task = args.trace_task or ("niah_single" if "niah_single" in plan.tasks else plan.tasks[0])
            ex = (plan if task in plan.tasks else RecallPlan([task], plan.lengths, 1, plan.seed, space,
                                                              _recall_params(args), plan.haystack)
                  ).example(task, min(plan.lengths), 0)
            import torch

            fwd = model.forward(torch.from_numpy(ex.tokens)[None])
            trace = routing_trace(ex, fwd.routing, taus)
            trace["routed_at_needles"] = routed_at(trace, "needles")
            trace["routed_at_answers"] = routed_at(trace, "answers")
        out["routing"] = {"layers": recorder.summary(taus), "trace": trace}
    return out


def run_eval(args) -> dict:
    """Run ham-eval for parsed `args`; returns the report (also written to args.out)."""
    from .model_io import load
    from .plots import write_plots
    from .report import SCHEMA, format_table, jsonable, write_json

    t0 = time.time()
    run = _Run(args)
    _prepare(run)
    info = run.info
    try:
        if run.data is not None and "ppl" in run.tasks:
            run.heldout = _heldout(run)
            log(f"held-out data: {run.heldout.num_samples} x {run.heldout.seq_length} tokens of the "
                f"{run.heldout.info['split']} split of {run.data}")
        log(f"loading {info.source} model {info.path}")
        run.model = load(info, args.device, args.dtype)
        log(f"{info.architecture} {info.pattern!r} on {run.model.device} ({str(run.model.dtype).replace('torch.', '')}), "
            f"{run.model.num_parameters() / 1e6:.2f}M parameters")
        parts = _evaluate(run)
        model_d = dict(info.to_dict(), parameters=run.model.num_parameters())
        report = {"schema": SCHEMA, "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "argv": list(args.argv or []), "device": str(run.model.device),
                  "dtype": str(run.model.dtype).replace("torch.", ""), "model": model_d, **parts,
                  "warnings": run.warnings, "plots": {}}
    finally:
        if run.model is not None:
            run.model.close()
        if run.heldout is not None:
            run.heldout.close()
    report["elapsed_s"] = round(time.time() - t0, 2)
    rep = jsonable(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if not args.no_plots:
        rep["plots"] = write_plots(rep, args.out, rep["warnings"])
    write_json(args.out, rep)
    print(format_table(rep), flush=True)
    log(f"wrote {args.out}" + (f" and {len(rep['plots'])} plot(s)" if rep["plots"] else "")
        + f" in {report['elapsed_s']:.1f} s")
    return rep


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_ham.training.config import ConfigError

    from .errors import EvalError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        run_eval(args)
    except (EvalError, ConfigError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
