"""build_model and the TransformerConfig derived from a ModelConfig (model building only).

The KV-fraction controller step lives with the HAM kind (megatron_ham.layers.kinds.ham.
step_kv_controllers), the document boundaries with the layers that honour them
(megatron_ham.layers.documents.document_forward_kwargs).
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F

from .config import DTYPES, ModelConfig


def build_model(cfg: ModelConfig, *, pre_process: bool = True, post_process: bool = True,
                vp_stage: Optional[int] = None):
    """Megatron GPTModel for `cfg` on this pipeline stage (parallel_state must be initialized,
    e.g. by megatron_ham.distributed.initialize).

    The block is heterogeneous: TransformerBlockSubmodules(layer_specs=...) holds the specs of
    THIS stage's layers only (global layers [offset, offset + n) with Megatron's own
    get_transformer_layer_offset / get_num_layers_to_build), and TransformerLayer adds the offset
    to layer_number itself. Embedding: vocab padded to a multiple of
    make_vocab_size_divisible_by (independent of TP). Position embedding: RoPE when a layer kind
    of the pattern uses it (attention), none otherwise (GDN / HAM mixers ignore rotary arguments);
    on `local` the core attention applies it (SDPACoreAttention), on `te` Megatron's.
    Raises SettingError (a ValueError) naming the setting for a bad configuration.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_ham.layers.kinds import parse_pattern
    from megatron_ham.layers.specs import get_backend, layer_spec

    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"build_model: cfg must be a ModelConfig, got {type(cfg).__name__}")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cfg.validate(tp=tp, pp=pp)
    tc = transformer_config(cfg)
    backend = get_backend(cfg.backend)
    kinds = parse_pattern(cfg.resolved_pattern(), cfg.num_layers)
    specs = [layer_spec(k, backend, cfg) for k in kinds]
    offset = get_transformer_layer_offset(tc, vp_stage)
    n = get_num_layers_to_build(tc, vp_stage)
    block = TransformerBlockSubmodules(layer_specs=specs[offset : offset + n],
                                       layer_norm=backend.norm)
    # RoPE: Megatron's rotary embedding, unless the backend's core attention applies it itself
    # (SDPACoreAttention on `local`: one fused kernel instead of Megatron's unfused chain)
    own_rope = getattr(backend.core_attention, "applies_rope", False)
    pos = "rope" if any(k.uses_rope for k in kinds) and not own_rope else "none"
    kw = {}
    if vp_stage is not None:
        kw["vp_stage"] = vp_stage
    model = GPTModel(
        config=tc,
        transformer_layer_spec=block,
        vocab_size=cfg.padded_vocab_size(),
        max_sequence_length=cfg.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type=pos,
        rotary_base=cfg.rotary_base,
        **kw,
    )
    model.ham_config = cfg
    return model


def transformer_config(cfg: ModelConfig):
    """Megatron TransformerConfig for `cfg` with the current parallel sizes."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ham.layers.swiglu import fused_swiglu

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    dtype = DTYPES[cfg.dtype]
    fuse = cfg.resolved_fusions()
    liger_swiglu = fused_swiglu(cfg)
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.resolved_ffn_hidden_size(),
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.resolved_num_query_groups(),
        kv_channels=cfg.resolved_kv_channels(),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=bool(cfg.sequence_parallel and tp > 1),
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=cfg.dtype == "bf16",
        fp16=cfg.dtype == "fp16",
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        use_cpu_initialization=cfg.use_cpu_initialization,
        # SwiGLU: our module on liger-kernel (through megatron's activation-module hook, which
        # excludes bias_activation_fusion), else megatron-core's compiled one
        bias_activation_fusion=fuse and not liger_swiglu,
        use_te_activation_func=liger_swiglu,
        # Megatron's fused cross entropy returns bf16 logit gradients: bf16 models only
        cross_entropy_loss_fusion=fuse and cfg.dtype == "bf16",
        cross_entropy_fusion_impl="native",
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # heterogeneous layers: checkpoint keys per global layer (decoder.layers.<i>.*), not
        # stacked along a layer axis (layer types differ, so a stacked tensor would have holes)
        hetereogenous_dist_checkpoint=True,
    )
