"""Framework-free HAM math: tensors in, tensors out (no megatron imports).

Layouts are fla's: [B, T, H, D] (batch, time, heads, head dim). Every op has a plain-PyTorch
reference that runs on CPU; GPU kernels (megatron_ham.kernels) are picked by impl="auto".
"""
from .gated_delta_rule import gated_delta_rule
from .scratchpad import scratchpad_attention
from .routing import LearnedRouter, min_over_heads, route, router_weighted_values
from .controller import KVFractionController
from .combine import gated_combine, gated_rms_norm
from .short_conv import causal_conv_silu
from .gdn_activations import gdn_activations
from .norm import hidden_norm, hidden_norm_with_residual
from .swiglu import swiglu
from .rope import apply_rope, rope_cos_sin

__all__ = [
    "gated_delta_rule",
    "scratchpad_attention",
    "LearnedRouter",
    "min_over_heads",
    "route",
    "router_weighted_values",
    "KVFractionController",
    "gated_combine",
    "gated_rms_norm",
    "causal_conv_silu",
    "gdn_activations",
    "hidden_norm",
    "hidden_norm_with_residual",
    "swiglu",
    "apply_rope",
    "rope_cos_sin",
]
