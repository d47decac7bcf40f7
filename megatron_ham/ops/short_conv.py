"""Depthwise causal short convolution + SiLU (the q/k/v pre-mixing of Gated DeltaNet and HAM).

    y[b, t, c] = silu( sum_{j=0}^{W-1} weight[c, W-1-j] * x[b, t-j, c] ),   taps with t-j < 0 or
                 in another document than t contribute 0

Layout `[B,T,C]` (C = this tensor-parallel rank's channels), weight `[C,W]`, tap W-1 is the
current token (nn.Conv1d's depthwise weight `[C,1,W]` with its middle dim squeezed).
Padding (`mask` False: a token that is not there) is no tap: the j-th tap of a token is the j-th
real token before it, so a row's real tokens give what they give without the padding; a padding
position's output is 0.

Two implementations (``impl``): ``"reference"`` (below: W shifted products, documents as ids, the
definition; the mixers compile it with their fusions) and ``"fla"`` (fla 0.6.0's Triton kernels,
megatron_ham.kernels.short_conv; CUDA, no padding, documents as ``cu_seqlens``). ``"auto"`` picks
``"fla"`` where it can run (:func:`conv_impl`), else the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import check_cu_seqlens, check_tensor
from ._kernels import load_kernels, resolve_kernel_impl

IMPLS = ("auto", "reference", "fla")


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor,
                     doc: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                     cu_seqlens: Optional[torch.Tensor] = None, impl: str = "auto",
                     cu_seqlens_cpu: Optional[torch.Tensor] = None, silu: bool = True) -> torch.Tensor:
    """x `[B,T,C]`, weight `[C,W]`, doc int `[B,T]` document ids (None = one document per row),
    mask bool `[B,T]` (None = every token is there; False = padding, skipped), cu_seqlens int
    `[N+1]` (B == 1): the documents as boundaries instead of ids (give one or the other; "fla"
    takes boundaries only), cu_seqlens_cpu: the same boundaries on the host (optional; "fla"
    then derives its chunk indices without waiting for the GPU, as ops.gated_delta_rule).
    Returns SiLU(depthwise causal conv) `[B,T,C]` in x's dtype; with ``silu=False`` the conv
    alone (the pre-activation: the mixers apply the SiLU in their compiled activations,
    ``gdn_activations(silu=True)``, so no backward has to recompute the conv)."""
    check_tensor("x", x, [None, None, None], "[B,T,C]")
    B, T, C = x.shape
    check_tensor("weight", weight, [C, None], "[C,W]")
    if doc is not None:
        check_tensor("doc", doc, [B, T], "[B,T]", floating=False)
    if cu_seqlens is not None:
        if doc is not None:
            raise ValueError("causal_conv_silu: give the documents as doc ids or as cu_seqlens, not both")
        check_cu_seqlens(cu_seqlens, B, T, cu_seqlens_cpu)
    if conv_impl(x, impl, doc, mask) == "fla":
        return load_kernels("short_conv").causal_conv_silu_fla(x, weight, cu_seqlens, cu_seqlens_cpu,
                                                               silu=silu)
    if cu_seqlens is not None:  # boundaries -> the id of every token's document
        doc = torch.searchsorted(cu_seqlens[1:].to(torch.int64), torch.arange(T, device=x.device),
                                 right=True)[None]
    if mask is None:
        return _conv(x, weight, doc, silu)
    check_tensor("mask", mask, [B, T], "[B,T]", floating=False)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape [B,T], got dtype {mask.dtype}")
    # each row's real tokens moved to its front, in order (the padding after them): the conv runs
    # over them as one sequence, and the outputs go back to their positions
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # [B,T]
    idx = order[..., None].expand(B, T, C)
    y = _conv(x.gather(1, idx), weight, doc.gather(1, order) if doc is not None else None, silu)
    y = torch.zeros_like(y).scatter(1, idx, y)
    return y * mask[..., None].to(y.dtype)


def conv_impl(x: torch.Tensor, impl: str = "auto", doc: Optional[torch.Tensor] = None,
              mask: Optional[torch.Tensor] = None) -> str:
    """The implementation `causal_conv_silu` runs: THE single dispatch point. "auto" is "fla"
    for CUDA bf16/fp16 x without padding or document ids when megatron_ham.kernels.short_conv
    imports, else "reference"; "fla" asked for where it cannot run raises ValueError."""
    runnable = (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and doc is None
                and mask is None)
    return resolve_kernel_impl(
        "causal_conv_silu", impl, IMPLS, "fla", runnable, "short_conv",
        f"CUDA bf16/fp16 x without mask or doc ids (documents as cu_seqlens); x is {x.dtype} on "
        f"{x.device}, mask {'given' if mask is not None else 'None'}, doc "
        f"{'given' if doc is not None else 'None'}")


def _conv(x: torch.Tensor, weight: torch.Tensor, doc: Optional[torch.Tensor], silu: bool) -> torch.Tensor:
    B, T, C = x.shape
    W = weight.shape[1]
    y = x * weight[:, W - 1]
    for j in range(1, min(W, T)):
        shifted = F.pad(x[:, : T - j], (0, 0, j, 0))
        if doc is not None:
            same = F.pad(doc[:, j:] == doc[:, : T - j], (j, 0), value=False)
            shifted = shifted * same[..., None].to(x.dtype)
        y = y + shifted * weight[:, W - 1 - j]
    return F.silu(y) if silu else y
