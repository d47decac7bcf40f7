"""Torch norms for the `local` backend, usable under sequence parallelism on any device.

Megatron-Core's WrappedTorchNorm refuses `sequence_parallel=True`; HAMNorm accepts it and tags
its (replicated) parameters `.sequence_parallel = True`, so Megatron's finalize_model_grads
all-reduces their gradients over the TP group (each rank only saw s/tp tokens).

With ``has_residual=True`` (the spec's pre-norms of a layer, as TENorm's ``has_residual``) the
module returns (normalised, residual), which megatron-core's TransformerLayer takes as the norm's
output and the residual branch: ops.hidden_norm_with_residual, whose CUDA RMSNorm kernel adds
the residual branch's gradient inside the norm's backward (docs/design.md "Pre-norms").
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_ham.ops.norm import hidden_norm, hidden_norm_with_residual


def layer_takes_norm_residual() -> bool:
    """Whether this megatron-core's TransformerLayer takes a norm's (output, residual) pair: the
    versions whose TransformerConfig has ``fused_residual_rmsnorm`` (0.19.2 on the GPU machine;
    0.16.1, the CPU test environment's, uses the norm's input as the residual itself)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return "fused_residual_rmsnorm" in getattr(TransformerConfig, "__dataclass_fields__", {})


class HAMNorm(nn.Module):
    """RMSNorm or LayerNorm over the last dim (`config.normalization`), input [s(/tp), b, h].

    Constructor matches Megatron's norm builders: (config, hidden_size, eps=1e-5), plus
    has_residual (return (output, residual): the norm before a block with a residual branch).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, has_residual: bool = False,
                 **kwargs):
        super().__init__()
        self.has_residual = bool(has_residual)
        kind = getattr(config, "normalization", "RMSNorm")
        if kind not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"normalization must be 'RMSNorm' or 'LayerNorm', got {kind!r}")
        self.rms = kind == "RMSNorm"
        self.eps = float(eps)
        self.hidden_size = hidden_size
        self.zero_centered = bool(getattr(config, "layernorm_zero_centered_gamma", False))
        dtype = getattr(config, "params_dtype", torch.float32)
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        if getattr(config, "use_cpu_initialization", False):
            device = "cpu"
        init = 0.0 if self.zero_centered else 1.0
        self.weight = nn.Parameter(torch.full((hidden_size,), init, dtype=dtype, device=device))
        self.bias = None
        if not self.rms:
            self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device))
        sp = bool(getattr(config, "sequence_parallel", False))
        for p in self.parameters():
            setattr(p, "sequence_parallel", sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight + 1.0 if self.zero_centered else self.weight
        # fused on CUDA (fp32 statistics inside, one saved rstd); the same math on CPU
        if self.has_residual:
            return hidden_norm_with_residual(x, w, self.bias, eps=self.eps)
        return hidden_norm(x, w, self.bias, eps=self.eps)
