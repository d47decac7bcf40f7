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
