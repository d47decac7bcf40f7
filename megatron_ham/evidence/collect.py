"""One grid.json from the runs of an evidence grid (a run = one configuration and seed).

A run directory (made by grid.py) holds:
    run.json          the runner's record: config, seed, recipe, status, times, exit code
    train.log         ham-train's stdout/stderr
    metrics.jsonl     the training loop's log (train steps with per-layer KV fraction and tau,
                      validation losses)
    checkpoints/      step_XXXXXXXX dirs (dist_checkpointing)
    eval/             ham-eval reports: step_XXXXXXXX.json (held-out recall over training),
                      final.json (1k-8k, perplexity, routing, trace), kv_<f>.json (other KV
                      fractions of the final model)

Schema "megatron-ham-evidence/1" of grid.json:
{ "schema", "created", "settings": {...the runner's arguments...}, "data": the mixture's manifest
  (splits, seeds), "device", "elapsed_s",
  "runs": [{ "name", "config", "seed", "status": "done" | "stopped" | "failed" | "running" |
             "pending", "recipe", "model": {"architecture", "pattern", "router", "router_score",
             "router_input", "kv_fraction", "parameters"}, "train": {"steps", "train_steps", "wall_s",
             "step_time_s" (median), "tokens_per_s" (median), "rc", "log_tail"},
             "curves": {"loss": [[step, loss]], "valid": [[step, loss]],
                        "kv": {layer: [[step, fraction, tau]]}},
             "recall_over_training": [{"step", "task", "length", "accuracy", "exact_match",
                                       "answer_nll"}],
             "final": {"step", "recall": [rows], "perplexity": {"loss", "ppl", "by_position"},
                       "routing": {layer: {"tau", "fraction", "quantiles", "by_source",
                                           "token_id_share"}},
                       "routed_at_needles", "routed_at_answers", "trace": {...} | null},
             "kv_sweep": [{"kv_fraction", "taus", "recall": [rows]}] }] }
Losses and fractions are floats; layers are 0-based strings (HAM layers only).
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import statistics
from typing import Dict, List, Optional

SCHEMA = "megatron-ham-evidence/1"
STEP_RE = re.compile(r"^step_(\d{8})\.json$")
KV_RE = re.compile(r"^kv_([0-9.]+)\.json$")
RECALL_KEYS = ("task", "length", "accuracy", "exact_match", "answer_nll")


def _load(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_metrics(path: str) -> List[dict]:
    """The JSON lines of a metrics.jsonl (a torn last line is skipped)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return out


def _thin(points: List[list], limit: int = 400) -> List[list]:
    """At most `limit` points, evenly spaced, keeping the last."""
    if len(points) <= limit:
        return points
    step = len(points) / limit
    picked = [points[int(i * step)] for i in range(limit)]
    if picked[-1] is not points[-1]:
        picked[-1] = points[-1]
    return picked


def curves(metrics: List[dict]) -> dict:
    """Training loss, validation loss and per-layer (0-based) KV fraction / tau by step."""
    loss, valid, kv = [], [], {}
    for m in metrics:
        if m.get("kind") == "train":
            loss.append([m["step"], m["loss"]])
            for layer, v in (m.get("kv") or {}).items():
                kv.setdefault(str(int(layer) - 1), []).append([m["step"], v["fraction"], v["tau"]])
        elif m.get("kind") == "valid":
            valid.append([m["step"], m["loss"]])
    return {"loss": _thin(loss), "valid": valid, "kv": {k: _thin(v) for k, v in kv.items()}}


