"""Output combination of the two memories (recurrent state and scratchpad), and the gated norm.

    mixed = sigmoid(gate_rnn)[..., None] * o_rnn + sigmoid(gate_kv)[..., None] * o_kv
    out   = gated_rms_norm(mixed, out_gate, weight) = RMSNorm_V(mixed) * weight * silu(out_gate)

GDN layers apply `gated_rms_norm` to their single memory; HAM layers `gated_combine`. With
out_gate None (model.output_gate "none") the silu factor is left out: out = RMSNorm_V(mixed) * weight.

Independent sigmoid gates per head and token (not a softmax pair: both memories may be used
fully, or neither). The norm is per head over the head dim V in fp32, the gated output norm of
Gated DeltaNet. Layout `[B,T,H,V]`, H = this tensor-parallel rank's heads; `weight` `[V]` is
shared by all heads (replicated on TP ranks).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import check_tensor


def gated_combine(
    o_rnn: torch.Tensor,
    o_kv: torch.Tensor,
    gate_rnn: torch.Tensor,
    gate_kv: torch.Tensor,
    out_gate: Optional[torch.Tensor],
    weight: torch.Tensor,
    *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Combine o_rnn, o_kv `[B,T,H,V]` with gate logits `[B,T,H]`, out_gate `[B,T,H,V]` (or None:
    no output gate), norm weight `[V]`. Returns `[B,T,H,V]` in o_rnn's dtype."""
    check_tensor("o_rnn", o_rnn, [None, None, None, None], "[B,T,H,V]")
    B, T, H, V = o_rnn.shape
    check_tensor("o_kv", o_kv, [B, T, H, V], "[B,T,H,V] (same as o_rnn)")
    check_tensor("gate_rnn", gate_rnn, [B, T, H], "[B,T,H]")
    check_tensor("gate_kv", gate_kv, [B, T, H], "[B,T,H]")
    if out_gate is not None:
        check_tensor("out_gate", out_gate, [B, T, H, V], "[B,T,H,V]")
    check_tensor("weight", weight, [V], "[V]")
    _check_eps(eps)
    ct = torch.promote_types(o_rnn.dtype, torch.float32)  # fp32 (float64 for float64 inputs)
    mixed = (torch.sigmoid(gate_rnn.to(ct))[..., None] * o_rnn.to(ct)
             + torch.sigmoid(gate_kv.to(ct))[..., None] * o_kv.to(ct))
    return _gated_rms_norm(mixed, out_gate, weight, eps).to(o_rnn.dtype)


def gated_rms_norm(x: torch.Tensor, out_gate: Optional[torch.Tensor], weight: torch.Tensor, *,
                   eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the head dim (fp32 inside) * weight * silu(out_gate): x, out_gate
    `[B,T,H,V]` (out_gate None: no gate), weight `[V]`. Returns `[B,T,H,V]` in x's dtype (Gated
    DeltaNet's output norm)."""
    check_tensor("x", x, [None, None, None, None], "[B,T,H,V]")
    if out_gate is not None:
        check_tensor("out_gate", out_gate, list(x.shape), "[B,T,H,V] (same as x)")
    check_tensor("weight", weight, [x.shape[-1]], "[V]")
    _check_eps(eps)
    return _gated_rms_norm(x.to(torch.promote_types(x.dtype, torch.float32)), out_gate, weight,
                           eps).to(x.dtype)


def _gated_rms_norm(x, out_gate, weight, eps):
    """The math of gated_rms_norm on x already in the compute dtype (no checks)."""
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)
    return normed if out_gate is None else normed * F.silu(out_gate.to(x.dtype))


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
