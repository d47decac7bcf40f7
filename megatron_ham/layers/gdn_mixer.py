"""GDNMixer: the Gated DeltaNet sequence mixer as a Megatron-Core self-attention module.

It is the recurrent half of the HAM mixer (megatron_ham.layers.ham_mixer.HAMMixer extends it
with the scratchpad); used alone it gives the GDN and GDN-GSA baselines.

Layout and parallelism
----------------------
input  hidden_states [s, b, h]  ([s/tp, b, h] under sequence parallelism)
output (out [s, b, h] ([s/tp, b, h] under SP), bias [h] or None)   -- Megatron's (output, bias)

Heads are split over the tensor-parallel (TP) ranks: H_l = num_heads / tp per rank.
  in_proj  ColumnParallelLinear(h -> sum of sections), gather_output=False; each rank's output
           rows are ITS sections, in order: q [H_l*K], k [H_l*K], v [H_l*V], z (output gate)
           [H_l*V], beta [H_l], a (decay) [H_l] (HAMMixer appends gate_rnn [H_l], gate_kv [H_l]).
           Under SP it all-gathers the sequence.
  conv1d   depthwise causal conv (kernel conv_kernel) + SiLU over this rank's q, k, v channels
           (weight [C_l, 1, kernel], C_l = H_l*(2K+V)); it does not cross document boundaries.
  A_log, dt_bias  [H_l]: g = -exp(A_log) * softplus(a + dt_bias) (log decay), beta = sigmoid(.)
  norm weight [V] replicated: gated per-head RMSNorm; its gradient is all-reduced over TP in
           backward (all_reduce_backward), so it is the full gradient on every rank.
  out_proj RowParallelLinear(H*V -> h), input_is_parallel=True; under SP it reduce-scatters.
The kernel layout is [B, T, H_l, D] (fla's). q, k are L2-normalised per head.

Checkpoints: sharded_state_dict() declares A_log, dt_bias, conv1d.weight TP-split and saves
in_proj.weight as named sections (in_proj.weight.q, .k, .v, .z, .beta, .a, ...) and conv1d.weight
as (.q, .k, .v), each its own TP-sharded tensor: a checkpoint is independent of the TP layout.

Documents: packed_seq_params (qkv_format "sbhd") with cu_seqlens_q over the flattened batch
(index = batch_index * s + position) restarts the state (and the conv) at every document; the
batch is flattened to one row [1, b*s] for the kernels. See docs/parallelism.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_ham.ops.combine import gated_rms_norm
from megatron_ham.ops.short_conv import causal_conv_silu

from .fusion import maybe_compiled
from .sdpa_attention import cached_document_ids
from .tp_utils import all_reduce_backward, section_factory


@dataclass
class MixerOptions:
    """Settings of the GDN / HAM mixers (passed through ModuleSpec params as `options=`).

    num_heads: heads of the state (and of the scratchpad), split over TP.
    key_head_dim / value_head_dim: K and V per head.
    conv_kernel: depthwise causal conv width (4).
    A_init_min / A_init_max: A ~ U[min, max], A_log = log A (decay rate init, as fla / Megatron).
    norm_eps: eps of the gated per-head RMSNorm.
    impl: kernel choice for the ops ("auto" | "naive" | "chunk"), for tests.
    fuse_elementwise: run the elementwise ops through torch.compile (layers/fusion.py).
    HAM only (ignored by GDNMixer):
    kv_fraction: controller target in [0, 1].
    router: "error_l2" | "error_cosine" | "learned".
    router_hidden_size: width of the learned router MLP (0 = hidden // 4).
    scratchpad_scale: softmax scale of the scratchpad; 0 = sqrt(K) (q, k are L2-normalised, so
        the usual 1/sqrt(K) would make the softmax nearly uniform).
    scratchpad_impl: "auto" | "reference" | "compact".
    controller_gain / controller_warmup: KVFractionController(gain, warmup).
    """

    num_heads: int = 8
    key_head_dim: int = 64
    value_head_dim: int = 64
    conv_kernel: int = 4
    A_init_min: float = 1.0
    A_init_max: float = 16.0
    norm_eps: float = 1e-6
    impl: str = "auto"
    fuse_elementwise: bool = False
    kv_fraction: float = 0.5
    router: str = "error_l2"
    router_hidden_size: int = 0
    scratchpad_scale: float = 0.0
    scratchpad_impl: str = "auto"
    controller_gain: float = 1.0
    controller_warmup: int = 1


@dataclass
class GDNMixerSubmodules:
    """in_proj: column-parallel linear; out_proj: row-parallel linear."""

    in_proj: Union[ModuleSpec, type] = IdentityOp
    out_proj: Union[ModuleSpec, type] = IdentityOp


def _tp_group(pg_collection):
    if pg_collection is not None and getattr(pg_collection, "tp", None) is not None:
        return pg_collection.tp
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _device(config):
    if getattr(config, "use_cpu_initialization", False) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def gdn_activations(qkv, a, beta_logit, A_log, dt_bias, H: int, K: int, V: int):
    """Post-conv activations of a GDN / HAM mixer, [B, T, ...] layout, H = this rank's heads.

    qkv [B,T,H*(2K+V)] (conv output) -> q, k L2-normalised [B,T,H,K] (fp32 inside), v
    [B,T,H,V]; a, beta_logit [B,T,H] -> g = -exp(A_log) * softplus(a + dt_bias) and
    beta = sigmoid(beta_logit), both fp32 [B,T,H].
    """
    B, T = qkv.shape[:2]
    q, k, v = torch.split(qkv, [H * K, H * K, H * V], -1)
    q = F.normalize(q.reshape(B, T, H, K).float(), dim=-1, eps=1e-6).to(qkv.dtype)
    k = F.normalize(k.reshape(B, T, H, K).float(), dim=-1, eps=1e-6).to(qkv.dtype)
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return q, k, v.reshape(B, T, H, V), g, torch.sigmoid(beta_logit.float())


def document_cu_seqlens(packed_seq_params, b: int, s: int) -> Optional[torch.Tensor]:
    """cu_seqlens over the flattened batch from packed_seq_params (or None)."""
    if packed_seq_params is None:
        return None
    fmt = getattr(packed_seq_params, "qkv_format", None)
    if fmt not in (None, "sbhd"):
        raise ValueError(
            "HAM/GDN mixers: packed_seq_params.qkv_format must be 'sbhd' (document boundaries "
            f"over the flattened batch, see document_forward_kwargs), got {fmt!r}"
        )
    cu = packed_seq_params.cu_seqlens_q
    cached_document_ids(packed_seq_params, b, s, cu.device)  # validates (once per forward)
    return cu.to(torch.int64)


class GDNMixer(MegatronModule):
    """Gated DeltaNet mixer (see the module docstring for layout and TP split)."""

    def __init__(
        self,
        config,
        submodules: GDNMixerSubmodules,
        layer_number: Optional[int] = None,
        pg_collection=None,
        options: Optional[MixerOptions] = None,
        **kwargs,  # cp_comm_type, pp_layer_offset, name, ... (0.16 .. 0.19)
    ):
        super().__init__(config)
        self.config = config
        self.layer_number = layer_number
        self.opts = options if options is not None else MixerOptions()
        self.tp_group = _tp_group(pg_collection)
        self.tp = self.tp_group.size() if self.tp_group is not None else 1
        self.tp_rank = self.tp_group.rank() if self.tp_group is not None else 0
        o = self.opts
        if o.num_heads % self.tp:
            raise ValueError(
                f"mixer num_heads={o.num_heads} must be divisible by "
                f"tensor_model_parallel_size={self.tp}"
            )
        if getattr(config, "context_parallel_size", 1) != 1:
            raise ValueError("HAM/GDN mixers: context_parallel_size must be 1")
        self.H, self.K, self.V = o.num_heads, o.key_head_dim, o.value_head_dim
        self.H_l = self.H // self.tp
        self.hidden_size = config.hidden_size
        self.sp = bool(config.sequence_parallel)

        self.sections = self._sections()  # [(name, per-head width)]
        in_dim = sum(w for _, w in self.sections) * self.H
        self.in_proj = build_module(
            submodules.in_proj,
            self.hidden_size,
            in_dim,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="fc1",
            tp_group=self.tp_group,
        )
        dev, dt = _device(config), config.params_dtype
        self.conv_sections = [("q", self.K), ("k", self.K), ("v", self.V)]
        c_l = self.H_l * (2 * self.K + self.V)
        with torch.random.fork_rng(devices=[]):  # its default init would consume the RNG by
            self.conv1d = nn.Conv1d(  # the LOCAL size; reset_parameters() draws it layout-free
                c_l, c_l, kernel_size=o.conv_kernel, groups=c_l, bias=False, device=dev, dtype=dt
            )
        self.A_log = nn.Parameter(torch.empty(self.H_l, device=dev, dtype=dt))
        self.dt_bias = nn.Parameter(torch.empty(self.H_l, device=dev, dtype=dt))
        self.norm_weight = nn.Parameter(torch.ones(self.V, device=dev, dtype=dt))
        for p in (self.conv1d.weight, self.A_log, self.dt_bias):
            setattr(p, "tensor_model_parallel", True)
            setattr(p, "partition_dim", 0)
            setattr(p, "partition_stride", 1)
        self.out_proj = build_module(
            submodules.out_proj,
            self.H * self.V,
            self.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="fc2",
            tp_group=self.tp_group,
        )
        self.reset_parameters()

    # ------------------------------------------------------------------ layout
    def _sections(self) -> List[Tuple[str, int]]:
        """Per-head widths of the in_proj output sections (each rank: H_l heads of each)."""
        return [("q", self.K), ("k", self.K), ("v", self.V), ("z", self.V), ("beta", 1), ("a", 1)]

    def _full_then_local(self, shape_per_head, init) -> torch.Tensor:
        """Draw the FULL tensor [H*w, ...] from the default RNG and keep this rank's heads, so
        initialisation does not depend on the TP layout."""
        w, rest = shape_per_head[0], tuple(shape_per_head[1:])
        full = torch.empty((self.H * w,) + rest, dtype=torch.float32)
        init(full)
        lo = self.tp_rank * self.H_l * w
        return full[lo : lo + self.H_l * w]

    @torch.no_grad()
    def reset_parameters(self):
        """Layout-independent init (every rank draws the full tensors from the default RNG,
        identical over TP ranks, and keeps its heads): in_proj sections with config.init_method,
        conv weight U(-1/sqrt(kernel), 1/sqrt(kernel)) (nn.Conv1d's default), A ~ U[A_init_min,
        A_init_max], dt_bias = inverse-softplus of dt ~ logU[1e-3, 1e-1] (as fla / Mamba)."""
        if not getattr(self.config, "perform_initialization", True):
            return
        o = self.opts
        local = []
        for name, w in self.sections:
            local.append(self._full_then_local((w, self.hidden_size), self.config.init_method))
        self.in_proj.weight.data.copy_(torch.cat(local, 0).to(self.in_proj.weight.device))
        bound = 1.0 / math.sqrt(o.conv_kernel)
        conv = [
            self._full_then_local((w, 1, o.conv_kernel), lambda t: t.uniform_(-bound, bound))
            for _, w in self.conv_sections
        ]
        self.conv1d.weight.data.copy_(torch.cat(conv, 0).to(self.conv1d.weight.device))
        A = self._full_then_local((1,), lambda t: t.uniform_(o.A_init_min, o.A_init_max))
        self.A_log.data.copy_(torch.log(A).to(self.A_log.device))

        def _dt(t):
            dtv = torch.exp(t.uniform_() * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            t.copy_(dtv + torch.log(-torch.expm1(-dtv)))

        self.dt_bias.data.copy_(self._full_then_local((1,), _dt).to(self.dt_bias.device))
        self.norm_weight.data.fill_(1.0)

    # ------------------------------------------------------------------ pieces
    def _fused(self, fn):
        """`fn`, compiled when the model's fusions are on (megatron_ham.layers.fusion)."""
        return maybe_compiled(fn, self.opts.fuse_elementwise)

    def _project(self, hidden_states, packed_seq_params):
        """in_proj + conv + activations. Returns dict of [B, T, H_l, *] tensors (B, T after
        optional flattening of documents), plus cu_seqlens and the shape (s, b)."""
        proj, _ = self.in_proj(hidden_states)  # [s, b, D_l] (sequence gathered under SP)
        s, b = proj.shape[:2]
        cu = document_cu_seqlens(packed_seq_params, b, s)
        doc = None
        if cu is not None:
            doc = cached_document_ids(packed_seq_params, b, s, proj.device)
        proj = proj.transpose(0, 1)  # [b, s, D_l]
        widths = [w * self.H_l for _, w in self.sections]
        parts = dict(zip([n for n, _ in self.sections], torch.split(proj, widths, dim=-1)))
        qkv = torch.cat([parts["q"], parts["k"], parts["v"]], dim=-1)
        w = self.conv1d.weight[:, 0, :]  # [C_l, kernel]; tap kernel-1 is the current token
        qkv = self._fused(causal_conv_silu)(qkv, w, doc)
        q, k, v, g, beta = self._fused(gdn_activations)(
            qkv, parts["a"], parts["beta"], self.A_log, self.dt_bias, self.H_l, self.K, self.V)
        out = dict(q=q, k=k, v=v, g=g, beta=beta, z=parts["z"].reshape(b, s, self.H_l, self.V))
        for name, w in self.sections:
            if name not in ("q", "k", "v", "z", "beta", "a"):
                out[name] = parts[name]
        if cu is not None:  # documents: one row [1, b*s] with cu_seqlens
            out = {n: t.reshape((1, b * s) + t.shape[2:]) for n, t in out.items()}
        return out, cu, s, b

    def _norm_weight(self) -> torch.Tensor:
        return all_reduce_backward(self.norm_weight, self.tp_group)

    def _output(self, y: torch.Tensor, s: int, b: int):
        """y [B, T, H_l, V] -> out_proj -> (out [s(/tp), b, h], bias)."""
        y = y.reshape(b, s, self.H_l * self.V).transpose(0, 1).contiguous()
        return self.out_proj(y)

    def _recurrent(self, t, cu, return_error=False, error_metric="l2"):
        from megatron_ham.ops import gated_delta_rule

        o, _, err = gated_delta_rule(
            t["q"], t["k"], t["v"], t["g"], t["beta"],
            return_error=return_error, error_metric=error_metric,
            cu_seqlens=cu, impl=self.opts.impl,
        )
        return o, err

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        key_value_states=None,
        inference_context=None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        attention_bias=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        **kwargs,
    ):
        """hidden_states [s(/tp), b, h] -> (out [s(/tp), b, h], bias). attention_mask and RoPE
        arguments are ignored (the recurrence is causal and position-aware by itself)."""
        if inference_context is not None or kwargs.get("inference_params") is not None:
            raise NotImplementedError("GDN/HAM mixers: Megatron inference contexts are not supported")
        t, cu, s, b = self._project(hidden_states, packed_seq_params)
        o, _ = self._recurrent(t, cu)
        y = self._fused(gated_rms_norm)(o, t["z"], self._norm_weight(), eps=self.opts.norm_eps)
        return self._output(y.to(hidden_states.dtype), s, b)

    # ------------------------------------------------------------------ checkpoint
    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None, **kwargs):
        """TP-layout independent: see the module docstring."""
        from megatron.core.transformer.utils import (
            make_sharded_tensors_for_checkpoint,
            sharded_state_dict_default,
        )

        metadata = _ensure_dp_cp(metadata)
        extra = {}
        if "dp_cp_group" in _msft_params():
            extra["dp_cp_group"] = metadata["dp_cp_group"]
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        conv = {"conv1d.weight": self.conv1d.weight}
        own.update(conv)
        axis = {"A_log": 0, "dt_bias": 0, "conv1d.weight": 0}
        sd = make_sharded_tensors_for_checkpoint(
            own, prefix, axis, sharded_offsets, tp_group=self.tp_group, **extra
        )
        for name, child in self.named_children():
            if name == "conv1d":
                continue
            sd.update(
                sharded_state_dict_default(
                    child, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group
                )
            )
        key = f"{prefix}in_proj.weight"
        sd[key] = section_factory(
            sd[key], [w * self.H_l for _, w in self.sections], [n for n, _ in self.sections], 0
        )
        key = f"{prefix}conv1d.weight"
        sd[key] = section_factory(
            sd[key], [w * self.H_l for _, w in self.conv_sections],
            [n for n, _ in self.conv_sections], 0,
        )
        return sd


def _ensure_dp_cp(metadata):
    from megatron.core import parallel_state

    metadata = dict(metadata) if metadata else {}
    if "dp_cp_group" not in metadata:
        metadata["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return metadata


def _msft_params():
    import inspect

    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    return inspect.signature(make_sharded_tensors_for_checkpoint).parameters