def _speed(metrics: List[dict]) -> dict:
    times = [m["step_time_s"] for m in metrics if m.get("kind") == "train" and "step_time_s" in m]
    toks = [m["tokens_per_s"] for m in metrics if m.get("kind") == "train" and "tokens_per_s" in m]
    steps = [m["step"] for m in metrics if m.get("kind") == "train"]
    return {"steps_logged": max(steps) if steps else 0,
            "step_time_s": statistics.median(times[len(times) // 5:]) if times else None,
            "tokens_per_s": statistics.median(toks[len(toks) // 5:]) if toks else None}


def _rows(report: dict) -> List[dict]:
    rec = (report or {}).get("recall") or {}
    return [{k: r.get(k) for k in RECALL_KEYS} for r in rec.get("results", [])]


def _final(report: dict, keep_trace: bool) -> dict:
    ro = report.get("routing") or {}
    tr = ro.get("trace") or None
    p = report.get("perplexity") or None
    layers = {i: {"tau": lay.get("tau"), "fraction": lay.get("fraction"), "quantiles": lay.get("quantiles"),
                  "by_source": lay.get("by_source"), "token_id_share": lay.get("token_id_share")}
              for i, lay in (ro.get("layers") or {}).items()}
    return {"step": report.get("_step"), "recall": _rows(report),
            "perplexity": ({"loss": p.get("loss"), "ppl": p.get("ppl"), "tokens": p.get("tokens"),
                            "by_position": p.get("by_position")} if p else None),
            "routing": layers,
            "routed_at_needles": (tr or {}).get("routed_at_needles"),
            "routed_at_answers": (tr or {}).get("routed_at_answers"),
            "trace": tr if keep_trace else None,
            "parameters": (report.get("model") or {}).get("parameters")}


def collect_run(run_dir: str, keep_trace: bool = False) -> dict:
    """The record of one run (see the module docstring)."""
    rec = _load(os.path.join(run_dir, "run.json")) or {}
    metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    sp = _speed(metrics)
    out = {"name": os.path.basename(os.path.dirname(run_dir)) + "/" + os.path.basename(run_dir),
           "config": rec.get("config"), "seed": rec.get("seed"), "status": rec.get("status", "pending"),
           "recipe": rec.get("recipe"), "model": rec.get("model"),
           "train": {"steps": sp["steps_logged"], "train_steps": rec.get("train_steps"),
                     "wall_s": rec.get("train_wall_s"), "step_time_s": sp["step_time_s"],
                     "tokens_per_s": sp["tokens_per_s"], "rc": rec.get("rc"),
                     "eval_wall_s": rec.get("eval_wall_s"), "log_tail": rec.get("log_tail")},
           "curves": curves(metrics), "recall_over_training": [], "final": None, "kv_sweep": []}
    ev = os.path.join(run_dir, "eval")
    for path in sorted(glob.glob(os.path.join(ev, "step_*.json"))):
        m = STEP_RE.match(os.path.basename(path))
        rep = _load(path) if m else None
        if rep:
            out["recall_over_training"] += [dict(r, step=int(m.group(1))) for r in _rows(rep)]
    fin = _load(os.path.join(ev, "final.json"))
    if fin:
        fin["_step"] = rec.get("final_step")
        out["final"] = _final(fin, keep_trace)
    for path in glob.glob(os.path.join(ev, "kv_*.json")):
        m = KV_RE.match(os.path.basename(path))
        rep = _load(path) if m else None
        if rep:
            out["kv_sweep"].append({"kv_fraction": float(m.group(1)),
                                    "taus": (rep.get("routing_setup") or {}).get("taus"),
                                    "recall": _rows(rep)})
    out["kv_sweep"].sort(key=lambda x: x["kv_fraction"])
    return out


def collect(out_dir: str, settings: dict, elapsed_s: float, device: str, runs: List[str]) -> dict:
    """grid.json's content for the run dirs `runs` (in grid order). The first seed's run of
    every HAM configuration keeps its routing trace."""
    traced = set()
    records = []
    for d in runs:
        rec = _load(os.path.join(d, "run.json")) or {}
        keep = rec.get("config") not in traced and "H" in ((rec.get("model") or {}).get("pattern") or "")
        r = collect_run(d, keep_trace=keep)
        if keep and r["final"] and r["final"].get("trace"):
            traced.add(rec.get("config"))
        records.append(r)
    data = _load(os.path.join(out_dir, "data", "recall_mixture.json")) or {}
    return {"schema": SCHEMA, "settings": settings, "device": device,
            "elapsed_s": round(elapsed_s, 1), "data": {k: data.get(k) for k in ("settings", "splits")},
            "runs": records}


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


__all__ = ["SCHEMA", "collect", "collect_run", "curves", "read_metrics", "finite"]
