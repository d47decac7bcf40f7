"""Argument validation shared by the ops: errors name the argument and the expected shape."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def check_tensor(
    name: str,
    x: torch.Tensor,
    shape: Sequence[Optional[int]],
    layout: str,
    *,
    floating: bool = True,
) -> None:
    """Raise ValueError unless `x` has len(shape) dims matching `shape` (None = any size).

    `layout` is the human-readable layout printed in the message, e.g. "[B,T,H,K]".
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != len(shape) or any(e is not None and e != s for e, s in zip(shape, x.shape)):
        want = "[" + ",".join("*" if e is None else str(e) for e in shape) + "]"
        raise ValueError(f"{name} must have shape {layout} = {want}, got {list(x.shape)}")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_cu_seqlens(cu_seqlens, B: int, T: int) -> None:
    """Raise ValueError unless `cu_seqlens` is an integer ``[N+1]`` tensor of document boundaries
    over one packed row (B == 1): ``0 = c_0 <= c_1 <= ... <= c_N = T``. The value checks need
    the host, so they run on CPU tensors only (on CUDA they would stop the host once per layer;
    the layers build the boundaries by construction)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(
            f"cu_seqlens must be an integer torch.Tensor of shape [N+1], got {type(cu_seqlens).__name__}"
        )
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must have an integer dtype, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape [N+1] with N >= 1, got {list(cu_seqlens.shape)}")
    if B != 1:
        raise ValueError(f"cu_seqlens needs packed inputs with batch size B = 1, got B = {B}")
    if not cu_seqlens.is_cuda:
        cs = cu_seqlens.tolist()
        if cs[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {cs[0]}")
        if cs[-1] != T:
            raise ValueError(f"cu_seqlens must end at T = {T}, got {cs[-1]}")
        if any(b < a for a, b in zip(cs[:-1], cs[1:])):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {cs}")
