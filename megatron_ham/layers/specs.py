"""ModuleSpecs of megatron-ham layers, for the `local` and `te` backends.

Every layer is a Megatron TransformerLayer: input norm -> mixer -> residual -> norm -> MLP ->
residual. The mixer is one of
  "H" HAMMixer (GDN state + routed scratchpad), "G" GDNMixer, "*" softmax attention
  (Megatron SelfAttention with RoPE and SDPACoreAttention on `local`, TEDotProductAttention on `te`).

Backends:
  local: Megatron's ColumnParallelLinear / RowParallelLinear, megatron_ham HAMNorm (torch, works
         with sequence parallelism), SDPACoreAttention (torch SDPA; flash on GPU).
  te:    Transformer Engine's TEColumnParallelLinear / TERowParallelLinear / TENorm /
         TEDotProductAttention, imported lazily; a clear ImportError when TE is absent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .gdn_mixer import GDNMixer, GDNMixerSubmodules, MixerOptions
from .ham_mixer import HAMMixer
from .norm import HAMNorm
from .sdpa_attention import SDPACoreAttention

BACKENDS = ("local", "te")
LAYER_SYMBOLS = {"H": "ham", "G": "gdn", "*": "attention"}


@dataclass
class Backend:
    """The building blocks of one backend."""

    column_parallel_linear: Any
    row_parallel_linear: Any
    norm: Any
    core_attention: Any


def get_backend(name: str) -> Backend:
    """`local` or `te` (Transformer Engine, imported only here)."""
    if name == "local":
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        return Backend(ColumnParallelLinear, RowParallelLinear, HAMNorm, SDPACoreAttention)
    if name == "te":
        try:
            import transformer_engine  # noqa: F401
            from megatron.core.extensions.transformer_engine import (
                TEColumnParallelLinear,
                TEDotProductAttention,
                TENorm,
                TERowParallelLinear,
            )
        except Exception as e:  # ImportError, or TE's meta package raising RuntimeError
            raise ImportError(
                "backend='te' needs Transformer Engine (transformer_engine.pytorch) importable; "
                f"it is not ({type(e).__name__}: {e}). Use backend='local'."
            ) from e
        return Backend(TEColumnParallelLinear, TERowParallelLinear, TENorm, TEDotProductAttention)
    raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")


def mlp_spec(backend: Backend) -> ModuleSpec:
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(
            linear_fc1=backend.column_parallel_linear, linear_fc2=backend.row_parallel_linear
        ),
    )


def mixer_spec(kind: str, backend: Backend, options: MixerOptions) -> ModuleSpec:
    """The self_attention slot for `kind` in ("ham", "gdn", "attention")."""
    if kind in ("ham", "gdn"):
        return ModuleSpec(
            module=HAMMixer if kind == "ham" else GDNMixer,
            submodules=GDNMixerSubmodules(
                in_proj=backend.column_parallel_linear, out_proj=backend.row_parallel_linear
            ),
            params={"options": options},
        )
    if kind == "attention":
        return ModuleSpec(
            module=SelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=backend.column_parallel_linear,
                core_attention=backend.core_attention,
                linear_proj=backend.row_parallel_linear,
                q_layernorm=IdentityOp,
                k_layernorm=IdentityOp,
            ),
        )
    raise ValueError(f"mixer kind must be 'ham', 'gdn' or 'attention', got {kind!r}")


def layer_spec(kind: str, backend: Backend, options: MixerOptions) -> ModuleSpec:
    """TransformerLayer spec: norm -> mixer(kind) -> residual -> norm -> MLP -> residual."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=backend.norm,
            self_attention=mixer_spec(kind, backend, options),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=backend.norm,
            mlp=mlp_spec(backend),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def parse_pattern(pattern: str, num_layers: int) -> list:
    """'HG*' symbols -> ['ham', 'gdn', 'attention']. Raises ValueError naming `pattern`."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern must be a non-empty string of {sorted(LAYER_SYMBOLS)}")
    bad = sorted({c for c in pattern if c not in LAYER_SYMBOLS})
    if bad:
        raise ValueError(
            f"pattern {pattern!r}: unknown layer symbol(s) {bad}; allowed: "
            + ", ".join(f"{k!r}={v}" for k, v in LAYER_SYMBOLS.items())
        )
    if len(pattern) != num_layers:
        raise ValueError(
            f"pattern {pattern!r} has {len(pattern)} layers but num_layers={num_layers}"
        )
    return [LAYER_SYMBOLS[c] for c in pattern]
