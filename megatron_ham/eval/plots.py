"""PNG plots of a ham-eval report, written next to the JSON (matplotlib, imported lazily, Agg).

    write_plots(report, "out/report.json") -> {"accuracy": "report.accuracy.png", ...}

  <stem>.accuracy.png          recall accuracy vs length, one line per task (log2 x axis)
  <stem>.loss_by_position.png  held-out loss per position bucket
  <stem>.routing_trace.png     one example: per HAM layer the score per position, tau, the routed
                               tokens, and the needle / query / answer spans shaded
Each file is written to a temp name and renamed. Without matplotlib: no plots, a warning.
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict, List


def _num(x):
    if isinstance(x, str):
        return float(x)
    return float("nan") if x is None else float(x)


def _save(fig, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".tmp_{os.path.basename(path)}_", suffix=".png", dir=d)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_plots(report: dict, json_path: str, warnings: List[str]) -> Dict[str, str]:
    """Plots for the parts present in `report` (jsonable form); returns {kind: file name}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.append("matplotlib is not installed: no plots (pip install 'megatron-ham[eval]')")
        return {}
    stem = os.path.splitext(os.path.abspath(json_path))[0]
    out: Dict[str, str] = {}
    for kind, fn in (("accuracy", _accuracy), ("loss_by_position", _loss_by_position),
                     ("routing_trace", _routing_trace)):
        fig = fn(report, plt)
        if fig is None:
            continue
        path = f"{stem}.{kind}.png"
        try:
            _save(fig, path)
        finally:
            plt.close(fig)
        out[kind] = os.path.basename(path)
    return out


def _accuracy(r, plt):
    rec = r.get("recall")
    if not rec or not rec["results"]:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for task in dict.fromkeys(x["task"] for x in rec["results"]):
        rows = sorted((x for x in rec["results"] if x["task"] == task), key=lambda x: x["length"])
        ax.plot([x["length"] for x in rows], [_num(x["accuracy"]) for x in rows], marker="o", label=task)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("answer-token accuracy")
    trained = r["model"].get("seq_length")
    if trained:
        ax.axvline(trained, color="gray", ls=":", lw=1, label="trained context")
    ax.set_title(f"recall: {os.path.basename(r['model']['path'])}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _loss_by_position(r, plt):
    p = r.get("perplexity")
    if not p or not p["by_position"]:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    rows = p["by_position"]
    ax.bar(range(len(rows)), [_num(x["loss"]) for x in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), [x["label"] for x in rows])
    ax.set_xlabel(f"position in {'document' if p['position_basis'] == 'document' else 'sequence'}")
    ax.set_ylabel("loss (nats/token)")
    ax.axhline(_num(p["loss"]), color="k", ls="--", lw=1, label=f"all: {_num(p['loss']):.3f}")
    ax.set_title(f"held-out loss by position ({p['split']} split)")
    ax.legend(fontsize=8)
    return fig


def _routing_trace(r, plt):
    ro = r.get("routing") or {}
    tr = ro.get("trace")
    if not tr or not tr["layers"]:
        return None
    layers = list(tr["layers"].items())
    fig, axes = plt.subplots(len(layers), 1, figsize=(9, 1.9 * len(layers) + 0.6), sharex=True, squeeze=False)
    marks = tr["marks"]
    for ax, (i, lay) in zip(axes[:, 0], layers):
        s = [_num(x) for x in lay["scores"]]
        x = range(len(s))
        ax.plot(x, s, lw=0.6, color="tab:blue")
        routed = [j for j, v in enumerate(lay["routed"]) if v]
        ax.scatter(routed, [s[j] for j in routed], s=3, color="tab:red", label="routed")
        tau = _num(lay["tau"])
        if tau == tau and abs(tau) != float("inf"):
            ax.axhline(tau, color="k", ls="--", lw=0.8, label=f"tau {tau:.3g}")
        for a, b in marks["needles"]:
            ax.axvspan(a, b, color="tab:green", alpha=0.25)
        ax.axvspan(marks["query"][0], marks["query"][1], color="tab:orange", alpha=0.2)
        for a, b in marks["answers"]:
            ax.axvspan(a, b, color="tab:purple", alpha=0.3)
        ax.set_ylabel(f"L{i} score")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("position (green: needles / pairs, orange: query, purple: answers)")
    axes[0, 0].set_title(f"routing trace: {tr['task']} @ {tr['length']} (seed {tr['seed']})")
    return fig


__all__ = ["write_plots"]
