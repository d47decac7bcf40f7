"""SDPACoreAttention: Megatron core_attention on torch scaled_dot_product_attention.

Drop-in for Megatron-Core's `DotProductAttention` in SelfAttentionSubmodules.core_attention
(same constructor and forward signature on megatron-core 0.16 .. 0.19), but it never
materializes the [b*heads, s, s] score tensor: torch SDPA picks flash / memory-efficient kernels
on GPU, so the Transformer and GDN-GSA attention layers scale to 16k context without Transformer
Engine.

Layout: query [sq, b, np, hn], key/value [sk, b, ng, hn] (np/ng = this TP rank's query heads /
query groups); output [sq, b, np*hn]. Heads are split over TP by SelfAttention.

RoPE: with `rotary_base` set (what the attention kind passes on the `local` backend; the model
then has no Megatron rotary embedding), query and key are rotated here at the row positions
(megatron_ham.ops.apply_rope, compiled into one kernel per tensor with `fuse_rope`).

Document boundaries: when `packed_seq_params` is given with qkv_format "sbhd" (what
megatron_ham.layers.documents.document_forward_kwargs produces), `cu_seqlens_q` are boundaries over the
flattened batch (index = batch_index * s + position) and attention is restricted to the same
document. How (the same result each way):
  - one document per row (every row starts a document, so this is also a batch with no EOD
    inside a row): one causal SDPA call over the batch;
  - up to MAX_DOCUMENT_CALLS documents in the batch: one causal SDPA call per document, on a
    window of the row from its start, of one of 40 lengths (window_length: cuDNN plans one
    kernel per shape; the boundaries come to the host once per forward);
  - more: one call with the block-diagonal causal mask (built once per forward; on GPU SDPA then
    uses its memory-efficient kernel with a boolean [b, 1, s, s] mask, slower per token but one
    launch).
Without documents the causal kernel is used.
qkv_format "thd" is not supported (use the sbhd form). `attention_mask` (Megatron's [b,1,s,s]
boolean "True = masked") is honoured when given and no packed_seq_params are.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional

import torch
import torch.nn.attention
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_ham.ops.rope import apply_rope, rope_cos_sin

from .documents import cached_document_ids, host_cu_seqlens
from .fusion import maybe_compiled


#: sdpa_backend -> the torch SDPA kernel preferred on CUDA (None: torch's own choice)
SDPA_BACKENDS = {"auto": None, "cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
                 "efficient": "EFFICIENT_ATTENTION"}

#: The most documents in one forward that get one SDPA call each; above it, the block-diagonal
#: mask (the per-call launch and slicing cost would exceed what the dense mask wastes).
MAX_DOCUMENT_CALLS = 64

#: The finest step of the window lengths the per-document calls run on (window_length). cuDNN
#: builds an execution plan for every new shape and keeps it: 147 ms of host time per new length
#: on an H200 while the GPU waits (tools/bench_sdpa_host.py, 2026-12-03), and a cache that grows
#: with every document length the data holds. Windows of 40 lengths up to 16k bound both; the
#: longer window costs the GPU at most 1/8 more per document above 1,024 tokens.
WINDOW_MIN_STEP = 128


def _document_spans(packed_seq_params, b, s):
    """[(row, start, end)] of every document, host ints, from cu_seqlens over the flattened
    batch; computed once per PackedSeqParams object (from the host copy document_forward_kwargs
    keeps, else one device-to-host copy per forward).
    Raises ValueError when the boundaries are not a partition of b*s into documents of one row."""
    cache = getattr(packed_seq_params, "_ham_sdpa_spans", None)
    if cache is None or cache[0] != (b, s):
        cu = host_cu_seqlens(packed_seq_params)
        if cu is None:  # built elsewhere: one device-to-host copy
            cu = packed_seq_params.cu_seqlens_q.reshape(-1).to("cpu", torch.int64)
        cu = cu.tolist()
        if len(cu) < 2 or cu[0] != 0 or cu[-1] != b * s or any(e <= a for a, e in zip(cu, cu[1:])):
            raise ValueError(
                f"packed_seq_params.cu_seqlens must rise from 0 to b*s = {b * s} "
                f"(boundaries over the flattened batch), got {cu[:8]}..."
            )
        spans = []
        for a, e in zip(cu, cu[1:]):
            row = a // s
            if (e - 1) // s != row:
                raise ValueError(f"packed_seq_params: document [{a}, {e}) crosses a row boundary "
                                 f"(rows of {s} tokens; every row must start a document)")
            spans.append((row, a - row * s, e - row * s))
        cache = ((b, s), spans)
        setattr(packed_seq_params, "_ham_sdpa_spans", cache)
    return cache[1]


def window_length(n: int) -> int:
    """The length of the window a document of n tokens is attended on: n rounded up to a
    multiple of max(WINDOW_MIN_STEP, 2**floor(log2 n) / 8). So at most 12.5 % longer above
    8 * WINDOW_MIN_STEP tokens, and 40 lengths up to 16,384 tokens."""
    step = max(WINDOW_MIN_STEP, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def _window(x: torch.Tensor, r: int, a: int, e: int, causal: bool) -> torch.Tensor:
    """x [b, n, s, d] -> [1, n, window_length(e - a), d]: row r from position a, a view of the
    row where the window fits in it, else the rest of the row padded with zeros. Under the causal
    mask the first e - a outputs depend on x[r, :, a:e] only, and the tokens after e get no
    gradient from them, so the tokens after the document (the next one's, or zeros) change
    nothing. Without the causal mask: the document's own slice [1, n, e - a, d]."""
    if not causal:
        return x[r: r + 1, :, a:e]
    w, s = window_length(e - a), x.shape[2]
    if a + w <= s:
        return x[r: r + 1, :, a: a + w]
    return F.pad(x[r: r + 1, :, a:], (0, 0, 0, a + w - s))


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
    """Core attention on torch SDPA. Args as Megatron's DotProductAttention, plus
    sdpa_backend (a key of SDPA_BACKENDS: the kernel torch prefers on CUDA; CPU ignores it),
    rotary_base (RoPE applied here to query and key, megatron_ham.ops.apply_rope; None: no RoPE)
    and fuse_rope (RoPE as one compiled kernel per tensor instead of Megatron's unfused chain of
    concatenations and products on strided views, layers/fusion.py)."""

    #: the attention kind passes sdpa_backend / rotary_base / fuse_rope, and the model is built
    #: without Megatron's own rotary embedding (models/builder.py)
    applies_rope = True

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
        sdpa_backend: str = "auto",
        rotary_base: Optional[float] = None,
        fuse_rope: bool = False,
        **kwargs,
    ):
        super().__init__(config=config)
        self.rotary_base = rotary_base
        self._rope = maybe_compiled(apply_rope, bool(fuse_rope))
        self._cos_sin = None  # (s, device), cos, sin: [s, 1, 1, d] float32
        if sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"sdpa_backend must be one of {list(SDPA_BACKENDS)}, got {sdpa_backend!r}")
        name = SDPA_BACKENDS[sdpa_backend]
        if name is None:
            self.sdpa_backends = None
        else:  # the chosen kernel first, the others as fallbacks (shapes it does not support)
            order = [getattr(torch.nn.attention.SDPBackend, n) for n in
                     (name, "FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")]
            self.sdpa_backends = list(dict.fromkeys(order))
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
        if self.rotary_base is not None:
            if sq != sk:
                raise ValueError("SDPACoreAttention: RoPE needs sq == sk (self-attention)")
            cos, sin = self._rotary(sq, query.device)
            query, key = self._rope(query, cos, sin), self._rope(key, cos, sin)
        # [s, b, n, d] -> [b, n, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if nq != k.shape[1]:
            rep = nq // k.shape[1]
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        sdpa = functools.partial(F.scaled_dot_product_attention,
                                 dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale)
        with self._kernel_choice(q):
            out = self._attend(sdpa, q, k, v, attention_mask, causal, packed_seq_params, b, sq, sk)
        # [b, n, s, d] -> [s, b, n*d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, nq * hn)

    def _kernel_choice(self, q):
        """The sdpa_backend restriction on CUDA, else nothing."""
        if self.sdpa_backends is None or not q.is_cuda:
            return contextlib.nullcontext()
        return torch.nn.attention.sdpa_kernel(self.sdpa_backends, set_priority=True)

    def _rotary(self, s: int, device):
        """cos, sin float32 [s, 1, 1, d] of positions 0..s-1 (the row positions), cached."""
        if self._cos_sin is None or self._cos_sin[0] != (s, str(device)):
            cos, sin = rope_cos_sin(self.head_dim, self.rotary_base, torch.arange(s, device=device))
            self._cos_sin = ((s, str(device)), cos[:, None, None], sin[:, None, None])
        return self._cos_sin[1:]

    def _attend(self, sdpa, q, k, v, attention_mask, causal, packed_seq_params, b, sq, sk):
        """q, k, v [b, n, s, d] -> [b, n, s, d], masked to documents / causal / attention_mask."""
        spans = self._spans(packed_seq_params, b, sq, sk)
        if spans is None or len(spans) == b:  # no documents, or one per row
            mask = None
            if spans is None and attention_mask is not None and not causal:
                mask = ~attention_mask.to(torch.bool)  # Megatron: True = masked out
            out = sdpa(q, k, v, attn_mask=mask, is_causal=mask is None and causal and sq > 1)
        elif len(spans) <= MAX_DOCUMENT_CALLS:  # one call per document, on its window
            parts = [sdpa(*(_window(x, r, a, e, causal) for x in (q, k, v)), is_causal=causal)[:, :, : e - a]
                     for r, a, e in spans]                                       # [1, n, len, d] each
            out = torch.cat([torch.cat([p for p, (r, _, _) in zip(parts, spans) if r == row], dim=2)
                             for row in range(b)], dim=0)                        # [b, n, s, d]
        else:
            out = sdpa(q, k, v, attn_mask=_document_mask(packed_seq_params, b, sq, causal, q.device))
        return out

    @staticmethod
    def _spans(packed_seq_params, b, sq, sk):
        """The documents of packed_seq_params as (row, start, end), or None without them."""
        if packed_seq_params is None:
            return None
        fmt = getattr(packed_seq_params, "qkv_format", None)
        if fmt not in (None, "sbhd"):
            raise ValueError(
                f"SDPACoreAttention: packed_seq_params.qkv_format must be 'sbhd' (documents "
                f"over the flattened batch), got {fmt!r}"
            )
        if sq != sk:
            raise ValueError("SDPACoreAttention: documents need sq == sk")
        return _document_spans(packed_seq_params, b, sq)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """No parameters."""
        return {}
