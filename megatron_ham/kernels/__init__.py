"""GPU paths of the HAM ops (fla, FlexAttention, Triton), imported lazily.

Nothing here is imported by ``megatron_ham.ops`` at module load: the ops' dispatch functions call
:func:`gdn_available` / :func:`flex_available` / :func:`staircase_available` / :func:`import_error`
(through ``ops._kernels.resolve_kernel_impl``) and import the submodule only for CUDA tensors.

* :mod:`megatron_ham.kernels.gdn` -- ``gdn_with_error``: fla 0.6.0 chunked gated delta rule
  (forward, final state, gradients) plus the per-token routing error read from fla's chunk
  intermediates by our own Triton kernel (detached).
* :mod:`megatron_ham.kernels.staircase` -- ``scratchpad_attention_triton``: our Triton staircase
  kernel (the routed keys in position order, only the tiles under the staircase, fwd + bwd);
  what ``scratchpad_attention(impl="auto")`` runs on CUDA.
* :mod:`megatron_ham.kernels.short_conv` -- ``causal_conv_silu_fla``: fla 0.6.0's Triton causal
  conv + SiLU (fwd + bwd, documents by cu_seqlens); what ``causal_conv_silu(impl="auto")`` runs
  on CUDA.
* :mod:`megatron_ham.kernels.qkv_activation` -- ``qkv_activations_triton``: our Triton SiLU + per-head
  L2 norm of the conv's q, k, v (fwd + bwd, only the pre-activation kept); what
  ``qkv_activations(silu=True, impl="auto")`` runs on CUDA.
* :mod:`megatron_ham.kernels.rms_norm` -- ``rms_norm_with_residual_triton``: our Triton RMSNorm
  of a pre-norm block that also returns its residual branch, so the backward adds the residual's
  gradient and the weight gradient's partial sums in the norm's one pass; what
  ``hidden_norm_with_residual(impl="auto")`` runs on CUDA.
* :mod:`megatron_ham.kernels.chunk_indices` -- ``chunk_indices``: fla's chunk indices of packed
  documents for the two above, from the boundaries' host copy when given (no device sync).
* :mod:`megatron_ham.kernels.scratchpad` -- ``scratchpad_attention_flex``: compaction of the
  routed keys + FlexAttention with a staircase BlockMask (the fallback, ``impl="flex"``).
"""
from __future__ import annotations

import functools

__all__ = ["gdn_available", "flex_available", "staircase_available", "import_error"]


@functools.lru_cache(maxsize=None)
def _try_import(name: str):
    import importlib

    try:
        importlib.import_module(name)
        return None
    except Exception as e:  # ImportError, or a wrong fla version (ImportError too)
        return f"{type(e).__name__}: {e}"


def gdn_available() -> bool:
    """True when CUDA is usable and ``megatron_ham.kernels.gdn`` (fla 0.6.0 + triton) imports."""
    import torch

    return torch.cuda.is_available() and _try_import("megatron_ham.kernels.gdn") is None


def flex_available() -> bool:
    """True when CUDA is usable and FlexAttention imports."""
    import torch

    return torch.cuda.is_available() and _try_import("megatron_ham.kernels.scratchpad") is None


def staircase_available() -> bool:
    """True when CUDA is usable and ``megatron_ham.kernels.staircase`` (triton) imports."""
    import torch

    return torch.cuda.is_available() and _try_import("megatron_ham.kernels.staircase") is None


def import_error(name: str):
    """The error text of importing ``megatron_ham.kernels.<name>`` (None if it imports)."""
    return _try_import(f"megatron_ham.kernels.{name}")
