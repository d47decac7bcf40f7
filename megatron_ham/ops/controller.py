"""KV-fraction controller: one per layer, drives the routing threshold tau to a target fraction.

State (buffers, saved in the state_dict): `tau` (float32, 0-dim) and `num_updates` (int64).

Law: quantile tracking. Every update reads the quantile q of the step's scores at 1 - target
(the score above which a fraction `target` of them lies), pooled over `group` (the data-parallel
group: each rank contributes a strided subsample of at most `max_samples` scores, all-gathered,
so every rank computes the same q from the same numbers), and moves tau toward it:
    space "log"    (non-negative scores: prediction errors, 1 - cos, (0, 1) outputs):
                   log tau += gain * (log q - log tau)      (scores and q floored at `min_tau`)
    space "linear" (real-valued scores, e.g. router logits):
                   tau += gain * (q - tau)
gain in (0, 1]: 1 sets tau to the last step's quantile (a one-step lag), smaller values average
the quantile over ~(2 - gain) / gain steps. The first `warmup` updates (and any update where tau
is not finite while 0 < target < 1, e.g. after overriding the target from 0 or 1) use gain 1.
  target == 1: tau = -inf (everything routed); target == 0: tau = +inf (nothing routed).

Why this law (docs/design.md "KV-fraction control"): tau is always a convex combination of past
quantiles of real scores, so it can neither overshoot past the observed scores nor freeze, whatever
the shape of the score distribution. The integral law it replaces (log tau += gain * spread *
(probit(f) - probit(target)), spread = the local width of the distribution at the target read
off the quantiles at target +- 0.05) overshot by orders of magnitude when the target quantile fell
into a gap between two modes of the scores (spread huge) and froze when it fell on a cluster of
(nearly) equal scores (spread ~ 0): a learned router whose outputs split into a saturated and an
unsaturated group swung 0.18 -> 0.04 -> 0.98 (tests/test_routing_controller.py reproduces both).
Scores with an atom at the quantile (many exactly equal values) cannot be split by any threshold:
tau settles on the atom and routes all of it, a stable fraction above the target.
f_measured = mean(scores >= tau) with the step's tau, averaged over `group` (token-weighted
all_reduce); it is returned and logged, not fed back. Under model.train_routing "batch" training
does not route at tau at all (batch_tau: each micro-batch's own quantile); tau then only tracks
the quantile for inference, and f_measured is what tau would have routed (the lag it measures is
the router's drift in one step).
"""
from __future__ import annotations

import math

import torch
from torch import nn

SPACES = ("log", "linear")


def quantile_threshold(scores: torch.Tensor, target: float) -> torch.Tensor:
    """0-dim tensor: the score above which (>=) a fraction `target` in (0, 1) of `scores` (any
    shape, non-empty) lies: the k-th largest score, k = round(target * n) clamped to [1, n].
    On the scores' device, no host sync."""
    s = scores.detach().reshape(-1)
    n = s.numel()
    n_top = min(max(int(round(target * n)), 1), n)
    return s.kthvalue(n - n_top + 1).values


def _check_target(target) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not (0.0 <= float(target) <= 1.0):
        raise ValueError(f"target must be a KV fraction in [0, 1], got {target!r}")
    return float(target)


