"""HAMMixer: Hybrid Associative Memory sequence mixer (GDN state + routed KV scratchpad).

Extends GDNMixer (same in_proj / conv / state; see its docstring for layout and TP split) with:
  - two more in_proj sections per head: gate_rnn, gate_kv (independent sigmoid gates; the HAM
    layer kind's section table, megatron_ham/layers/kinds/ham.py);
  - the scratchpad: causal softmax attention over the ROUTED tokens only, with the SAME q, k, v
    as the state (one set of associations stored twice; decision, docs/parallelism.md); no RoPE
    (NoPE scratchpad: the conv and the state carry position); q, k L2-normalised so the softmax
    scale defaults to sqrt(K);
  - routing per token, identical on every TP rank:
      "error_l2" / "error_cosine": score_t = min over ALL heads of the state's prediction error,
          the local min all-reduced (MIN) over the TP group; no gradient through routing.
      "learned": r_t = sigmoid(z_t), z_t = LearnedRouter.logits(x_t) on the full (SP-gathered)
          layer input, replicated on TP ranks; routed values are scaled by r
          (router_weighted_values) so the LM loss trains it; dL/dr is all-reduced over TP (each
          rank only sees its heads), so the router's parameter gradient is the full one on every
          rank. With router_input "hidden+error", z += w * log(e), e = the min over heads of
          the l2 prediction error (as the error router's score, detached). The score is z
          (router_score "logit"; the controller then works in linear space)
          or r ("sigmoid").
      "random": the ablation: score_t = uniform_hash(router_seed, layer, sample, position) in (0, 1)
          (ops.routing.random_router_scores), independent of the content; sample = 0 in eval
          mode, in training a key of (optimizer step, data-parallel rank, row), the same in a
          recomputed forward; position = index in the row. No gradient, values unscaled.
      routed_t = score_t >= tau, tau = this layer's KVFractionController buffer (in the checkpoint);
      in training with model.train_routing "batch", tau = the quantile of this micro-batch's
      scores at 1 - kv_fraction instead (exactly f routed per layer; the buffer still tracks the
      quantile, for inference).
  - output: gated_combine(o_rnn, o_kv, gate_rnn, gate_kv, z, norm_weight) -> out_proj (z None
    with model.output_gate "none").

Controller protocol: in training mode forward() only RECORDS the detached per-token scores
[b, s] (tau is not touched, so it is constant within a step and robust to recomputation and
micro-batching; the recomputed forward that activation checkpointing runs inside backward is
not recorded again); step_kv_controllers() (megatron_ham/layers/kinds/ham.py) updates every layer
once per optimizer step from what was recorded. In eval mode nothing is recorded.

Settings (ModelConfig, besides the GDN ones): kv_fraction, router, router_hidden_size,
router_seed, router_score, router_input, scratchpad_scale, scratchpad_impl, controller_gain,
controller_warmup, train_routing.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .gdn_mixer import GDNMixer, GDNMixerSubmodules
from .tp_utils import all_reduce_backward


def _in_backward() -> bool:
    try:
        return torch._C._current_graph_task_id() != -1
    except Exception:  # pragma: no cover
        return False


class HAMMixer(GDNMixer):
    """HAM mixer: [s(/tp), b, h] -> (out [s(/tp), b, h], bias). See module docstring."""

    qkv_branches = 2  # the state reads q, k, v; the scratchpad reads q2, k2, v2

    def __init__(self, config, submodules: GDNMixerSubmodules, layer_number=None,
                 pg_collection=None, kind=None, model_config=None, **kwargs):
        super().__init__(config, submodules, layer_number=layer_number,
                         pg_collection=pg_collection, kind=kind, model_config=model_config, **kwargs)
        from megatron_ham.ops import KVFractionController, LearnedRouter

        c = model_config
        self.router_kind = c.router
        self.router_seed = int(c.router_seed)
        self.scratchpad_scale = float(c.scratchpad_scale) if c.scratchpad_scale > 0 else self.K ** 0.5
        self.scratchpad_impl = c.scratchpad_impl
        self.batch_routing = c.train_routing == "batch"
        self.score_is_logit = c.router == "learned" and c.router_score == "logit"
        self.kv_controller = KVFractionController(
            float(c.kv_fraction), gain=c.controller_gain, warmup=c.controller_warmup,
            space="linear" if self.score_is_logit else "log",
        )
        self.router = None
        if c.router == "learned":
            hid = c.router_hidden_size or None
            # default RNG: identical on every TP rank (replicated module)
            self.router = LearnedRouter(config.hidden_size, hid,
                                        error_feature=c.router_input == "hidden+error")
            # in the model's dtype (Megatron's distributed optimizer cannot checkpoint fp32
            # parameters in a bf16 model: megatron-core 0.19.2 asserts in its dp_reshardable
            # state); LearnedRouter computes its logits in fp32 whatever the dtype
            self.router.to(device=self.norm_weight.device, dtype=config.params_dtype)
        self._recorded: List[torch.Tensor] = []
        self.last_routed: Optional[torch.Tensor] = None  # [b, s] bool of the last forward

    # ---------------------------------------------------------------- controller protocol
    def pop_recorded_scores(self) -> Optional[torch.Tensor]:
        """Flattened scores recorded since the last call (None if none), and clear them."""
        if not self._recorded:
            return None
        out = torch.cat([r.reshape(-1) for r in self._recorded])
        self._recorded = []
        return out

    def _random_scores(self, s: int, b: int, device) -> torch.Tensor:
        """fp32 [b, s] scores of the random router (see the module docstring)."""
        from megatron_ham.ops.routing import random_router_scores

        rows = torch.zeros(b, dtype=torch.int64, device=device)
        if self.training:  # a fresh draw per (step, DP rank, row); stable under recomputation
            from megatron.core import parallel_state as ps

            dp = ps.get_data_parallel_world_size() if ps.model_parallel_is_initialized() else 1
            rank = ps.get_data_parallel_rank() if dp > 1 else 0
            key = (self.kv_controller.num_updates.to(device) + 1) * dp + rank  # 0-dim, no sync
            rows = key * b + torch.arange(b, dtype=torch.int64, device=device) + 1
        pos = torch.arange(s, dtype=torch.int64, device=device)
        return random_router_scores(self.router_seed, int(self.layer_number) - 1, rows, pos)

    def _scores(self, hidden_states, t, err, cu, s, b):
        from megatron_ham.ops import min_over_heads

        if self.router_kind == "random":
            r = self._random_scores(s, b, hidden_states.device)
            return (r.reshape(1, b * s) if cu is not None else r), None
        if err is not None:  # the error router's score, or the learned router's error feature
            grp = self.tp_group if self.tp > 1 else None
            err = min_over_heads(err.float(), group=grp).detach()  # [b, s] ([1, b*s] packed)
        if self.router is None:
            return err, None
        x = hidden_states
        if self.sp and self.tp > 1:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            # backward = split (not reduce-scatter): dL/dr is already summed over TP below
            x = gather_from_sequence_parallel_region(
                x, tensor_parallel_output_grad=False, group=self.tp_group
            )
        e = None if err is None else err.reshape(b, s).transpose(0, 1)  # [s, b] as x
        z = self.router.logits(x, e).transpose(0, 1)  # fp32 [s,b] -> [b,s]
        r = all_reduce_backward(torch.sigmoid(z), self.tp_group)
        if cu is not None:
            z, r = z.reshape(1, b * s), r.reshape(1, b * s)
        return (z if self.score_is_logit else r).detach().float(), r

    def forward(self, hidden_states, attention_mask=None, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, rotary_pos_cos=None,
                rotary_pos_sin=None, attention_bias=None, packed_seq_params=None,
                sequence_len_offset=None, **kwargs):
        """hidden_states [s(/tp), b, h] -> (out [s(/tp), b, h], bias)."""
        from megatron_ham.ops import gated_combine, route, scratchpad_attention
        from megatron_ham.ops.routing import router_weighted_values

        if inference_context is not None or kwargs.get("inference_params") is not None:
            raise NotImplementedError("HAMMixer: Megatron inference contexts are not supported")
        t, cu, s, b = self._project(hidden_states, packed_seq_params)
        want_err = self.router_kind.startswith("error") or (
            self.router is not None and self.router.error_weight is not None)
        metric = "cosine" if self.router_kind == "error_cosine" else "l2"
        o_rnn, err = self._recurrent(t, cu, packed_seq_params, return_error=want_err, error_metric=metric)
        scores, r = self._scores(hidden_states, t, err, cu, s, b)
        tau = self.kv_controller.tau
        if self.training and self.batch_routing:  # this micro-batch's own quantile (exact f)
            tau = self.kv_controller.batch_tau(scores)
        routed = route(scores, tau)
        # record once per micro-batch: a full-recompute checkpoint runs forward under no_grad,
        # then again inside backward (skipped here)
        if self.training and not _in_backward():
            self._recorded.append(scores.detach().reshape(b, s))
        self.last_scores = scores.detach().reshape(b, s)  # fp32 [b, s], for evaluation reports
        self.last_routed = routed.detach().reshape(b, s)
        v_kv = t["v2"]
        if r is not None:  # the learned router: routed values scaled by r (compiled with the fusions)
            v_kv = self._fused(router_weighted_values)(v_kv, r.to(v_kv.dtype), routed)
        o_kv = scratchpad_attention(t["q2"], t["k2"], v_kv, routed, scale=self.scratchpad_scale,
                                    cu_seqlens=cu, impl=self.scratchpad_impl)
        y = self._fused(gated_combine)(o_rnn, o_kv, t["gate_rnn"], t["gate_kv"], t.get("z"),
                                       self._norm_weight(), eps=self.norm_eps)
        return self._output(y.to(hidden_states.dtype), s, b)
