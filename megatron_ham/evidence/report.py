"""grid.json -> the evidence report: raw JSON under docs/results/, PNG plots under docs/, and
docs/results.md (tables generated here, the findings written by hand in a notes file).

    python -m megatron_ham.evidence.report --grid runs/evidence/grid.json \\
        --notes docs/results/notes.md [--extra docs/results/instability.json] [--docs docs]

Plots (docs/results_*.png): accuracy vs length per task; the KV-fraction trade-off (recall and
held-out loss, GDN at f = 0 and the Transformer at f = 1); learned vs error vs random routing
at f = 0.25; held-out recall over training; routed fraction per layer over training; one routing
trace on a needle example; the trained HAM at other inference KV fractions.
Means are over seeds; the error bars span the seeds' min and max. Accuracy is ham-eval's
answer-token accuracy (teacher-forced argmax), on examples no run trained on.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
from typing import Dict, List, Optional

TASKS = ("mqar", "niah_single", "niah_multikey", "niah_multivalue")
ORDER = ("gdn", "gdn_gsa", "ham_random_f25", "ham_error_f25", "ham_learned_f10", "ham_learned_f25",
         "ham_learned_f50", "ham_learnederr_f25", "transformer", "transformer_long", "transformer_lr3e4",
         "transformer_lr1e3", "transformer_lr4e3")
LABEL = {"transformer": "Transformer (f=1)", "gdn": "GDN (f=0)", "gdn_gsa": "GDN-GSA (G*G*)",
         "ham_learned_f10": "HAM learned f=0.1", "ham_learned_f25": "HAM learned f=0.25",
         "ham_learned_f50": "HAM learned f=0.5", "ham_error_f25": "HAM error(l2) f=0.25",
         "ham_random_f25": "HAM random f=0.25", "ham_learnederr_f25": "HAM learned+error f=0.25",
         "transformer_long": "Transformer (f=1), 3x steps",
         **{f"transformer_lr{k}": f"Transformer (f=1), 3x steps, lr {v}" for k, v in
            (("3e4", "3e-4"), ("1e3", "1e-3"), ("4e3", "4e-3"))},
         "ham_learned_f25_gated": "HAM learned f=0.25, silu(z) output gate"}


def _num(x) -> float:
    if isinstance(x, str):
        return float(x)
    return float("nan") if x is None else float(x)


def _stats(xs: List[float]):
    xs = [x for x in xs if x == x]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs), "n": len(xs),
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def _fmt(s, digits=2) -> str:
    if not s:
        return "-"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def configs_of(grid) -> List[str]:
    seen = list(dict.fromkeys(r["config"] for r in grid["runs"]))
    return [c for c in ORDER if c in seen] + [c for c in seen if c not in ORDER]


def final_cell(grid, config: str, task: str, length: int, key: str = "accuracy"):
    xs = []
    for r in grid["runs"]:
        if r["config"] == config and r["final"]:
            xs += [_num(x[key]) for x in r["final"]["recall"] if x["task"] == task and x["length"] == length]
    return _stats(xs)


def lengths_of(grid) -> List[int]:
    return sorted({x["length"] for r in grid["runs"] if r["final"] for x in r["final"]["recall"]})


def mean_recall(run: dict, max_length: Optional[int] = None) -> Optional[float]:
    """A run's final accuracy averaged over tasks and lengths (<= max_length)."""
    if not run["final"]:
        return None
    xs = [_num(x["accuracy"]) for x in run["final"]["recall"] if max_length is None or x["length"] <= max_length]
    xs = [x for x in xs if x == x]
    return statistics.fmean(xs) if xs else None


def _runs(grid, config):
    return [r for r in grid["runs"] if r["config"] == config]


def _trained_context(grid) -> int:
    for ov in grid["settings"].get("override", []):
        if ov.startswith("model.seq_length="):
            return int(ov.split("=")[1])
    return 2048


# ---------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    from megatron_ham.eval.plots import _save as save

    save(fig, path)
    _plt().close(fig)
    return os.path.basename(path)


