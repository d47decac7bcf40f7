"""The Gated DeltaNet inputs from the mixer's projections: normalised q, k, v, decay and beta.

    q, k = L2-normalise per head (fp32 inside, eps 1e-6); v reshaped per head
    g    = -exp(A_log) * softplus(a + dt_bias)      (log decay <= 0, fp32)
    beta = sigmoid(beta_logit)                      (write strength in (0, 1), fp32)

Layout `[B,T,...]`, H = this tensor-parallel rank's heads. Used by the Megatron mixers
(megatron_ham.layers) and the exported Hugging Face model alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gdn_activations(qkv, a, beta_logit, A_log, dt_bias, H: int, K: int, V: int):
    """qkv [B,T,H*(2K+V)] (the conv output) -> q, k [B,T,H,K] (L2-normalised, qkv's dtype),
    v [B,T,H,V]; a, beta_logit [B,T,H] and A_log, dt_bias [H] -> g, beta fp32 [B,T,H]."""
    B, T = qkv.shape[:2]
    q, k, v = torch.split(qkv, [H * K, H * K, H * V], -1)
    q = F.normalize(q.reshape(B, T, H, K).float(), dim=-1, eps=1e-6).to(qkv.dtype)
    k = F.normalize(k.reshape(B, T, H, K).float(), dim=-1, eps=1e-6).to(qkv.dtype)
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return q, k, v.reshape(B, T, H, V), g, torch.sigmoid(beta_logit.float())
