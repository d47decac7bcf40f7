"""The Gated DeltaNet inputs from the mixer's projections: normalised q, k, v, decay and beta.

    q, k = L2-normalise per head (fp32 inside, eps 1e-6); v reshaped per head
               (silu=True: SiLU first, qkv being the conv's pre-activation)
    g    = -exp(A_log) * softplus(a + dt_bias)      (log decay <= 0, fp32)
    beta = sigmoid(beta_logit)                      (write strength in (0, 1), fp32)

Layout `[B,T,...]`, H = this tensor-parallel rank's heads. Used by the Megatron mixers
(megatron_ham.layers) and the exported Hugging Face model alike. :func:`gdn_activations` is the
whole step; the mixers run its two halves, :func:`qkv_activations` (on CUDA with ``silu=True``:
our Triton kernels, megatron_ham.kernels.qkv_activation, ``impl="auto"``) and
:func:`decay_and_beta`.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ._checks import check_tensor
from ._kernels import load_kernels, resolve_kernel_impl

IMPLS = ("auto", "reference", "triton")


def gdn_activations(qkv, a, beta_logit, A_log, dt_bias, H: int, K: int, V: int, silu: bool = False):
    """qkv [B,T,H*(2K+V)] (the conv output; with silu=True its pre-activation,
    causal_conv_silu(silu=False), and the SiLU is applied here, in fp32) -> q, k [B,T,H,K]
    (L2-normalised, qkv's dtype), v [B,T,H,V]; a, beta_logit [B,T,H] and A_log, dt_bias [H] ->
    g, beta fp32 [B,T,H]. The reference math throughout."""
    q, k, v = _qkv_reference(qkv, H, K, V, silu)
    return (q, k, v) + decay_and_beta(a, beta_logit, A_log, dt_bias)


def decay_and_beta(a, beta_logit, A_log, dt_bias) -> Tuple[torch.Tensor, torch.Tensor]:
    """a, beta_logit [B,T,H], A_log, dt_bias [H] -> g (log decay), beta, both fp32 [B,T,H]."""
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, torch.sigmoid(beta_logit.float())


def qkv_activations(qkv: torch.Tensor, H: int, K: int, V: int, silu: bool = False,
                    impl: str = "auto", branches: int = 1) -> Tuple[torch.Tensor, ...]:
    """The q, k, v half of :func:`gdn_activations`: qkv [B,T,H*(2K+V)] -> q, k [B,T,H,K], v
    [B,T,H,V] in qkv's dtype. ``branches=2`` returns q, k, v twice, one copy per consumer (HAM's
    state and scratchpad): the same values; the triton backward adds the two copies' gradients
    as it reads them (the reference returns the same tensors, and autograd adds). ``impl``:
    "reference" (below), "triton" (our kernels: CUDA bf16/fp16 with silu=True; contiguous
    outputs, the backward keeps only qkv), "auto" (triton where it runs, see :func:`qkv_impl`)."""
    check_tensor("qkv", qkv, [None, None, H * (2 * K + V)], "[B,T,H*(2K+V)]")
    if branches not in (1, 2):
        raise ValueError(f"qkv_activations: branches must be 1 or 2, got {branches!r}")
    if qkv_impl(qkv, impl, silu) == "triton":
        return load_kernels("qkv_activation").qkv_activations_triton(qkv, H, K, V, branches)
    return _qkv_reference(qkv, H, K, V, silu) * branches


def qkv_impl(qkv: torch.Tensor, impl: str = "auto", silu: bool = True) -> str:
    """The implementation :func:`qkv_activations` runs: THE single dispatch point. "auto" is
    "triton" for CUDA bf16/fp16 qkv with silu=True when megatron_ham.kernels.qkv_activation
    imports, else "reference"; "triton" asked for where it cannot run raises ValueError."""
    runnable = qkv.is_cuda and qkv.dtype in (torch.bfloat16, torch.float16) and silu
    return resolve_kernel_impl(
        "qkv_activations", impl, IMPLS, "triton", runnable, "qkv_activation",
        f"CUDA bf16/fp16 qkv and silu=True; qkv is {qkv.dtype} on {qkv.device}, silu={silu}")


def _qkv_reference(qkv, H: int, K: int, V: int, silu: bool):
    B, T = qkv.shape[:2]
    dtype = qkv.dtype
    if silu:  # in fp32, not rounded before the norms
        qkv = F.silu(qkv.float())
    q, k, v = torch.split(qkv, [H * K, H * K, H * V], -1)
    q = F.normalize(q.reshape(B, T, H, K).float(), dim=-1, eps=1e-6).to(dtype)
    k = F.normalize(k.reshape(B, T, H, K).float(), dim=-1, eps=1e-6).to(dtype)
    return q, k, v.reshape(B, T, H, V).to(dtype)
