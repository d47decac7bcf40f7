"""KV-fraction controller: one per layer, drives the routing threshold tau to a target fraction.

State (buffers, saved in the state_dict): `tau` (float32, 0-dim) and `num_updates` (int64).

Law (scores are non-negative: prediction errors, 1 - cos, or router outputs in (0, 1)):
  1. warm-up, the first `warmup` updates (and whenever tau is not finite while 0 < target < 1):
     tau = batch quantile of the scores at 1 - target (with `group`: geometric mean of the
     ranks' quantiles), so the loop starts at the right place.
  2. afterwards, integral control on log tau, with the error read in probit units and a
     gain scaled by the local width of the score distribution:
         log tau += gain * spread * (Phi^-1(f_measured) - Phi^-1(f_target))
     Phi^-1 the standard normal quantile, f_measured clamped to [1/(2n), 1 - 1/(2n)] (n tokens),
     spread = d log(score) / d z at the target quantile, read off the batch quantiles at
     fractions target +- d (d = min(0.05, target/2, (1-target)/2); averaged over `group`).
     Were the scores locally log-normal this is a damped Newton step: the loop gain is `gain`
     whatever the target, the units or the shape of the score distribution, and a tau far off
     (f = 0 or 1) still moves by about 2 spreads per update. gain 0.3 keeps the batch noise of
     ~4k tokens well under 1 point of fraction. tau is floored at `min_tau` (scores may be 0).
  target == 1: tau = -inf (everything routed); target == 0: tau = +inf (nothing routed).
f_measured = mean(scores >= tau) with the tau used to route that batch, averaged over `group`
(token-weighted all_reduce) so all data-parallel ranks hold the same tau.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import torch
from torch import nn


_PROBIT = NormalDist()


def _check_target(target) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not (0.0 <= float(target) <= 1.0):
        raise ValueError(f"target must be a KV fraction in [0, 1], got {target!r}")
    return float(target)


class KVFractionController(nn.Module):
    """Per-layer threshold controller.

    Args:
        target: routed (KV) fraction in [0, 1].
        gain: integral gain on log tau (scaled by the score spread, probit error), > 0.
        warmup: number of first updates that set tau from the batch quantile (>= 0).
        min_tau: floor of tau (> 0), scores at or below it count as log(min_tau).
        tau_init: tau before the first update (0.0 routes every non-negative score).
    """

    def __init__(self, target: float, gain: float = 0.3, warmup: int = 1, min_tau: float = 1e-8,
                 tau_init: float = 0.0):
        super().__init__()
        self._target = _check_target(target)
        if not isinstance(gain, (int, float)) or not gain > 0:
            raise ValueError(f"gain must be > 0, got {gain!r}")
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
        if not isinstance(min_tau, (int, float)) or not min_tau > 0:
            raise ValueError(f"min_tau must be > 0, got {min_tau!r}")
        self.gain = float(gain)
        self.warmup = warmup
        self.min_tau = float(min_tau)
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

    @torch.no_grad()
    def update(self, scores: torch.Tensor, *, group=None) -> float:
        """Measure the routed fraction of `scores` at the current tau, move tau toward the target.

        Returns the measured fraction (averaged over `group` when given).
        """
        self._check_scores(scores)
        s = scores.detach().reshape(-1).float()  # compared in fp32, as route() does
        t = self._target
        tau = self.tau.to(device=s.device)
        logs = s.clamp_min(self.min_tau).log()
        pos = s > self.min_tau
        lp = torch.where(pos, logs, torch.zeros_like(logs)).double()  # sums in float64
        levels = self._levels()
        lq = [self._local_log_quantile(s, p, self.min_tau) for p in levels]  # averaged below
        stats = torch.stack([(s >= tau).sum().double(), lp.new_tensor(float(s.numel())),
                             pos.sum().double(), lp.sum(), (lp * lp).sum(), *lq])
        world = 1
        if group is not None:
            torch.distributed.all_reduce(stats, group=group)
            world = torch.distributed.get_world_size(group)
        vals = stats.tolist()
        n_routed, n, n_pos, sum_l, sum_l2 = vals[:5]
        lq = [x / world for x in vals[5:]]  # mean over ranks of the log-quantiles
        f = n_routed / n

        if 0.0 < t < 1.0:
            cur = float(self.tau)
            if int(self.num_updates) < self.warmup or not math.isfinite(cur):
                log_tau = lq[1]  # warm-up: the batch quantile at 1 - target
            else:
                spread = self._spread(levels, lq, n_pos, sum_l, sum_l2)
                fc = min(max(f, 0.5 / n), 1.0 - 0.5 / n)
                log_tau = math.log(max(cur, self.min_tau)) + self.gain * spread * (
                    _PROBIT.inv_cdf(fc) - _PROBIT.inv_cdf(t))
            self.tau.fill_(max(math.exp(log_tau), self.min_tau))
        else:
            self._apply_extreme_target()
        self.num_updates += 1
        return f

    def _levels(self):
        """Fractions (t + d, t, t - d) whose quantiles give tau's start and the local spread."""
        t = self._target
        if not 0.0 < t < 1.0:
            return []
        d = min(0.05, t / 2, (1 - t) / 2)
        return [t + d, t, t - d]

    @staticmethod
    def _local_log_quantile(s: torch.Tensor, frac: float, floor: float) -> torch.Tensor:
        """log (float64) of the score above which a fraction `frac` of this rank's scores lies."""
        n = s.numel()
        n_top = min(max(int(round(frac * n)), 1), n)
        return s.kthvalue(n - n_top + 1).values.double().clamp_min(floor).log()

    def _spread(self, levels, lq, n_pos, sum_l, sum_l2) -> float:
        """Local log-normal width at the target quantile: d log(score) / d z, in log units.

        Read off the batch quantiles at fractions t +- d (one-sided if the lower one sits on the
        zero floor); falls back to the std of the positive log-scores.
        """
        z = [_PROBIT.inv_cdf(1.0 - p) for p in levels]
        floor = math.log(self.min_tau) + 1e-9
        spread = 0.0
        if lq[0] > floor:
            spread = (lq[2] - lq[0]) / (z[2] - z[0])
        elif lq[1] > floor:
            spread = (lq[2] - lq[1]) / (z[2] - z[1])
        if not spread > 0 and n_pos > 1:
            mean = sum_l / n_pos
            spread = math.sqrt(max(sum_l2 / n_pos - mean * mean, 0.0))
        return max(spread, 1e-6)

    def extra_repr(self) -> str:
        return (f"target={self._target}, gain={self.gain}, warmup={self.warmup}, "
                f"tau={float(self.tau):.4g}, num_updates={int(self.num_updates)}")
