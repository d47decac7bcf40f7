"""Routing report of the HAM layers: what the scratchpad stored on the evaluated data.

    rec = RoutingRecorder(layers=[0, 1])
    rec.add("ppl", forward.routing)          # after every forward, {layer: (scores [b, s], routed [b, s])}
    rec.summary(taus) -> {layer: {"tau", "fraction", "tokens", "by_source", "mean_score",
                                   "quantiles", "histogram"}}
    routing_trace(example, forward.routing, taus) -> per-position scores / decisions of one example

Per layer: the routed fraction over every evaluated token (and per source: "ppl", each recall
task, "calibration" is never recorded), and the score distribution from a uniform random sample
of at most `max_samples` scores per layer (reservoir by random priorities: memory stays bounded
whatever the amount of data): quantiles and a 40-bin histogram between the sample's min and max.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
BINS = 40


class RoutingRecorder:
    def __init__(self, layers: Sequence[int], max_samples: int = 1 << 18, seed: int = 0):
        self.layers = list(layers)
        self.max_samples = int(max_samples)
        self._gen = torch.Generator().manual_seed(seed)
        self._routed: Dict[int, Dict[str, List[int]]] = {i: {} for i in self.layers}  # source -> [routed, tokens]
        self._prio: Dict[int, torch.Tensor] = {i: torch.zeros(0) for i in self.layers}
        self._vals: Dict[int, torch.Tensor] = {i: torch.zeros(0) for i in self.layers}

    def add(self, source: str, routing: Dict[int, Tuple[torch.Tensor, torch.Tensor]]) -> None:
        for i, (scores, routed) in routing.items():
            if i not in self._routed:
                continue
            acc = self._routed[i].setdefault(source, [0, 0])
            acc[0] += int(routed.sum())
            acc[1] += int(routed.numel())
            vals = scores.detach().reshape(-1).float().cpu()
            prio = torch.rand(vals.numel(), generator=self._gen)
            p, v = torch.cat([self._prio[i], prio]), torch.cat([self._vals[i], vals])
            if p.numel() > self.max_samples:
                keep = p.topk(self.max_samples).indices
                p, v = p[keep], v[keep]
            self._prio[i], self._vals[i] = p, v

    def summary(self, taus: Dict[int, float]) -> Dict[int, dict]:
        out = {}
        for i in self.layers:
            per = self._routed[i]
            routed = sum(r for r, _ in per.values())
            tokens = sum(t for _, t in per.values())
            v = self._vals[i].double()
            finite = v[torch.isfinite(v)]
            row = {"tau": float(taus.get(i, float("nan"))), "tokens": tokens,
                   "fraction": routed / tokens if tokens else None,
                   "by_source": {s: (r / t if t else None) for s, (r, t) in per.items()},
                   "score_samples": int(v.numel()), "mean_score": None, "quantiles": {}, "histogram": None}
            if finite.numel():
                qs = torch.quantile(finite, torch.tensor(QUANTILES, dtype=torch.float64))
                row["mean_score"] = float(finite.mean())
                row["quantiles"] = {f"{q:g}": float(x) for q, x in zip(QUANTILES, qs)}
                lo, hi = float(finite.min()), float(finite.max())
                if hi <= lo:
                    hi = lo + 1e-6
                counts = torch.histc(finite, bins=BINS, min=lo, max=hi)
                step = (hi - lo) / BINS
                row["histogram"] = {"edges": [lo + k * step for k in range(BINS + 1)],
                                    "counts": [int(c) for c in counts]}
            out[i] = row
        return out


def routing_trace(example, routing: Dict[int, Tuple[torch.Tensor, torch.Tensor]],
                  taus: Dict[int, float], digits: int = 5) -> dict:
    """Per-position trace of one recall example (row 0 of `routing`): tokens, the spans of its
    needles / query / answers, and per HAM layer the scores, routing decisions (0/1) and tau."""
    tokens, mask, info = example
    answers = [int(j) for j in mask.nonzero()[0]]
    spans = []
    for a, b in zip(answers, answers[1:] + [None]):
        if spans and spans[-1][1] == a:
            spans[-1][1] = a + 1
        else:
            spans.append([a, a + 1])
    layers = {}
    for i, (scores, routed) in routing.items():
        s = scores[0].float().cpu()
        layers[i] = {"tau": float(taus.get(i, float("nan"))),
                     "scores": [round(float(x), digits) if torch.isfinite(x) else float(x) for x in s],
                     "routed": [int(x) for x in routed[0].cpu()],
                     "fraction": float(routed[0].float().mean())}
    return {"task": info["task"], "length": info["length"], "seed": info["seed"],
            "tokens": [int(t) for t in tokens],
            "marks": {"needles": info["needles"], "query": info["query"], "answers": spans},
            "layers": layers}


def routed_at(trace: dict, span_key: str) -> Dict[int, Optional[float]]:
    """Fraction of the tokens inside the trace's `span_key` spans ("needles" / "answers") that
    each layer routed (the query span is one span: pass "query")."""
    spans = trace["marks"][span_key]
    if span_key == "query":
        spans = [spans]
    pos = [p for a, b in spans for p in range(a, b)]
    out = {}
    for i, lay in trace["layers"].items():
        out[i] = (sum(lay["routed"][p] for p in pos) / len(pos)) if pos else None
    return out


__all__ = ["RoutingRecorder", "routing_trace", "routed_at", "QUANTILES"]