def plot_accuracy_vs_length(grid, path):
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), sharey=True)
    Ls = lengths_of(grid)
    for ax, task in zip(axes, TASKS):
        for c in configs_of(grid):
            cells = [final_cell(grid, c, task, L) for L in Ls]
            xs = [L for L, s in zip(Ls, cells) if s]
            if not xs:
                continue
            m = [s["mean"] for s in cells if s]
            lo = [s["mean"] - s["min"] for s in cells if s]
            hi = [s["max"] - s["mean"] for s in cells if s]
            ax.errorbar(xs, m, yerr=[lo, hi], marker="o", ms=3, capsize=2, label=LABEL.get(c, c))
        ax.axvline(_trained_context(grid), color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_title(task)
        ax.set_xlabel("length (tokens; dotted: trained)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("answer-token accuracy")
    axes[0].set_ylim(-0.02, 1.02)
    axes[-1].legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def _kv_of(c: str) -> Optional[float]:
    """KV bytes per token of configuration `c` relative to the Transformer's (None: unknown)."""
    if c.startswith("transformer"):
        return 1.0
    return {"gdn": 0.0, "gdn_gsa": 0.5, "ham_learned_f10": 0.1, "ham_learned_f25": 0.25,
            "ham_learned_f50": 0.5, "ham_learnederr_f25": 0.25}.get(c)


# the trade-off plot: one line through these, the others as single points (marker, colour, label)
TRADEOFF_LINE = ("gdn", "ham_learned_f10", "ham_learned_f25", "ham_learned_f50", "transformer")
EXTRA_POINTS = {"gdn_gsa": ("s", "tab:red", "GDN-GSA (KV-matched to 0.5)"),
                "ham_learnederr_f25": ("^", "tab:green", "HAM learned+error"),
                "transformer_long": ("D", "tab:purple", "Transformer, 3x steps"),
                "transformer_lr1e3": ("*", "tab:brown", "Transformer, 3x steps, lr 1e-3")}


def heldout_loss(r):
    """The run's held-out loss on the tokens its training loss counts: ham-train's last validation
    loss (answer tokens only under data.loss_mask "blend"; an answer-only model predicts the
    other tokens worse than uniform, so the all-token perplexity says nothing about recall); the
    final all-token perplexity loss when the run logged no validation."""
    v = (r.get("curves") or {}).get("valid") or []
    if v:
        return v[-1][1]
    return ((r.get("final") or {}).get("perplexity") or {}).get("loss")


def plot_tradeoff(grid, path):
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    L = _trained_context(grid)
    pts = []
    for c in configs_of(grid):
        if c not in TRADEOFF_LINE and c not in EXTRA_POINTS:
            continue
        acc = _stats([_num(mean_recall(r, L)) for r in _runs(grid, c) if r["final"]])
        loss = _stats([_num(heldout_loss(r)) for r in _runs(grid, c) if r["final"]])
        pts.append((c, _kv_of(c), acc, loss))
    for ax, k, name in ((a1, 2, f"recall accuracy (mean over tasks, lengths <= {L})"),
                        (a2, 3, "held-out loss, trained tokens (nats/token)")):
        line = sorted([p for p in pts if p[0] not in EXTRA_POINTS and p[k]], key=lambda p: p[1])
        ax.errorbar([p[1] for p in line], [p[k]["mean"] for p in line],
                    yerr=[[p[k]["mean"] - p[k]["min"] for p in line], [p[k]["max"] - p[k]["mean"] for p in line]],
                    marker="o", capsize=3, label="GDN (0) / HAM learned / Transformer (1)")
        for p in pts:
            if p[0] in EXTRA_POINTS and p[k]:
                marker, color, label = EXTRA_POINTS[p[0]]
                ax.errorbar([p[1]], [p[k]["mean"]], yerr=[[p[k]["mean"] - p[k]["min"]], [p[k]["max"] - p[k]["mean"]]],
                            marker=marker, color=color, capsize=3, ls="none", label=label)
        ax.set_xlabel("KV fraction (KV cache per token / Transformer's)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_routers(grid, path):
    plt = _plt()
    cs = [c for c in ("ham_learned_f25", "ham_learnederr_f25", "ham_error_f25", "ham_random_f25")
          if _runs(grid, c)]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    L = _trained_context(grid)
    w = 0.8 / max(1, len(cs))
    for j, c in enumerate(cs):
        for t_i, task in enumerate(TASKS):
            s = final_cell(grid, c, task, L)
            if not s:
                continue
            x = t_i + (j - (len(cs) - 1) / 2) * w
            ax.bar(x, s["mean"], width=w, color=f"C{j}", label=LABEL[c] if t_i == 0 else None)
            for r in _runs(grid, c):
                v = [_num(x2["accuracy"]) for x2 in (r["final"] or {}).get("recall", [])
                     if x2["task"] == task and x2["length"] == L]
                ax.scatter([x] * len(v), v, color="k", s=8, zorder=3)
    ax.set_xticks(range(len(TASKS)), TASKS)
    ax.set_ylabel(f"accuracy at {L} tokens (dots: seeds)")
    ax.set_ylim(0, 1.02)
    ax.set_title("learned vs prediction-error vs random routing at KV fraction 0.25")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_over_training(grid, path):
    plt = _plt()
    cs = configs_of(grid)
    fig, axes = plt.subplots(2, math.ceil(len(cs) / 2), figsize=(4 * math.ceil(len(cs) / 2), 6.4),
                             sharex=True, sharey=True, squeeze=False)
    for ax, c in zip(axes.flat, cs):
        for r in _runs(grid, c):
            rows = r["recall_over_training"]
            for task, ls in (("mqar", "-"), ("niah_multikey", "--")):
                pts = sorted((x["step"], _num(x["accuracy"])) for x in rows if x["task"] == task)
                if pts:
                    ax.plot(*zip(*pts), ls=ls, marker="o", ms=3, color=f"C{r['seed']}",
                            label=f"{task} seed {r['seed']}")
        ax.set_title(LABEL.get(c, c), fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    axes[0, 0].set_ylabel("held-out accuracy")
    axes[0, 0].legend(fontsize=6)
    return _save(fig, path)


def plot_routing_layers(grid, path, extra: Optional[dict] = None):
    plt = _plt()
    runs = [r for r in grid["runs"] if r["curves"]["kv"] and r["seed"] == min(x["seed"] for x in grid["runs"])]
    panels = [(LABEL.get(r["config"], r["config"]), r["curves"]["kv"], (r.get("model") or {}).get("kv_fraction"))
              for r in runs]
    for name, series in (extra or {}).items():
        if name.startswith("_"):  # metadata
            continue
        panels.append((name, series["kv"], series.get("target")))
    if not panels:
        return None
    n = len(panels)
    cols = min(3, n)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(5 * cols, 2.8 * math.ceil(n / cols)),
                             squeeze=False)
    for ax, (name, kv, target) in zip(axes.flat, panels):
        for layer, pts in sorted(kv.items(), key=lambda x: int(x[0])):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.8, label=f"L{layer}")
        if target is not None:
            ax.axhline(target, color="k", ls="--", lw=0.8)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.supxlabel("step")
    fig.supylabel("routed fraction (training batches)")
    return _save(fig, path)


#: whose routing trace is plotted: the first of each list that has one (learned, then error router)
TRACE_CONFIGS = {"routing_trace": ("ham_learned_f25", "ham_error_f25", "ham_random_f25", "ham_learned_f50",
                                   "ham_learned_f10"),
                 "routing_trace_error": ("ham_error_f25",),
                 "routing_trace_learnederr": ("ham_learnederr_f25",)}


def plot_trace(grid, path, configs=TRACE_CONFIGS["routing_trace"]):
    from megatron_ham.eval.plots import _routing_trace

    for c in configs:
        for r in _runs(grid, c):
            tr = (r["final"] or {}).get("trace")
            if tr:
                fig = _routing_trace({"routing": {"trace": tr}}, _plt())
                fig.axes[0].set_title(f"{LABEL[c]} seed {r['seed']}: routing trace, {tr['task']} @ {tr['length']}")
                return _save(fig, path)
    return None


def plot_kv_sweep(grid, path):
    plt = _plt()
    runs = [r for r in grid["runs"] if r["kv_sweep"]]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for r in runs:
        for task, ls in (("mqar", "-"), ("niah_multikey", "--")):
            pts = []
            for s in r["kv_sweep"]:
                v = [_num(x["accuracy"]) for x in s["recall"] if x["task"] == task]
                if v:
                    pts.append((s["kv_fraction"], statistics.fmean(v)))
            if pts:
                ax.plot(*zip(*pts), ls=ls, marker="o", label=f"{LABEL.get(r['config'], r['config'])} s{r['seed']}: {task}")
    ax.axvline(0.25, color="gray", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("KV fraction at inference (tau calibrated; dotted: trained)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return _save(fig, path)


# ---------------------------------------------------------------------------- tables
def table_final(grid) -> str:
    Ls = lengths_of(grid)
    lines = []
    for task in TASKS:
        lines += [f"**{task}** (answer-token accuracy, mean ± std over seeds)", "",
                  "| configuration | " + " | ".join(f"{L // 1024}k" if L % 1024 == 0 else str(L) for L in Ls) + " |",
                  "|---|" + "---|" * len(Ls)]
        for c in configs_of(grid):
            lines.append(f"| {LABEL.get(c, c)} | " + " | ".join(_fmt(final_cell(grid, c, task, L)) for L in Ls) + " |")
        lines.append("")
    return "\n".join(lines)


def table_summary(grid) -> str:
    L = _trained_context(grid)
    lines = ["| configuration | params | KV bytes/token vs Transformer | steps | seeds done | recall (mean, <= "
             f"{L}) | recall (mean, all lengths) | held-out loss (trained tokens) | train wall s (mean) | s/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in configs_of(grid):
        rs = _runs(grid, c)
        done = [r for r in rs if r["status"] == "done"]
        m = rs[0].get("model") or {}
        f = m.get("kv_fraction") if m.get("kv_fraction") is not None else _kv_of(c)
        lines.append("| " + " | ".join([
            LABEL.get(c, c), f"{(m.get('parameters') or 0) / 1e6:.1f}M", "-" if f is None else f"{f:g}",
            str(rs[0].get("train_steps") or (rs[0].get("train") or {}).get("train_steps") or "-"),
            f"{len(done)}/{len(rs)}",
            _fmt(_stats([_num(mean_recall(r, L)) for r in rs if r["final"]])),
            _fmt(_stats([_num(mean_recall(r)) for r in rs if r["final"]])),
            _fmt(_stats([_num(heldout_loss(r)) for r in rs if r["final"]]), 3),
            _fmt(_stats([_num(r["train"]["wall_s"]) for r in rs]), 0),
            _fmt(_stats([_num(r["train"]["step_time_s"]) for r in rs]), 3)]) + " |")
    return "\n".join(lines)


def _fmt3(x) -> str:
    return "-" if x is None else f"{_num(x):.3f}"


def table_runs(grid) -> str:
    lines = ["| run | status | steps | train wall s | eval wall s | s/step | held-out loss (trained tokens) | "
             "all-token held-out loss | routed fraction per layer (final eval) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in grid["runs"]:
        fin = r["final"] or {}
        rout = fin.get("routing") or {}
        fr = " ".join(f"L{i}:{_num(v.get('fraction')):.2f}" for i, v in sorted(rout.items(), key=lambda x: int(x[0])))
        p = (fin.get("perplexity") or {}).get("loss")
        st = r["train"]["step_time_s"]
        lines.append(f"| {r['name']} | {r['status']} | {r['train']['steps']}/{r['train']['train_steps']} | "
                     f"{_num(r['train']['wall_s']):.0f} | {_num(r['train']['eval_wall_s']):.0f} | "
                     f"{'-' if st is None else f'{st:.3f}'} | {_fmt3(heldout_loss(r))} | {_fmt3(p)} | {fr or '-'} |")
    return "\n".join(lines)


def table_kv_sweep(grid) -> str:
    lines = []
    for r in grid["runs"]:
        if not r["kv_sweep"]:
            continue
        lines += [f"**{LABEL.get(r['config'], r['config'])} seed {r['seed']}** (trained at "
                  f"{(r.get('model') or {}).get('kv_fraction')}), accuracy by inference KV fraction", "",
                  "| task @ length | " + " | ".join(f"{s['kv_fraction']:g}" for s in r["kv_sweep"]) + " |",
                  "|---|" + "---|" * len(r["kv_sweep"])]
        keys = sorted({(x["task"], x["length"]) for s in r["kv_sweep"] for x in s["recall"]})
        for t, L in keys:
            vals = []
            for s in r["kv_sweep"]:
                v = [_num(x["accuracy"]) for x in s["recall"] if x["task"] == t and x["length"] == L]
                vals.append(f"{v[0]:.2f}" if v else "-")
            lines.append(f"| {t} @ {L} | " + " | ".join(vals) + " |")
        lines.append("")
    return "\n".join(lines)


def table_routing(grid) -> str:
    lines = ["| run | layer | routed (eval) | at needles (trace) | at answers (trace) | decided by the token id | tau |",
             "|---|---|---|---|---|---|---|"]
    for r in grid["runs"]:
        fin = r["final"] or {}
        for i, v in sorted((fin.get("routing") or {}).items(), key=lambda x: int(x[0])):
            nd = (fin.get("routed_at_needles") or {}).get(i)
            an = (fin.get("routed_at_answers") or {}).get(i)
            sh = v.get("token_id_share")  # grids before 2026-12-02 16:30 UTC lack it
            lines.append(f"| {r['name']} | {i} | {_num(v.get('fraction')):.3f} | "
                         f"{'-' if nd is None else f'{_num(nd):.2f}'} | {'-' if an is None else f'{_num(an):.2f}'} | "
                         f"{'-' if sh is None else f'{_num(sh):.2f}'} | {_num(v.get('tau')):.4g} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the page
def write_report(grid: dict, docs: str, notes: Optional[str], extra: Optional[dict]) -> str:
    res = os.path.join(docs, "results")
    os.makedirs(res, exist_ok=True)
    plots = {}
    for name, fn in (("accuracy_vs_length", plot_accuracy_vs_length), ("kv_tradeoff", plot_tradeoff),
                     ("routers", plot_routers), ("recall_over_training", plot_over_training),
                     ("kv_sweep", plot_kv_sweep),
                     *((k, lambda g, p, c=c: plot_trace(g, p, c)) for k, c in TRACE_CONFIGS.items())):
        f = fn(grid, os.path.join(docs, f"results_{name}.png"))
        if f:
            plots[name] = f
    f = plot_routing_layers(grid, os.path.join(docs, "results_routing_layers.png"), extra)
    if f:
        plots["routing_layers"] = f
    s = grid["settings"]
    cal = s.get("calibration") or {}
    img = lambda k, alt: f"![{alt}]({plots[k]})\n" if k in plots else ""  # noqa: E731
    parts = [
        "# Evidence: does a HAM trained here recall? (issue 16)", "",
        "Generated by `python -m megatron_ham.evidence.report` from `docs/results/grid.json` (written by "
        "`python -m megatron_ham.evidence`); the findings are in `docs/results/notes.md`.", "",
        open(notes, encoding="utf-8").read().strip() if notes else "", "",
        "## Setup", "",
        f"- Device: {grid['device']}; grid wall time {grid['elapsed_s']:.0f} s "
        + (f"({', '.join(f'{k}: {v} s' for k, v in grid['elapsed_calls_s'].items())})."
           if grid.get("elapsed_calls_s") else f"(budget {s.get('budget_s')} s)."),
        f"- Configurations: {', '.join(configs_of(grid))}; seeds {s.get('seeds')}; "
        f"{cal.get('steps', '(recipe)')} steps each "
        f"({cal.get('concurrency', s.get('concurrency'))} runs at a time; fit: {cal.get('reason', '-')}).",
        f"- Recipes: `recipes/evidence/`"
        + (f" and `{s['extra_recipes']}`" if s.get("extra_recipes") else "")
        + f" (overrides: {', '.join(s.get('override') or []) or 'none'}).",
        f"- Data: `data_prep.recall_mixture` {' '.join(s.get('data_arg') or [])}; "
        f"{((grid.get('data') or {}).get('splits') or {}).get('train', {}).get('documents', '?')} training documents.",
        f"- Evaluation: ham-eval, seed {s.get('eval_seed')}, {s.get('eval_samples')} examples per task and "
        f"length; over training: {s.get('over_tasks')} at {s.get('over_lengths')}; final: {s.get('final_lengths')}.",
        "", "## Summary", "", table_summary(grid), "",
        "## Recall accuracy per task and length (final checkpoints)", "", img("accuracy_vs_length", "accuracy vs length"),
        table_final(grid),
        "## KV fraction trade-off", "", img("kv_tradeoff", "trade-off"),
        "## Routers at KV fraction 0.25", "", img("routers", "routers"),
        "## Held-out recall over training", "", img("recall_over_training", "over training"),
        "## Routed fraction per layer over training", "", img("routing_layers", "routing per layer"),
        "## Routing trace on a needle example", "", img("routing_trace", "routing trace"),
        img("routing_trace_error", "routing trace, error router"),
        img("routing_trace_learnederr", "routing trace, learned router with the error feature"),
        table_routing(grid), "",
        "## The trained HAM at other KV fractions", "", img("kv_sweep", "kv sweep"), table_kv_sweep(grid),
        "## Runs", "", table_runs(grid), "",
    ]
    page = "\n".join(parts) + "\n"
    path = os.path.join(docs, "results.md")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_ham.evidence.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--grid", required=True, help="grid.json of python -m megatron_ham.evidence")
    p.add_argument("--docs", default="docs", help="docs directory (docs)")
    p.add_argument("--notes", help="markdown with the findings, placed at the top of results.md")
    p.add_argument("--extra", help="JSON {name: {kv: {layer: [[step, fraction, tau]]}, target}} of more "
                                   "routed-fraction traces to plot (e.g. the controller reproduction)")
    a = p.parse_args(argv)
    try:
        grid = json.load(open(a.grid, encoding="utf-8"))
        extra = json.load(open(a.extra, encoding="utf-8")) if a.extra else None
    except (OSError, ValueError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    if grid.get("schema") != "megatron-ham-evidence/1":
        print(f"report: error: {a.grid}: not an evidence grid.json (schema {grid.get('schema')!r})", file=sys.stderr)
        return 2
    dst = os.path.join(a.docs, "results", "grid.json")
    if os.path.abspath(a.grid) != os.path.abspath(dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(a.grid, dst)
    print(write_report(grid, a.docs, a.notes, extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
