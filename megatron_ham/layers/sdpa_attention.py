"""SDPACoreAttention: Megatron core_attention on torch scaled_dot_product_attention.

Drop-in for Megatron-Core's `DotProductAttention` in SelfAttentionSubmodules.core_attention
(same constructor and forward signature on megatron-core 0.16 .. 0.19), but it never
materializes the [b*heads, s, s] score tensor: torch SDPA picks flash / memory-efficient kernels
on GPU, so the Transformer and GDN-GSA attention layers scale to 16k context without Transformer
Engine.

Layout: query [sq, b, np, hn], key/value [sk, b, ng, hn] (np/ng = this TP rank's query heads /
query groups); output [sq, b, np*hn]. Heads are split over TP by SelfAttention.

Document boundaries: when `packed_seq_params` is given with qkv_format "sbhd" (what
megatron_ham.layers.documents.document_forward_kwargs produces), `cu_seqlens_q` are boundaries over the
flattened batch (index = batch_index * s + position) and attention is restricted to the same
document (block-diagonal causal mask, built per call from the boundaries; on GPU SDPA then uses
its memory-efficient kernel with a boolean mask). Without documents the causal kernel is used.
qkv_format "thd" is not supported (use the sbhd form). `attention_mask` (Megatron's [b,1,s,s]
boolean "True = masked") is honoured when given and no packed_seq_params are.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from .documents import cached_document_ids


def _document_mask(packed_seq_params, b, s, causal, device) -> torch.Tensor:
    """Boolean [b, 1, s, s] (True = attend) block-diagonal (causal) mask; built once per
    PackedSeqParams object, so all attention layers of a forward share one tensor (also in the
    tensors saved for backward)."""
    key = (b, s, bool(causal), str(device))
    cache = getattr(packed_seq_params, "_ham_sdpa_mask", None)
    if cache is None or cache[0] != key:
        doc = cached_document_ids(packed_seq_params, b, s, device)
        mask = doc[:, :, None] == doc[:, None, :]
        if causal:
            mask &= torch.ones(s, s, dtype=torch.bool, device=device).tril()
        cache = (key, mask[:, None])
        setattr(packed_seq_params, "_ham_sdpa_mask", cache)
    return cache[1]


class SDPACoreAttention(MegatronModule):
    """Core attention on torch SDPA. Args as Megatron's DotProductAttention."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **kwargs,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "SDPACoreAttention: context_parallel_size must be 1 "
                f"(got {config.context_parallel_size})"
            )
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(
                f"SDPACoreAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}"
            )
        if getattr(config, "window_size", None) is not None:
            raise ValueError("SDPACoreAttention does not support window_size (sliding window)")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        tp = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        nh, ng = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
        if nh % tp or ng % tp:
            raise ValueError(
                f"num_attention_heads={nh} and num_query_groups={ng} must be divisible by "
                f"tensor_model_parallel_size={tp}"
            )
        self.heads_local = nh // tp
        self.groups_local = ng // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        )
        if config.apply_query_key_layer_scaling:
            self.softmax_scale /= self.layer_number  # Megatron's coeff; softmax in fp32 anyway
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
        **kwargs,
    ) -> torch.Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np*hn]."""
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention: attention_bias is not supported")
        sq, b, nq, hn = query.shape
        sk = key.shape[0]
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type in (AttnMaskType.causal, getattr(AttnMaskType, "padding_causal", None))
        # [s, b, n, d] -> [b, n, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if nq != k.shape[1]:
            rep = nq // k.shape[1]
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        mask = None
        if packed_seq_params is not None:
            fmt = getattr(packed_seq_params, "qkv_format", None)
            if fmt not in (None, "sbhd"):
                raise ValueError(
                    f"SDPACoreAttention: packed_seq_params.qkv_format must be 'sbhd' (documents "
                    f"over the flattened batch), got {fmt!r}"
                )
            if sq != sk:
                raise ValueError("SDPACoreAttention: documents need sq == sk")
            mask = _document_mask(packed_seq_params, b, sq, causal, q.device)
        elif attention_mask is not None and not causal:
            mask = ~attention_mask.to(torch.bool)  # Megatron: True = masked out
        dropout = self.dropout_p if self.training else 0.0
        if mask is None:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=causal and sq > 1, dropout_p=dropout, scale=self.softmax_scale
            )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.softmax_scale
            )
        # [b, n, s, d] -> [s, b, n*d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, nq * hn)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """No parameters."""
        return {}