class KVFractionController(nn.Module):
    """Per-layer threshold controller.

    Args:
        target: routed (KV) fraction in [0, 1].
        gain: tracking gain in (0, 1] (1 = tau is the last step's quantile).
        warmup: number of first updates that use gain 1 (>= 0).
        min_tau: "log" space: floor of tau and of the scores (> 0).
        tau_init: tau before the first update (0.0 routes every non-negative score).
        space: "log" for non-negative scores, "linear" for real-valued ones (module docstring).
        max_samples: scores per rank pooled for the quantile (a strided subsample above it).
    """

    def __init__(self, target: float, gain: float = 0.3, warmup: int = 1, min_tau: float = 1e-8,
                 tau_init: float = 0.0, space: str = "log", max_samples: int = 16384):
        super().__init__()
        self._target = _check_target(target)
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not 0.0 < gain <= 1.0:
            raise ValueError(f"gain must be in (0, 1], got {gain!r}")
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
        if not isinstance(min_tau, (int, float)) or not min_tau > 0:
            raise ValueError(f"min_tau must be > 0, got {min_tau!r}")
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"max_samples must be an int >= 1, got {max_samples!r}")
        self.gain = float(gain)
        self.warmup = warmup
        self.min_tau = float(min_tau)
        self.space = space
        self.max_samples = max_samples
        self.register_buffer("tau", torch.tensor(float(tau_init), dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int64))
        self._apply_extreme_target()

    # ---- inference overrides -------------------------------------------------------------
    @property
    def target(self) -> float:
        return self._target

    @target.setter
    def target(self, value: float) -> None:
        self._target = _check_target(value)
        self._apply_extreme_target()

    def set_tau(self, tau: float) -> None:
        """Override the threshold (e.g. at inference, to trade cache size for quality)."""
        self.tau.fill_(float(tau))

    def _apply_extreme_target(self) -> None:
        if self._target == 1.0:
            self.tau.fill_(-math.inf)
        elif self._target == 0.0:
            self.tau.fill_(math.inf)

    # ---- measurement -----------------------------------------------------------------------
    def fraction(self, scores: torch.Tensor) -> float:
        """Local fraction mean(scores >= tau) of any-shaped scores."""
        self._check_scores(scores)
        return float((scores.detach() >= self.tau.to(scores.device)).float().mean())

    @staticmethod
    def _check_scores(scores) -> None:
        if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or scores.numel() == 0:
            raise ValueError("scores must be a non-empty floating-point tensor of any shape (e.g. [B,T])")

    def _pooled_quantile(self, s: torch.Tensor, group) -> torch.Tensor:
        """0-dim: the quantile (quantile_threshold) of this rank's strided subsample of the
        scores (<= max_samples), pooled over `group`. No host sync: every rank sends max_samples
        slots (NaN = empty), and the k-th largest is picked on the device."""
        stride = -(-s.numel() // self.max_samples)
        mine = s[::stride]
        if group is None:
            return quantile_threshold(mine, self._target)
        padded = torch.full((self.max_samples,), float("nan"), dtype=mine.dtype, device=s.device)
        padded[: mine.numel()] = mine
        parts = [torch.empty_like(padded) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(parts, padded, group=group)
        pooled = torch.cat(parts)
        empty = torch.isnan(pooled)
        n = (~empty).sum().double()
        n_top = torch.minimum(torch.clamp_min(torch.round(self._target * n), 1.0), n)
        ranked = pooled.masked_fill(empty, -math.inf).sort(descending=True).values
        return ranked.gather(0, (n_top.long() - 1).reshape(1)).reshape(())

    def batch_tau(self, scores: torch.Tensor) -> torch.Tensor:
        """The threshold of model.train_routing "batch": the quantile of THESE scores at
        1 - target (0-dim tensor on their device), so exactly a fraction `target` of them is
        routed; -inf / +inf for targets 1 / 0 (tau). tau itself is not changed."""
        self._check_scores(scores)
        if 0.0 < self._target < 1.0:
            return quantile_threshold(scores.float(), self._target)
        return self.tau

    def update(self, scores: torch.Tensor, *, group=None) -> float:
        """Measure the routed fraction of `scores` at the current tau, move tau toward the
        quantile at 1 - target (module docstring). Collective over `group` (every rank calls it).

        Returns the measured fraction (averaged over `group` when given).
        """
        return float(self.update_on_device(scores, group=group))

    @torch.no_grad()
    def update_on_device(self, scores: torch.Tensor, *, group=None) -> torch.Tensor:
        """`update` without a host sync: returns the measured fraction as a 0-dim float64 tensor
        on the scores' device (read it when convenient; step_kv_controllers reads all layers'
        at once)."""
        self._check_scores(scores)
        s = scores.detach().reshape(-1).float()  # compared in fp32, as route() does
        tau = self.tau.to(device=s.device)
        counts = torch.stack([(s >= tau).sum().double(),
                              torch.full((), float(s.numel()), dtype=torch.float64, device=s.device)])
        if group is not None:
            torch.distributed.all_reduce(counts, group=group)
        f = counts[0] / counts[1]
        if 0.0 < self._target < 1.0:
            q = self._pooled_quantile(s, group).double()
            cur = tau.double()
            finite = torch.isfinite(cur)
            first = (self.num_updates.to(s.device) < self.warmup) | ~finite
            g = torch.where(first, torch.ones_like(cur), torch.full_like(cur, self.gain))
            if self.space == "log":  # floored at min_tau; log of a non-positive q is never picked
                lo = torch.full((), math.log(self.min_tau), dtype=torch.float64, device=s.device)
                lq = torch.where(q > self.min_tau, q.clamp_min(self.min_tau).log(), lo)
                lt = torch.where(finite & (cur > self.min_tau), cur.clamp_min(self.min_tau).log(), lo)
                new = torch.exp(lt + g * (lq - lt)).clamp_min(self.min_tau)
            else:
                new = torch.where(finite, cur + g * (q - cur), q)
            self.tau.copy_(new)
        else:
            self._apply_extreme_target()
        self.num_updates += 1
        return f

    def extra_repr(self) -> str:
        return (f"target={self._target}, gain={self.gain}, warmup={self.warmup}, space={self.space}, "
                f"tau={float(self.tau):.4g}, num_updates={int(self.num_updates)}")
