"""The MLP's SwiGLU as a module for megatron-core's MLP, on liger-kernel's fused kernel.

megatron-core's MLP calls an activation *module* from its spec (``MLPSubmodules.activation_func``)
when ``config.use_te_activation_func`` is set (the hook TE's SwiGLU uses; nothing of TE is
imported): the module gets fc1's whole output ``[s, b, 2F]`` (gate, up) and returns ``[s, b, F]``.
:func:`fused_swiglu` decides, for one model config, whether the model uses it: the `local`
backend with the model's fusions on, on CUDA with liger-kernel installed; otherwise megatron-core's
own compiled SwiGLU (``bias_activation_fusion``) runs, the same math (also with the model
setting ``norm_mlp_kernels`` false).
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_ham.ops.swiglu import swiglu, swiglu_available


def fused_swiglu(cfg) -> bool:
    """Whether a model of ModelConfig ``cfg`` runs :class:`SwiGLU` (liger-kernel's kernel): THE
    one place that decides (the spec and the TransformerConfig both ask it)."""
    return (cfg.backend == "local" and cfg.resolved_fusions() and cfg.norm_mlp_kernels
            and swiglu_available())


class SwiGLU(nn.Module):
    """x ``[s, b, 2F]`` (gate, up) -> silu(gate) * up ``[s, b, F]`` (ops.swiglu, impl "auto")."""

    def __init__(self, config=None, **kwargs):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x)
