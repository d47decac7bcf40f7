"""The megatron_ham.ops functions the HF model uses, behind one import point.

Inside the package these come from megatron_ham.ops. In an export directory (loaded with
trust_remote_code=True, without megatron_ham) `ham-convert-hf` writes this file with the
imports rewritten to the ops files copied next to it (`from ..ops.X import` -> `from .X import`),
so both load the same code.
"""
from ..ops.gated_delta_rule import gated_delta_rule
from ..ops.scratchpad import scratchpad_attention
from ..ops.routing import LearnedRouter, min_over_heads, random_router_scores, route, router_weighted_values
from ..ops.combine import gated_combine, gated_rms_norm
from ..ops.short_conv import causal_conv_silu
from ..ops.gdn_activations import gdn_activations
from ..ops.norm import hidden_norm
from ..ops.rope import apply_rope, rope_cos_sin

__all__ = ["gated_delta_rule", "scratchpad_attention", "LearnedRouter", "min_over_heads", "random_router_scores", "route",
           "router_weighted_values", "gated_combine", "gated_rms_norm", "causal_conv_silu",
           "gdn_activations", "hidden_norm", "apply_rope", "rope_cos_sin"]
