"""ModuleSpecs of megatron-ham layers, for the `local` and `te` backends.

Every layer is a Megatron TransformerLayer: input norm -> mixer -> residual -> norm -> MLP ->
residual. The mixer is the layer kind's (megatron_ham/layers/kinds: "H" HAMMixer, "G" GDNMixer,
"*" Megatron SelfAttention with RoPE and SDPACoreAttention on `local`, TEDotProductAttention on
`te`; or a registered plugin kind): `kind.spec(backend, cfg)`.

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
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .norm import HAMNorm, layer_takes_norm_residual
from .sdpa_attention import SDPACoreAttention
from .swiglu import SwiGLU, fused_swiglu

BACKENDS = ("local", "te")


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


def mlp_spec(backend: Backend, cfg) -> ModuleSpec:
    """Megatron's MLP; its SwiGLU is our module (liger-kernel's kernel) when
    layers.swiglu.fused_swiglu(cfg), else megatron-core's own."""
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(
            linear_fc1=backend.column_parallel_linear, linear_fc2=backend.row_parallel_linear,
            activation_func=SwiGLU if fused_swiglu(cfg) else None,
        ),
    )


def pre_norm(backend: Backend, cfg):
    """The norm before each block. On `local` with the model's fusions and norm_mlp_kernels on,
    HAMNorm also returns the block's residual branch (has_residual), so that on CUDA the norm's
    backward kernel adds the residual's gradient (ops.hidden_norm_with_residual), where
    megatron-core's layer takes that pair (layers.norm.layer_takes_norm_residual); TENorm as it is."""
    if (backend.norm is HAMNorm and cfg.resolved_fusions() and cfg.norm_mlp_kernels
            and layer_takes_norm_residual()):
        return ModuleSpec(module=HAMNorm, params={"has_residual": True})
    return backend.norm


def layer_spec(kind, backend: Backend, cfg) -> ModuleSpec:
    """TransformerLayer spec: norm -> mixer (the LayerKind `kind`'s, for ModelConfig `cfg`) ->
    residual -> norm -> MLP -> residual."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=pre_norm(backend, cfg),
            self_attention=kind.spec(backend, cfg),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_norm(backend, cfg),
            mlp=mlp_spec(backend, cfg),
            mlp_bda=get_bias_dropout_add,
        ),
    )
