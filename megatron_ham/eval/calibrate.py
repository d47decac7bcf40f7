"""Set every HAM layer's tau so that a chosen fraction of the evaluated tokens is routed.

    taus = calibrate(model, batches, kv_fraction=0.25)     # {layer: tau}, already set on `model`

The rule of the controller's warm-up and of HFModel.calibrate_kv_fraction, over several
batches and for any model_io.EvalModel (so a Megatron checkpoint and its HF export calibrate to
the same taus): layers in order, each with the earlier layers already at their new tau; for
layer l, tau_l = -inf (everything routed), one pass over `batches` collects its scores, and
tau_l is set halfway between the n-th and (n+1)-th largest score, n = round(F x tokens) (at
least 1), so no score sits on tau. F = 1 gives -inf, F = 0 gives +inf. Cost: one pass over the
batches per HAM layer.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch


def threshold_for_fraction(scores: torch.Tensor, fraction: float) -> float:
    """tau such that round(fraction x n) of the n `scores` (any shape) are >= tau."""
    s = scores.detach().reshape(-1).double()
    n = s.numel()
    if fraction >= 1.0:
        return -math.inf
    if fraction <= 0.0 or n == 0:
        return math.inf
    k = min(max(int(round(fraction * n)), 1), n)
    top = torch.topk(s, min(k + 1, n)).values  # descending
    below = float(top[k]) if k < n else float(top[k - 1]) - 1.0
    return (float(top[k - 1]) + below) / 2.0


def calibrate(model, batches: Sequence[torch.Tensor], kv_fraction: float, progress: bool = True) -> Dict[int, float]:
    """Calibrate `model`'s HAM layers on `batches` (int [b, s] each); returns {layer: tau}."""
    from tqdm import tqdm

    if isinstance(kv_fraction, bool) or not isinstance(kv_fraction, (int, float)) or not 0.0 <= kv_fraction <= 1.0:
        raise ValueError(f"--kv-fraction must be in [0, 1], got {kv_fraction!r}")
    taus: Dict[int, float] = {}
    layers = model.ham_layers
    bar = tqdm(total=len(layers) * len(batches), desc=f"calibrate tau (KV {kv_fraction:g})", unit="fwd",
               disable=not progress, dynamic_ncols=True)
    for layer in layers:
        if kv_fraction in (0.0, 1.0):
            taus[layer] = threshold_for_fraction(torch.zeros(1), kv_fraction)
            model.set_taus({layer: taus[layer]})
            bar.update(len(batches))
            continue
        model.set_taus({layer: -math.inf})
        collected: List[torch.Tensor] = []
        for x in batches:
            collected.append(model.forward(x).routing[layer][0].reshape(-1).cpu())
            bar.update(1)
        taus[layer] = threshold_for_fraction(torch.cat(collected), kv_fraction)
        model.set_taus({layer: taus[layer]})
    bar.close()
    return taus


__all__ = ["calibrate", "threshold_for_fraction"]
