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
           (the SiLU applied with the activations, see _conv)
           (weight [C_l, 1, kernel], C_l = H_l*(2K+V)); it does not cross document boundaries.
  A_log, dt_bias  [H_l]: g = -exp(A_log) * softplus(a + dt_bias) (log decay), beta = sigmoid(.)
  norm weight [V] replicated: gated per-head RMSNorm; its gradient is all-reduced over TP in
           backward (all_reduce_backward), so it is the full gradient on every rank.
  out_proj RowParallelLinear(H*V -> h), input_is_parallel=True; under SP it reduce-scatters.
The kernel layout is [B, T, H_l, D] (fla's). q, k are L2-normalised per head.

The section table (in_proj q, k, v, z, beta, a; conv1d q, k, v) is the GDN layer kind's
(megatron_ham/layers/kinds/gdn.py); SectionedMixer turns it into the TP split, the
layout-independent init and the checkpoint: A_log, dt_bias, conv1d.weight are saved TP-split,
in_proj.weight as named sections (in_proj.weight.q, .k, .v, .z, .beta, .a, ...) and conv1d.weight
as (.q, .k, .v), each its own TP-sharded tensor: a checkpoint is independent of the TP layout.

Settings come from the ModelConfig (spec params `model_config=`): mixer_num_heads,
mixer_key_head_dim, mixer_value_head_dim, conv_kernel, mixer_norm_eps, impl, fusions.

Documents: packed_seq_params (qkv_format "sbhd") with cu_seqlens_q over the flattened batch
(index = batch_index * s + position) restarts the state (and the conv) at every document; the
batch is flattened to one row [1, b*s] for the kernels. See docs/parallelism.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_ham.ops.combine import gated_rms_norm
from megatron_ham.ops.gdn_activations import decay_and_beta, gdn_activations, qkv_activations, qkv_impl
from megatron_ham.ops.short_conv import causal_conv_silu, conv_impl

from .documents import cached_document_ids, document_cu_seqlens, host_cu_seqlens
from .fusion import maybe_compiled
from .sectioned import SectionedMixer, param_device
from .tp_utils import all_reduce_backward


@dataclass
class GDNMixerSubmodules:
    """in_proj: column-parallel linear; out_proj: row-parallel linear."""

    in_proj: Union[ModuleSpec, type] = IdentityOp
    out_proj: Union[ModuleSpec, type] = IdentityOp


def activations_recomputed(qkv, a, beta_logit, A_log, dt_bias, H: int, K: int, V: int):
    """``gdn_activations(silu=True)`` on the conv's pre-activation, recomputed in its backward
    (non-reentrant checkpoint): the mixers' path where the Triton kernels do not run. Compiled
    with the fusions, its backward redoes the SiLU and the norms from the pre-activation, and only
    that is kept for it (what the compiler kept otherwise cost 3.1 GiB more on ham_800m,
    docs/benchmarks.md 2026-12-03)."""
    return checkpoint(gdn_activations, qkv, a, beta_logit, A_log, dt_bias, H, K, V, True,
                      use_reentrant=False, preserve_rng_state=False)


#: decay-rate init A ~ U[A_INIT_MIN, A_INIT_MAX], A_log = log A (as fla / Megatron)
A_INIT_MIN, A_INIT_MAX = 1.0, 16.0


class GDNMixer(SectionedMixer):
    """Gated DeltaNet mixer (see the module docstring for layout and TP split)."""

    #: readers of q, k, v: the recurrent state (HAMMixer: and the scratchpad, whose copies
    #: "q2", "k2", "v2" let the q/k/v kernel add the two gradients, ops.qkv_activations)
    qkv_branches = 1

    tp_split = {"A_log": 0, "dt_bias": 0, "conv1d.weight": 0}

    def __init__(
        self,
        config,
        submodules: GDNMixerSubmodules,
        layer_number: Optional[int] = None,
        pg_collection=None,
        kind=None,
        model_config=None,
        **kwargs,  # cp_comm_type, pp_layer_offset, name, ... (0.16 .. 0.19)
    ):
        c = model_config
        super().__init__(config, kind, c, c.mixer_num_heads, pg_collection)
        self.layer_number = layer_number
        if getattr(config, "context_parallel_size", 1) != 1:
            raise ValueError("HAM/GDN mixers: context_parallel_size must be 1")
        self.H, self.K, self.V = c.mixer_num_heads, c.mixer_key_head_dim, c.mixer_value_head_dim
        self.H_l = self.units_local
        self.conv_kernel = c.conv_kernel
        self.conv_init = c.conv_init
        self.norm_eps = float(c.mixer_norm_eps)
        self.impl = c.impl
        self.fuse_elementwise = c.resolved_fusions()
        self.hidden_size = config.hidden_size
        self.sp = bool(config.sequence_parallel)
        # parameters in this order (the distributed optimizer's buffers follow it)
        self.in_proj = build_module(
            submodules.in_proj,
            self.hidden_size,
            self.fused["in_proj.weight"].rows,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="fc1",
            tp_group=self.tp_group,
        )
        dev, dt = param_device(config), config.params_dtype
        c_l = sum(self.local_widths("conv1d.weight"))
        with torch.random.fork_rng(devices=[]):  # its default init would consume the RNG by
            self.conv1d = nn.Conv1d(  # the LOCAL size; reset_parameters() draws it layout-free
                c_l, c_l, kernel_size=self.conv_kernel, groups=c_l, bias=False, device=dev, dtype=dt
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

    @torch.no_grad()
    def reset_parameters(self):
        """Layout-independent init (every rank draws the full tensors from the default RNG,
        identical over TP ranks, and keeps its heads): in_proj sections with config.init_method,
        conv weight U(-1/sqrt(kernel), 1/sqrt(kernel)) (nn.Conv1d's default), A ~ U[A_init_min,
        A_init_max] = U[1, 16], dt_bias = inverse-softplus of dt ~ logU[1e-3, 1e-1] (as fla /
        Mamba). conv_init "shift" then overwrites the conv (the RNG draws stay the same): k's
        channels = the previous token (tap kernel-2), the other channels = the current token
        (tap kernel-1), every other tap 0."""
        if not getattr(self.config, "perform_initialization", True):
            return
        self.init_fused("in_proj.weight", self.config.init_method)
        bound = 1.0 / math.sqrt(self.conv_kernel)
        self.init_fused("conv1d.weight", lambda t: t.uniform_(-bound, bound))
        if self.conv_init == "shift":
            self._shift_conv_init()
        A = self.full_then_local((1,), lambda t: t.uniform_(A_INIT_MIN, A_INIT_MAX))
        self.A_log.data.copy_(torch.log(A).to(self.A_log.device))

        def _dt(t):
            dtv = torch.exp(t.uniform_() * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            t.copy_(dtv + torch.log(-torch.expm1(-dtv)))

        self.dt_bias.data.copy_(self.full_then_local((1,), _dt).to(self.dt_bias.device))
        self.norm_weight.data.fill_(1.0)

    @torch.no_grad()
    def _shift_conv_init(self):
        """conv_init "shift": the conv starts as the one-layer recall circuit (a key written at
        a value's position is the token before it, queries and values are the token itself)."""
        w = self.conv1d.weight  # [C_l, 1, kernel]; tap kernel-1 is the current token
        W = self.conv_kernel
        w.zero_()
        off = 0
        for name, width in zip(self.section_names("conv1d.weight"), self.local_widths("conv1d.weight")):
            tap = W - 2 if name == "k" and W >= 2 else W - 1
            w[off:off + width, 0, tap] = 1.0
            off += width

    # ------------------------------------------------------------------ pieces
    def _fused(self, fn):
        """`fn`, compiled when the model's fusions are on (megatron_ham.layers.fusion)."""
        return maybe_compiled(fn, self.fuse_elementwise)

    def _project(self, hidden_states, packed_seq_params):
        """in_proj + conv + activations. Returns dict of [B, T, H_l, *] tensors (B, T after
        optional flattening of documents), plus cu_seqlens and the shape (s, b)."""
        proj, _ = self.in_proj(hidden_states)  # [s, b, D_l] (sequence gathered under SP)
        s, b = proj.shape[:2]
        cu = document_cu_seqlens(packed_seq_params, b, s)
        proj = proj.transpose(0, 1)  # [b, s, D_l]
        parts = self._split_sections(proj)  # views; "qkv" one view when q, k, v are adjacent
        qkv = parts.pop("qkv", None)
        if qkv is None:
            qkv = torch.cat([parts["q"], parts["k"], parts["v"]], dim=-1)
        qkv = self._conv(qkv, cu, packed_seq_params)  # the pre-activation: SiLU in the next line
        out = self._activations(qkv, parts["a"], parts["beta"])  # q, k, v, g, beta (, q2, k2, v2)
        if "z" in parts:  # the output gate (model.output_gate "silu")
            out["z"] = parts["z"].reshape(b, s, self.H_l, self.V)
        for name in parts:
            if name not in ("q", "k", "v", "z", "beta", "a"):
                out[name] = parts[name]
        if cu is not None:  # documents: one row [1, b*s] with cu_seqlens
            out = {n: t.reshape((1, b * s) + t.shape[2:]) for n, t in out.items()}
        return out, cu, s, b

    def _conv(self, qkv: torch.Tensor, cu: Optional[torch.Tensor], packed_seq_params):
        """The causal short conv of q, k, v [b, s, C_l], WITHOUT its SiLU (_activations applies
        it with the q/k norms: fla's backward would otherwise recompute the conv and re-read it
        at every tap): fla's Triton kernel where it runs (ops.short_conv.conv_impl;
        documents as the boundaries of the flattened batch), else the reference, compiled with
        the fusions (documents as ids)."""
        w = self.conv1d.weight[:, 0, :]  # [C_l, kernel]; tap kernel-1 is the current token
        b, s, c = qkv.shape
        if conv_impl(qkv, "auto" if self.impl in ("auto", "fla") else "reference") == "reference":
            doc = None if cu is None else cached_document_ids(packed_seq_params, b, s, qkv.device)
            return self._fused(causal_conv_silu)(qkv, w, doc, impl="reference", silu=False)
        if cu is None:
            return causal_conv_silu(qkv, w, impl="fla", silu=False)
        return causal_conv_silu(qkv.reshape(1, b * s, c), w, cu_seqlens=cu, impl="fla", silu=False,
                                cu_seqlens_cpu=host_cu_seqlens(packed_seq_params)).view(b, s, c)

    def _activations(self, qkv: torch.Tensor, a: torch.Tensor, beta_logit: torch.Tensor) -> dict:
        """SiLU + norms of the conv's pre-activation qkv [b, s, C_l], and the decay and beta
        (ops.gdn_activations) -> dict q, k, v, g, beta, and q2, k2, v2 (the same values, a copy
        per reader) when qkv_branches is 2: our Triton kernels for q, k, v where they run (impl
        auto/fla; ops.qkv_activations), the decay and beta compiled with the fusions; elsewhere
        the reference, recomputed in backward (activations_recomputed), compiled with the fusions."""
        if qkv_impl(qkv, "auto" if self.impl in ("auto", "fla") else "reference") == "triton":
            qkv_out = qkv_activations(qkv, self.H_l, self.K, self.V, silu=True, impl="triton",
                                      branches=self.qkv_branches)
            g, beta = self._fused(decay_and_beta)(a, beta_logit, self.A_log, self.dt_bias)
        else:
            q, k, v, g, beta = self._fused(activations_recomputed)(qkv, a, beta_logit, self.A_log, self.dt_bias,
                                                                   self.H_l, self.K, self.V)
            qkv_out = (q, k, v) * self.qkv_branches
        names = ("q", "k", "v", "q2", "k2", "v2")[:len(qkv_out)]
        return dict(zip(names, qkv_out), g=g, beta=beta)

    def _split_sections(self, proj: torch.Tensor) -> dict:
        """The in-projection's sections as views of proj (one torch.split, so the backward
        writes proj's gradient in one concatenation). q, k, v adjacent in that order come out
        as ONE view "qkv" (the conv's input, read in place: no concatenation either way)."""
        names, widths = self.section_names("in_proj.weight"), self.local_widths("in_proj.weight")
        if names[:3] == ["q", "k", "v"]:
            names, widths = ["qkv"] + names[3:], [sum(widths[:3])] + widths[3:]
        return dict(zip(names, torch.split(proj, widths, dim=-1)))

    def _norm_weight(self) -> torch.Tensor:
        return all_reduce_backward(self.norm_weight, self.tp_group)

    def _output(self, y: torch.Tensor, s: int, b: int):
        """y [B, T, H_l, V] -> out_proj -> (out [s(/tp), b, h], bias)."""
        y = y.reshape(b, s, self.H_l * self.V).transpose(0, 1).contiguous()
        return self.out_proj(y)

    def _recurrent(self, t, cu, packed_seq_params, return_error=False, error_metric="l2"):
        from megatron_ham.ops import gated_delta_rule

        o, _, err = gated_delta_rule(
            t["q"], t["k"], t["v"], t["g"], t["beta"],
            return_error=return_error, error_metric=error_metric,
            cu_seqlens=cu, cu_seqlens_cpu=host_cu_seqlens(packed_seq_params), impl=self.impl,
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
        o, _ = self._recurrent(t, cu, packed_seq_params)
        y = self._fused(gated_rms_norm)(o, t.get("z"), self._norm_weight(), eps=self.norm_eps)
        return self._output(y.to(hidden_states.dtype), s, b)
