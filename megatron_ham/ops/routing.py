"""Routing: which tokens are stored in the scratchpad.

Decision per token and layer: routed[b, t] = score[b, t] >= tau, with tau from the layer's
KVFractionController.

- Prediction-error routers: per-head scores `[B,T,H]` -> per-token score = min over heads
  (`min_over_heads`; with heads split over tensor-parallel ranks the min is all-reduced (MIN)
  over the TP group so every rank routes the same tokens).
- Learned router: r = sigmoid(z), z = MLP(x) `[B,T]` from the layer input (replicated on TP
  ranks), plus w * log(e) with the "error" feature (e = the min-over-heads prediction error,
  w a learned scalar: the layer input alone carries no context in a model's first layers);
  the routing score is z ("logit") or r ("sigmoid", checkpoints before the setting). It learns
  from the LM loss Mixture-of-Depths style: the values of routed keys are multiplied
  by r_j before the scratchpad (`router_weighted_values`), so every routed key passes the loss
  gradient to its r_j. The hard decision r_j >= tau itself carries no gradient; the controller
  keeps the routed fraction at its target.
- Random router (the ablation): score = a uniform number in (0, 1) from a counter-based hash of
  integer keys (`random_router_scores`: seed, layer, a sample key, the position), independent of
  the content, so the controller's tau ~ 1 - f stores each token i.i.d. with probability f.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_tensor


def min_over_heads(scores: torch.Tensor, group=None) -> torch.Tensor:
    """Per-token score `[B,T]` = min over heads of `scores` `[B,T,H]` (H = this rank's heads).

    With `group` (the tensor-parallel group) the min is all-reduced (MIN) over the group; the
    result is then detached (routing decisions are not differentiable).
    """
    check_tensor("scores", scores, [None, None, None], "[B,T,H]")
    if group is None:
        return scores.amin(-1)
    out = scores.detach().amin(-1).contiguous()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MIN, group=group)
    return out


def route(scores: torch.Tensor, tau: Union[float, torch.Tensor]) -> torch.Tensor:
    """bool `[B,T]` = scores `[B,T]` >= tau (tau a float or a 0-dim tensor)."""
    check_tensor("scores", scores, [None, None], "[B,T]")
    if isinstance(tau, torch.Tensor):
        if tau.dim() != 0:
            raise ValueError(f"tau must be a float or a 0-dim tensor, got shape {list(tau.shape)}")
        tau = tau.to(device=scores.device)
    elif not isinstance(tau, (int, float)) or isinstance(tau, bool):
        raise ValueError(f"tau must be a float or a 0-dim tensor, got {type(tau).__name__}")
    return scores >= tau


def router_weighted_values(v: torch.Tensor, r: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """v' `[B,T,H,V]`: values of routed tokens scaled by the router output r `[B,T]`.

    Pass v' to scratchpad_attention only (the recurrent path keeps v). Unrouted tokens keep v
    (they are invisible to the scratchpad anyway). dL/dr_j = sum_h <dL/dv'_j^h, v_j^h> for
    routed j: the LM-loss gradient reaches the router through every routed key.
    """
    check_tensor("v", v, [None, None, None, None], "[B,T,H,V]")
    B, T = v.shape[:2]
    check_tensor("r", r, [B, T], "[B,T]")
    if not isinstance(routed, torch.Tensor) or routed.dtype != torch.bool:
        raise ValueError(f"routed must be a bool tensor of shape [B,T] = [{B},{T}]")
    check_tensor("routed", routed, [B, T], "[B,T]", floating=False)
    w = torch.where(routed, r, torch.ones_like(r))
    return v * w[:, :, None, None].to(v.dtype)


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow (16-bit halves)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (the "lowbias32" xorshift-multiply finaliser), a bijection on
    [0, 2^32); int64 tensors in, int64 out. Same bits on every device."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_hash(*keys: Union[int, torch.Tensor], device=None) -> torch.Tensor:
    """float32 uniform numbers in (0, 1), a deterministic function of the integer `keys`.

    keys: non-negative ints or int64 tensors of non-negative values (broadcast together; each
        key is absorbed as its low and high 32 bits). The result has the broadcast shape, with 24 random bits:
        ((h >> 8) + 0.5) / 2^24, never 0 or 1. Counter-based: the same keys give the same
        number on CPU and GPU, in any batch layout.
    """
    h = torch.tensor(0x9E3779B9, dtype=torch.int64, device=device)
    for i, k in enumerate(keys):
        if not isinstance(k, torch.Tensor):
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ValueError(f"uniform_hash: key {i} must be a non-negative int or int64 tensor, got {k!r}")
            k = torch.tensor(k, dtype=torch.int64, device=device)
        elif k.dtype != torch.int64:
            raise ValueError(f"uniform_hash: key {i} must be int64, got {k.dtype}")
        h = _mix32(h.to(k.device) ^ (k & _M32))
        h = _mix32(h ^ ((k >> 32) & _M32))
    return ((h >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def random_router_scores(seed: int, layer: int, sample: Union[int, torch.Tensor],
                         positions: torch.Tensor) -> torch.Tensor:
    """Scores `[B,T]` of the random router: uniform in (0, 1), i.i.d. over tokens, independent
    of the content: uniform_hash(seed, layer, sample, position).

    seed: the model's router_seed; layer: 0-based global layer index; sample: an int or int64
    `[B]` (0 at inference; in training a key of the step, data-parallel rank and row, so every
    sample of training gets a fresh draw); positions: int64 `[T]` or `[B,T]` (position in the
    row, counted from the start of the sequence including cached tokens).
    With tau at the 1 - f quantile (the controller), each token is routed with probability f.
    """
    if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.dim() not in (1, 2):
        raise ValueError("positions must be an int tensor of shape [T] or [B,T]")
    pos = positions if positions.dim() == 2 else positions[None, :]
    s = torch.as_tensor(sample, dtype=torch.int64, device=pos.device).reshape(-1, 1)  # [B or 1, 1]
    return uniform_hash(int(seed), int(layer), s, pos.to(torch.int64), device=pos.device)


ERROR_FLOOR = 1e-6  # log(max(e, ERROR_FLOOR)): a zero prediction error is a finite feature


class LearnedRouter(nn.Module):
    """r = sigmoid(z) in (0, 1), one score per token, with
        z = Linear(act(Linear(x)))                        (error_feature False: the paper's router)
        z = Linear(act(Linear(x))) + w * log(max(e, 1e-6))  (error_feature True)
    where e is the state's prediction error of the token (min over heads, detached) and w a
    learned scalar (init 1). `logits` is z (what the "logit" routing score thresholds: unlike r
    it never saturates to equal values, see docs/design.md "Routing").

    Args:
        hidden_size: model hidden size (input last dim).
        router_hidden_size: MLP width, default max(1, hidden_size // 4).
        bias: biases in both Linears.
        activation: "silu" or "gelu".
        error_feature: add the prediction-error term (model.router_input "hidden+error").
    forward / logits: x `[..., hidden_size]` (full hidden, replicated on TP ranks) and, with
    error_feature, err `[...]` (>= 0) -> r / z `[...]`, fp32.
    """

    def __init__(self, hidden_size: int, router_hidden_size: Optional[int] = None, bias: bool = True,
                 activation: str = "silu", error_feature: bool = False):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if router_hidden_size is None:
            router_hidden_size = max(1, hidden_size // 4)
        if not isinstance(router_hidden_size, int) or router_hidden_size <= 0:
            raise ValueError(f"router_hidden_size must be a positive int or None, got {router_hidden_size!r}")
        acts = {"silu": nn.SiLU, "gelu": nn.GELU}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
        self.hidden_size = hidden_size
        self.fc1 = nn.Linear(hidden_size, router_hidden_size, bias=bias)
        self.act = acts[activation]()
        self.fc2 = nn.Linear(router_hidden_size, 1, bias=bias)
        self.error_weight = nn.Parameter(torch.ones(1)) if error_feature else None

    def logits(self, x: torch.Tensor, err: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fp32 z `[...]`: fc1 runs in x's dtype (the model's matmul precision, fp32 accumulation:
        in bf16 training the router's only wide GEMM stays on the tensor cores), the activation
        and fc2 in fp32 (the parameters share the model's dtype, so that the distributed
        optimizer holds one dtype; a bf16 z would put many tokens exactly on tau)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.hidden_size:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [..., hidden_size={self.hidden_size}], got {got}")
        if (err is None) != (self.error_weight is None):
            raise ValueError("err must be given exactly when the router has the error feature "
                             f"(error_feature={self.error_weight is not None})")
        if err is not None:
            check_tensor("err", err, list(x.shape[:-1]), "x.shape[:-1]")

        def f32(t):
            return None if t is None else t.float()

        b1 = None if self.fc1.bias is None else self.fc1.bias.to(x.dtype)
        h = self.act(F.linear(x, self.fc1.weight.to(x.dtype), b1).float())
        z = F.linear(h, f32(self.fc2.weight), f32(self.fc2.bias)).squeeze(-1)
        if err is None:
            return z
        return z + self.error_weight.float() * err.detach().float().clamp_min(ERROR_FLOOR).log()

    def forward(self, x: torch.Tensor, err: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.sigmoid(self.logits(x, err))
