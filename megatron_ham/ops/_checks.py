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


def check_cu_seqlens(cu_seqlens, B: int, T: int, cu_seqlens_cpu=None) -> None:
    """Raise ValueError unless `cu_seqlens` is an integer ``[N+1]`` tensor of document boundaries
    over one packed row (B == 1): ``0 = c_0 <= c_1 <= ... <= c_N = T``. The value checks need
    the host: they run on `cu_seqlens_cpu` (the same boundaries on the host, optional) or on a
    CPU `cu_seqlens`; a CUDA `cu_seqlens` alone gets the shape checks only (reading its values
    would stop the host once per layer; the layers build the boundaries by construction).
    That the two copies hold the same values is the caller's promise (checking it would wait)."""
    _check_boundaries("cu_seqlens", cu_seqlens)
    if cu_seqlens_cpu is not None:
        _check_boundaries("cu_seqlens_cpu", cu_seqlens_cpu)
        if cu_seqlens_cpu.device.type != "cpu":
            raise ValueError(f"cu_seqlens_cpu must be on the host, got {cu_seqlens_cpu.device}")
        if cu_seqlens_cpu.numel() != cu_seqlens.numel():
            raise ValueError(f"cu_seqlens_cpu has {cu_seqlens_cpu.numel()} entries, cu_seqlens "
                             f"{cu_seqlens.numel()}: they must be the same boundaries")
    if B != 1:
        raise ValueError(f"cu_seqlens needs packed inputs with batch size B = 1, got B = {B}")
    host = cu_seqlens_cpu if cu_seqlens_cpu is not None else (None if cu_seqlens.is_cuda else cu_seqlens)
    if host is None:
        return
    if int(host[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(host[0])}")
    if int(host[-1]) != T:
        raise ValueError(f"cu_seqlens must end at T = {T}, got {int(host[-1])}")
    if bool((host[1:] < host[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {host.tolist()[:16]}...")


def _check_boundaries(name: str, cu) -> None:
    if not isinstance(cu, torch.Tensor):
        raise ValueError(f"{name} must be an integer torch.Tensor of shape [N+1], got {type(cu).__name__}")
    if cu.is_floating_point() or cu.is_complex() or cu.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must have shape [N+1] with N >= 1, got {list(cu.shape)}")
