"""build_model, step_kv_controllers and document_forward_kwargs (the training loop's API)."""
from __future__ import annotations

from typing import Dict, Optional

import torch
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
    make_vocab_size_divisible_by (independent of TP). Position embedding: RoPE when the pattern has attention
    layers ('*'), none otherwise (GDN / HAM mixers ignore rotary arguments).
    Raises ValueError naming the setting for a bad configuration.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_ham.layers.specs import get_backend, layer_spec, parse_pattern

    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"build_model: cfg must be a ModelConfig, got {type(cfg).__name__}")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cfg.validate(tp=tp, pp=pp)
    tc = transformer_config(cfg)
    backend = get_backend(cfg.backend)
    opts = mixer_options(cfg)
    kinds = parse_pattern(cfg.resolved_pattern(), cfg.num_layers)
    specs = [layer_spec(k, backend, opts) for k in kinds]
    offset = get_transformer_layer_offset(tc, vp_stage)
    n = get_num_layers_to_build(tc, vp_stage)
    block = TransformerBlockSubmodules(layer_specs=specs[offset : offset + n],
                                       layer_norm=backend.norm)
    pos = "rope" if "attention" in kinds else "none"
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


def mixer_options(cfg: ModelConfig):
    from megatron_ham.layers.gdn_mixer import MixerOptions

    return MixerOptions(
        num_heads=cfg.mixer_num_heads,
        key_head_dim=cfg.mixer_key_head_dim,
        value_head_dim=cfg.mixer_value_head_dim,
        conv_kernel=cfg.conv_kernel,
        impl=cfg.impl,
        fuse_elementwise=cfg.resolved_fusions(),
        kv_fraction=float(cfg.kv_fraction),
        router=cfg.router,
        router_hidden_size=cfg.router_hidden_size,
        scratchpad_scale=float(cfg.scratchpad_scale),
        controller_gain=float(cfg.controller_gain),
        controller_warmup=cfg.controller_warmup,
    )


def transformer_config(cfg: ModelConfig):
    """Megatron TransformerConfig for `cfg` with the current parallel sizes."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    dtype = DTYPES[cfg.dtype]
    fuse = cfg.resolved_fusions()
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
        bias_activation_fusion=fuse,
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


def _ham_mixers(model_chunks):
    from megatron_ham.layers.ham_mixer import HAMMixer

    if isinstance(model_chunks, torch.nn.Module):
        model_chunks = [model_chunks]
    for chunk in model_chunks:
        for m in chunk.modules():
            if isinstance(m, HAMMixer):
                yield m


def step_kv_controllers(model_chunks, dp_group=None) -> Dict[int, Dict[str, float]]:
    """Update every HAM layer's KV-fraction controller once, after an optimizer step.

    model_chunks: a model or a list of (possibly DDP-wrapped) model chunks of this rank.
    dp_group: the data-parallel group; the routed fraction (and the warm-up quantile) is averaged
        over it so every rank holds the same tau. None = no averaging.
    Uses the per-token scores each HAM layer recorded (detached) in its training-mode forwards
    since the last call (all micro-batches), updates tau, clears the records. Every rank of
    dp_group must call it (it is collective) with the same layers. Layers that recorded nothing
    (e.g. eval-only) are skipped on all ranks alike.
    Returns {global layer number: {"fraction": measured routed fraction at the step's tau,
    "tau": the new tau}}.
    """
    out = {}
    for m in _ham_mixers(model_chunks):
        scores = m.pop_recorded_scores()
        if scores is None:
            continue
        f = m.kv_controller.update(scores, group=dp_group)
        out[int(m.layer_number)] = {"fraction": float(f), "tau": float(m.kv_controller.tau)}
    return out


def document_forward_kwargs(tokens: torch.Tensor, eod_id: int) -> dict:
    """Extra kwargs for the model forward so nothing leaks across documents of a packed batch.

    tokens: int [b, s]; a document ends WITH its EOD token (the token after an EOD starts a new
    document), and every batch row starts a new document.
    Returns {"packed_seq_params": PackedSeqParams(qkv_format="sbhd", cu_seqlens_q = cu_seqlens_kv
    = int32 boundaries over the flattened batch (index = row * s + position), max_seqlen_q =
    max_seqlen_kv = s)}. The HAM / GDN mixers restart their state, conv and scratchpad at each
    boundary; SDPACoreAttention masks attention to the same document. RoPE positions stay the
    row positions (relative, so unaffected). Pass the same dict to every pipeline stage.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be an int tensor [b, s], got "
                         f"{list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    b, s = tokens.shape
    ends = tokens[:, :-1] == eod_id  # boundary after position i (i < s-1)
    rows = torch.arange(b, device=tokens.device)
    # positions in flattened coordinates
    if s > 1:
        r, c = torch.nonzero(ends, as_tuple=True)
        inner = r * s + c + 1
    else:
        inner = torch.zeros(0, dtype=torch.long, device=tokens.device)
    row_starts = rows * s
    cu = torch.cat([row_starts, inner, torch.tensor([b * s], device=tokens.device)])
    cu = torch.unique(cu).to(torch.int32)
    return {
        "packed_seq_params": PackedSeqParams(
            qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=s, max_seqlen_kv=s
        )
    }
