"""GPU RMSNorm of a pre-norm block that also hands out the block's residual: our Triton kernels.

The op and its reference are ``megatron_ham.ops.norm.hidden_norm_with_residual`` (impl "triton"
runs this). For every row x of ``[N, h]``, with w the norm's weight (fp32 inside)::

    rstd = 1 / sqrt(mean(x^2) + eps),   xhat = x * rstd,   y = xhat * w,   residual = x

A pre-norm layer uses x twice: through the norm and on the residual branch. Autograd would
compute the norm's dx, then add the residual branch's gradient in a separate pass, and torch's
norm backward reads x and dy a second time for the weight gradient. Here the residual comes out
of the same autograd node, so the backward is one pass over rows::

    g = dy * w,   dx = rstd * (g - xhat * mean(g * xhat)) + dresidual,   dw += sum_rows(dy * xhat)

Forward: one program per tile of BT rows (rstd [N] fp32 saved). Backward: a fixed number of
programs (8 per SM), each walking every P-th tile of rows and keeping its share of dw in fp32
registers, stored once as one row of a [P, h] fp32 buffer that a torch sum reduces (liger-kernel's
scheme for norm weight gradients, with more programs in flight). Memory-bound both ways: the
backward reads x, dy and dresidual once and writes dx once. Tiles (BT rows, warps) are
autotuned per h on the GPU from a few candidates; the interpreter runs a fixed one.
Measured on an H200 at 16k x 1536 (docs/benchmarks.md 2026-12-03): 0.080 ms of kernels per
fwd+bwd (with the dw sum) against ~0.174 for torch's norm kernels and the add left to autograd;
each call also costs more host time than torch's (cProfile: 0.46 against 0.12 ms per fwd+bwd: the
autotuner's dispatch, two launches, the weight gradient's sum and cast), hidden where the host
runs ahead of the GPU, as in the recipes.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

__all__ = ["rms_norm_with_residual_triton"]

#: backward programs per SM
PROGRAMS_PER_SM = 8
#: (rows per tile, warps) tried by the autotuner; the interpreter runs INTERPRETER_TILE
TILES = [(1, 4), (1, 8), (2, 4), (2, 8), (4, 8)]
INTERPRETER_TILE = (2, 4)


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, N, H, eps, BH: tl.constexpr, BT: tl.constexpr):
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    cols = tl.arange(0, BH)
    m = (rows < N)[:, None] & (cols < H)[None, :]
    x = tl.load(X + rows[:, None] * H + cols[None, :], mask=m, other=0.0).to(tl.float32)  # [BT, BH]
    w = tl.load(W + cols, mask=cols < H, other=0.0).to(tl.float32)                        # [BH]
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / H + eps)                                      # [BT]
    tl.store(Y + rows[:, None] * H + cols[None, :], (x * rstd[:, None] * w[None, :]).to(Y.dtype.element_ty),
             mask=m)
    tl.store(RSTD + rows, rstd, mask=rows < N)


@triton.jit
def _rms_norm_bwd_kernel(X, W, RSTD, DY, DRES, DX, DW_PART, N, H,
                         HAS_DRES: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    cols = tl.arange(0, BH)
    cmask = cols < H
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BH], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(N, BT), P):
        rows = (tile * BT + tl.arange(0, BT)).to(tl.int64)
        m = (rows < N)[:, None] & cmask[None, :]
        offs = rows[:, None] * H + cols[None, :]
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)                          # [BT, BH]
        dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < N, other=0.0)                            # [BT]
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, 1) / H
        dx = rstd[:, None] * (g - xhat * c[:, None])
        if HAS_DRES:
            dx += tl.load(DRES + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=m)
        dw += tl.sum(dy * xhat, 0)
    tl.store(DW_PART + pid * H + cols, dw, mask=cmask)


def _configs():
    return [triton.Config({"BT": bt}, num_warps=w) for bt, w in TILES]


_fwd_tuned = triton.autotune(configs=_configs(), key=["H"])(_rms_norm_fwd_kernel)
_bwd_tuned = triton.autotune(configs=_configs(), key=["H"])(_rms_norm_bwd_kernel)


def _launch(kernel, tuned, x, grid_rows, *args, **meta):
    """kernel over the rows of x: autotuned tiles on a GPU (grid_rows(BT) programs), the
    interpreter's fixed tile elsewhere."""
    BH = max(16, triton.next_power_of_2(x.shape[-1]))
    if x.is_cuda:
        tuned[lambda m: (grid_rows(m["BT"]),)](*args, BH=BH, **meta)
    else:
        bt, warps = INTERPRETER_TILE
        kernel[(grid_rows(bt),)](*args, BH=BH, BT=bt, num_warps=warps, **meta)


def _programs(x: torch.Tensor, N: int) -> int:
    """Backward programs: PROGRAMS_PER_SM per SM on a GPU (3 for the interpreter), at most N."""
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 0
    return max(1, min(PROGRAMS_PER_SM * sms if x.is_cuda else 3, N))


class _RMSNormWithResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps):
        H = x.shape[-1]
        x2 = x.reshape(-1, H)
        N = x2.shape[0]
        y = torch.empty_like(x2)
        rstd = torch.empty(N, device=x.device, dtype=torch.float32)
        if N:
            _launch(_rms_norm_fwd_kernel, _fwd_tuned, x2, lambda bt: triton.cdiv(N, bt), x2, w, y, rstd,
                    N, H, eps)
        ctx.save_for_backward(x2, w, rstd)
        ctx.shape = x.shape
        # the residual: x itself, as a view this node owns, so its gradient comes back here
        return y.view(x.shape), x.view_as(x)

    @staticmethod
    def backward(ctx, dy, dres):
        x2, w, rstd = ctx.saved_tensors
        N, H = x2.shape
        if dy is None:
            dy = torch.zeros_like(x2)
        dy = dy.reshape(N, H).contiguous()
        if dres is not None:
            dres = dres.reshape(N, H).contiguous()
        dx = torch.empty_like(x2)
        P = _programs(x2, N)
        dw_part = torch.empty(P, H, device=x2.device, dtype=torch.float32)
        if N:
            _launch(_rms_norm_bwd_kernel, _bwd_tuned, x2, lambda bt: P, x2, w, rstd, dy,
                    dy if dres is None else dres, dx, dw_part, N, H, HAS_DRES=dres is not None)
        else:
            dw_part.zero_()
        return dx.view(ctx.shape), dw_part.sum(0).to(w.dtype), None


def rms_norm_with_residual_triton(x: torch.Tensor, weight: torch.Tensor, eps: float
                                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """x ``[..., h]`` (made contiguous), weight ``[h]`` -> (RMSNorm(x) * weight in x's dtype, x as
    the residual branch), differentiable in x and weight; the backward adds the residual's
    gradient in the norm's kernel. Arguments are assumed validated by the op."""
    return _RMSNormWithResidual.apply(x.contiguous(), weight.contiguous(), float(eps))
