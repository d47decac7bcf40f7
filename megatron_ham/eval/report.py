"""The ham-eval report: JSON (schema below, written atomically) and the one-screen table.

Schema "megatron-ham-eval/1" (keys always present; a part not run is null). Floats that are not
finite (tau = +-inf) are written as the strings "inf" / "-inf" / "nan" (strict JSON).
{
  "schema": "megatron-ham-eval/1", "created": ISO time, "argv": [...], "elapsed_s": float,
  "device": "cpu" | "cuda:0", "dtype": "float32" | ..., "warnings": [str],
  "model": {"source": "megatron" | "hf", "path", "architecture", "pattern", "vocab_size",
            "seq_length" (trained context), "eod_id", "documents", "router", "kv_fraction"
            (trained target), "dtype" (stored), "run_config_path", "parameters"},
  "routing_setup": {"mode": "checkpoint" | "tau" | "kv_fraction", "tau": float | null,
            "kv_fraction": float | null, "calibration": {"source", "sequences", "tokens"} | null,
            "taus": {layer: tau}},                                  (layer = 0-based index)
  "perplexity": {"data", "kind": "blend" | "prefix", "split": "valid" | "test" | "all",
            "split_spec", "seed", "samples", "seq_length", "tokenizer_vocab", "tokens", "loss",
            "ppl", "position_basis": "document" | "row",
            "by_position": [{"start", "end" (null = open), "label", "tokens", "loss", "ppl"}]},
  "recall": {"seed", "samples", "haystack": "random" | prefix, "markers": {"query", "needle",
            "sep"}, "excluded_ids": [...], "params": {task: {...}},
            "results": [{"task", "length", "samples", "answer_tokens", "accuracy", "exact_match",
            "answer_nll"}]},
  "routing": {"layers": {layer: {"tau", "tokens", "fraction", "by_source": {source: fraction},
            "score_samples", "mean_score", "quantiles": {"0.01": x, ...},
            "histogram": {"edges": [41], "counts": [40]}, "token_id_share": share of the 0/1
            decisions' variance explained by the token id, or null}},
            "trace": {"task", "length", "seed", "tokens": [...], "marks": {"needles": [[a, b]],
            "query": [a, b], "answers": [[a, b]]}, "layers": {layer: {"tau", "scores": [...],
            "routed": [0/1 ...], "fraction"}}, "routed_at_needles": {layer: f},
            "routed_at_answers": {layer: f}} | null},
  "plots": {"accuracy" | "loss_by_position" | "routing_trace": file name next to the JSON}
}
"""
from __future__ import annotations

import json
import math
import os
from typing import List

SCHEMA = "megatron-ham-eval/1"


def jsonable(x):
    """Plain JSON values: non-finite floats -> "inf"/"-inf"/"nan", int keys -> str, tuples -> lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):  # numpy / torch scalars
        return jsonable(x.item())
    return x


def write_json(path: str, obj) -> None:
    """Atomic (training.atomic): a temp file beside `path`, fsync, os.replace."""
    from megatron_ham.training.atomic import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(jsonable(obj), indent=1, allow_nan=False) + "\n")


def _f(x, fmt="{:.3f}") -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return fmt.format(x) if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _len(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def format_table(r: dict) -> str:
    """The report (as jsonable() returns it: string layer keys) as a one-screen text table."""
    m = r["model"]
    lines: List[str] = []
    rs = r.get("routing_setup") or {}
    mode = {"checkpoint": "taus from the checkpoint", "tau": f"tau = {_f(rs.get('tau'), '{:g}')}",
            "kv_fraction": f"tau calibrated to KV fraction {_f(rs.get('kv_fraction'), '{:g}')}"}.get(rs.get("mode"), "")
    lines.append(f"ham-eval: {m['source']} {m['path']}")
    lines.append(f"  {m['architecture']} {m['pattern']!r}, vocab {m['vocab_size']}, trained context "
                 f"{m['seq_length']}, {m.get('parameters', 0) / 1e6:.2f}M params, {r['device']} "
                 f"{r['dtype']}" + (f"; {mode}" if m["pattern"].count("H") else ""))
    p = r.get("perplexity")
    if p:
        lines.append(f"perplexity ({p['split']} split of {os.path.basename(p['data'])}, {p['samples']} x "
                     f"{p['seq_length']} tokens): loss {_f(p['loss'], '{:.4f}')}  ppl {_f(p['ppl'], '{:.2f}')}")
        if p["by_position"]:
            lines.append("  position " + "".join(f"{b['label']:>10}" for b in p["by_position"]))
            lines.append("  loss     " + "".join(f"{_f(b['loss']):>10}" for b in p["by_position"]))
    rec = r.get("recall")
    if rec:
        lengths = sorted({x["length"] for x in rec["results"]})
        tasks = list(dict.fromkeys(x["task"] for x in rec["results"]))
        cell = {(x["task"], x["length"]): x for x in rec["results"]}
        lines.append(f"recall accuracy, answer tokens (exact match), {rec['samples']} examples each, "
                     f"haystack {rec['haystack']}:")
        lines.append(f"  {'task':<17}" + "".join(f"{_len(L):>14}" for L in lengths))
        for t in tasks:
            row = "".join(f"{_f(cell[(t, L)]['accuracy'], '{:.2f}') + ' (' + _f(cell[(t, L)]['exact_match'], '{:.2f}') + ')':>14}"
                          if (t, L) in cell else f"{'-':>14}" for L in lengths)
            lines.append(f"  {t:<17}{row}")
    ro = r.get("routing")
    if ro and ro.get("layers"):
        lines.append("routing per HAM layer: tau, routed fraction, score quantiles 10/50/90 %, share "
                     "decided by the token id" + (", routed at needles / answers (trace)" if ro.get("trace") else ""))
        tr = ro.get("trace") or {}
        for i, lay in ro["layers"].items():
            q = lay.get("quantiles") or {}
            extra = ""
            if tr:
                extra = (f"   {_f(tr['routed_at_needles'].get(i), '{:.2f}')} / "
                         f"{_f(tr['routed_at_answers'].get(i), '{:.2f}')}")
            lines.append(f"  L{i:<3} tau {_f(lay['tau'], '{:.4g}'):>9}  routed {_f(lay['fraction'], '{:.3f}')}"
                         f"  q {_f(q.get('0.1'), '{:.3g}')} / {_f(q.get('0.5'), '{:.3g}')} / "
                         f"{_f(q.get('0.9'), '{:.3g}')}  id {_f(lay.get('token_id_share'), '{:.2f}')}{extra}")
    for w in r.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


__all__ = ["SCHEMA", "jsonable", "write_json", "format_table"]
