"""Routing report of the HAM layers: what the scratchpad stored on the evaluated data.

    rec = RoutingRecorder(layers=[0, 1])
    rec.add("ppl", forward.routing, tokens)  # after every forward, {layer: (scores [b, s], routed [b, s])}
    rec.summary(taus) -> {layer: {"tau", "fraction", "tokens", "by_source", "mean_score",
                                   "quantiles", "histogram", "token_id_share"}}
    routing_trace(example, forward.routing, taus) -> per-position scores / decisions of one example

Per layer: the routed fraction over every evaluated token (and per source: "ppl", each recall
task, "calibration" is never recorded), and the score distribution from a uniform random sample
of at most `max_samples` scores per layer (reservoir by random priorities: memory stays bounded
whatever the amount of data): quantiles and a 40-bin histogram between the sample's min and max.
With the input tokens, also how much of the routing is a function of the token id alone:
token_id_share = 1 - sum_id n_id p_id (1 - p_id) / (N p (1 - p)), the share of the variance of
the 0/1 decisions explained by the id (p_id = routed fraction of id, p = overall): 1 = every id
is always or never stored (a context-blind router), ~0 = the id says nothing (random routing, or
a router that reads context). Counts per id: memory bounded by the vocabulary.
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
        self._by_id: Dict[int, torch.Tensor] = {i: torch.zeros(2, 0, dtype=torch.int64) for i in self.layers}

    def add(self, source: str, routing: Dict[int, Tuple[torch.Tensor, torch.Tensor]],
            tokens: Optional[torch.Tensor] = None) -> None:
        """tokens: the forward's input ids [b, s] (optional): per-id routing counts."""
        for i, (scores, routed) in routing.items():
            if i not in self._routed:
                continue
            acc = self._routed[i].setdefault(source, [0, 0])
            acc[0] += int(routed.sum())
            acc[1] += int(routed.numel())
            if tokens is not None:
                self._count_ids(i, tokens.reshape(-1).long().cpu(), routed.reshape(-1).cpu())
            vals = scores.detach().reshape(-1).float().cpu()
            prio = torch.rand(vals.numel(), generator=self._gen)
            p, v = torch.cat([self._prio[i], prio]), torch.cat([self._vals[i], vals])
            if p.numel() > self.max_samples:
                keep = p.topk(self.max_samples).indices
                p, v = p[keep], v[keep]
            self._prio[i], self._vals[i] = p, v

    def _count_ids(self, layer: int, ids: torch.Tensor, routed: torch.Tensor) -> None:
        n = max(self._by_id[layer].shape[1], int(ids.max()) + 1 if ids.numel() else 0)
        counts = torch.stack([torch.bincount(ids[routed], minlength=n), torch.bincount(ids, minlength=n)])
        old = self._by_id[layer]
        self._by_id[layer] = counts + torch.nn.functional.pad(old, (0, n - old.shape[1]))

    def token_id_share(self, layer: int) -> Optional[float]:
        """Share of the routing decisions' variance explained by the token id (module docstring);
        None without token counts or when every token was routed alike."""
        routed, n = self._by_id[layer].double()
        N = float(n.sum())
        if N == 0:
            return None
        p = float(routed.sum()) / N
        if p <= 0.0 or p >= 1.0:
            return None
        p_id = routed[n > 0] / n[n > 0]
        within = float((n[n > 0] * p_id * (1 - p_id)).sum())
        return 1.0 - within / (N * p * (1 - p))

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
                   "score_samples": int(v.numel()), "mean_score": None, "quantiles": {}, "histogram": None,
                   "token_id_share": self.token_id_share(i)}
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
