"""Routing: which tokens are stored in the scratchpad.

Decision per token and layer: routed[b, t] = score[b, t] >= tau, with tau from the layer's
KVFractionController.

- Prediction-error routers: per-head scores `[B,T,H]` -> per-token score = min over heads
  (`min_over_heads`; with heads split over tensor-parallel ranks the min is all-reduced (MIN)
  over the TP group so every rank routes the same tokens).
- Learned router: r = sigmoid(MLP(x)) `[B,T]` from the layer input (replicated on TP ranks).
  It learns from the LM loss Mixture-of-Depths style: the values of routed keys are multiplied
  by r_j before the scratchpad (`router_weighted_values`), so every routed key passes the loss
  gradient to its r_j. The hard decision r_j >= tau itself carries no gradient; the controller
  keeps the routed fraction at its target.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
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


class LearnedRouter(nn.Module):
    """r = sigmoid(Linear(act(Linear(x)))) in (0, 1), one score per token.

    Args:
        hidden_size: model hidden size (input last dim).
        router_hidden_size: MLP width, default max(1, hidden_size // 4).
        bias: biases in both Linears.
        activation: "silu" or "gelu".
    forward: x `[..., hidden_size]` (full hidden, replicated on TP ranks) -> r `[...]`.
    """

    def __init__(self, hidden_size: int, router_hidden_size: Optional[int] = None, bias: bool = True,
                 activation: str = "silu"):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.hidden_size:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [..., hidden_size={self.hidden_size}], got {got}")
        return torch.sigmoid(self.fc2(self.act(self.fc1(x)))).squeeze(-1)
