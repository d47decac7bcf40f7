"""HAMForCausalLM: plain-PyTorch Hugging Face model of an exported megatron-ham checkpoint.

Every built-in layer kind of the Megatron model (megatron_ham.models.build_model) has its module
here, built on megatron_ham.ops (through `ham_ops`: the same functions the Megatron layers call),
so fp32 logits match the Megatron model to ~1e-6. Which module a layer builds, and the section
table its projections come from, is the layer kind's (`layer_kinds`: the registry in the
package, a file written by ham-convert-hf in an export; a plugin kind brings its own module):

  embed_tokens -> [layer: x + mixer(norm(x)); x + mlp(norm(x))] * L -> norm -> lm_head
  mixer "*": attention, fused Megatron QKV split into q/k/v_proj, RoPE (non-interleaved, base
             rope_theta, positions = row positions), GQA, softmax scale 1/sqrt(head_dim).
  mixer "G": Gated DeltaNet (in_proj split into q/k/v/z/b/a_proj, depthwise causal conv + SiLU on
             q, k, v, L2-normalised q, k, g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b),
             gated per-head RMSNorm, o_proj).
  mixer "H": GDN + routed scratchpad: score per token (min over heads of the state's prediction
             error, or the learned router), routed = score >= tau, scratchpad_attention over the
             routed keys (with the cached ones as `past` when decoding), gated_combine.
  mlp: SwiGLU (Megatron's gated linear_fc1 split into gate_proj / up_proj), down_proj.

Layout inside the model: [B, T, hidden] (batch first; Megatron is [s, b, h]); mixer tensors are
[B, T, H, D] (fla's layout, what megatron_ham.ops takes). Single device, no tensor parallelism.

Documents: with config.reset_at_eod and config.eod_token_id set (as in training with
data.documents), the token after an EOD starts a new document: the state, conv, scratchpad and
attention restart there, as Megatron does with document_forward_kwargs.

Padding: `attention_mask` zeros mark tokens that are not there (left, right or anywhere). Every
layer skips them, so a row's real tokens give the logits they give alone: they are not routed,
not attention keys and not conv taps (ops: causal_conv_silu's mask), the recurrent state passes
them unchanged (ops: gated_delta_rule's mask, k = g = beta = 0), an EOD among them starts
nothing, and RoPE positions count a row's real tokens only. A padding position outputs what the
last real token before it output (so generate reads a right-padded row's next token at the last
column); leading padding outputs something finite and meaningless.

Cache (HAMCache, `past_key_values`): per layer, attention: the RoPE'd keys and values (+ a valid
mask); GDN / HAM: the last conv_kernel - 1 pre-conv q/k/v inputs and the recurrent state
[B, H, K, V] (fp32); HAM also the scratchpad: the routed keys / (router-weighted) values only,
compacted per batch row (+ a valid mask). Its size therefore follows the KV fraction. generate()
uses it: greedy, sampling and beam search (HAMCache.reorder_cache), on padded batches too.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_ham import HAMConfig
from .ham_ops import (
    LearnedRouter,
    apply_rope,
    causal_conv_silu,
    gated_combine,
    gated_delta_rule,
    gated_rms_norm,
    gdn_activations,
    hidden_norm,
    min_over_heads,
    random_router_scores,
    rope_cos_sin,
    route,
    router_weighted_values,
    scratchpad_attention,
)
from .layer_kinds import kind_sections, mixer_class, mixer_slot

# the outputs' cache field: `cache` in transformers >= 5.2x (which warns on the old name),
# `past_key_values` before
_CACHE_FIELD = ("cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
                else "past_key_values")

try:  # transformers >= 5: init functions that skip weights already loaded from a checkpoint
    from transformers import initialization as _init
except Exception:  # pragma: no cover
    _init = None


# ====================================================================================== cache
class HAMCache:
    """Inference state of every layer, for one batch of rows generated in lock step.

    seen: token columns processed so far, padding included (same for every row; what
        generate's get_seq_length asks).
    positions: int [B], the real tokens each row has seen (the RoPE position of its next token).
    attention layer i: keys[i] [B, L, n_kv, d] (after RoPE), values[i] [B, L, n_kv, d],
        valid[i] bool [B, L] (False for padding and for entries of a finished document).
    GDN / HAM layer i: conv[i] [B, conv_kernel - 1, C] (pre-conv q|k|v channels, C = H(2K + V);
        zero where the previous tokens belong to another document), state[i] fp32 [B, H, K, V].
    HAM layer i: keys[i] [B, N, H, K] / values[i] [B, N, H, V] are the ROUTED tokens only
        (values scaled by the router output for the learned router), compacted per row in
        position order, valid[i] [B, N]; N = the largest routed count over the rows.
    Everything stored is already reset for the next token: when a row's last token was an EOD
    (and config.reset_at_eod) its state / conv are zero and its keys are marked invalid.
    """

    def __init__(self, config: HAMConfig, batch_size: int):
        self.config = config
        self.batch_size = batch_size
        self.kinds = config.layer_kinds()
        n = len(self.kinds)
        self.seen = 0
        self.positions: Optional[torch.Tensor] = None
        self.keys: List[Optional[torch.Tensor]] = [None] * n
        self.values: List[Optional[torch.Tensor]] = [None] * n
        self.valid: List[Optional[torch.Tensor]] = [None] * n
        self.conv: List[Optional[torch.Tensor]] = [None] * n
        self.state: List[Optional[torch.Tensor]] = [None] * n

    # HF generation API ------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    # inspection --------------------------------------------------------------------------
    def kv_counts(self) -> List[Optional[torch.Tensor]]:
        """Per layer: int [B] entries held per row (routed tokens for HAM layers, tokens for
        attention layers), None for GDN layers (constant-size state)."""
        out = []
        for i in range(len(self.kinds)):
            out.append(None if self.valid[i] is None else self.valid[i].sum(1))
        return out

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row r continues from row beam_idx[r] (int [B]) of every layer's cache."""
        for store in (self.keys, self.values, self.valid, self.conv, self.state):
            for i, x in enumerate(store):
                if x is not None:
                    store[i] = x.index_select(0, beam_idx.to(x.device))
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def advance(self, counts: torch.Tensor, eods: Optional[torch.Tensor]) -> None:
        """After a chunk: counts int [B, T] (1 = a real token, 0 = padding), eods bool [B, T]
        (the real EODs; None without documents). Counts the columns and each row's real tokens,
        and starts a new document in the rows whose last real token is an EOD."""
        B, T = counts.shape
        self.seen += T
        n = counts.sum(1)
        self.positions = n if self.positions is None else self.positions + n
        if eods is not None and T > 0:
            last = (counts * torch.arange(1, T + 1, device=counts.device)).argmax(1)
            self.reset_rows(eods.gather(1, last[:, None])[:, 0])

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Start a new document in the rows where `rows` (bool [B]) is True."""
        if not bool(rows.any()):
            return
        for i in range(len(self.kinds)):
            if self.valid[i] is not None:
                self.valid[i] = self.valid[i] & ~rows[:, None]
            for store in (self.conv, self.state):
                if store[i] is not None:
                    store[i] = store[i].masked_fill(rows.view(-1, *([1] * (store[i].dim() - 1))), 0.0)


def _compact_cache(keys, values, valid):
    """Keep the valid entries of each row, in order, padded to the max count: returns
    (keys [B, N', ...], values [B, N', ...], valid [B, N'])."""
    B, L = valid.shape
    n = int(valid.sum(1).max()) if B else 0
    if n == L:
        return keys, values, valid
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :n]

    def take(x):
        return x.gather(1, order.view(B, n, *([1] * (x.dim() - 2))).expand(B, n, *x.shape[2:]))

    return take(keys), take(values), valid.gather(1, order)


def _after_last_real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, T, h] with each padding position (mask [B, T] False) holding the output of the last
    real token before it (leading padding keeps its own): the logits at the last column of a
    right-padded row are then the row's next-token prediction, as generate reads them."""
    B, T = mask.shape
    t = torch.arange(T, device=x.device).expand(B, T)
    src = torch.where(mask, t, torch.full_like(t, -1)).cummax(1).values
    src = torch.where(src < 0, t, src)
    return x.gather(1, src[..., None].expand_as(x))


# ====================================================================================== pieces
class HAMNorm(nn.Module):
    """RMSNorm or LayerNorm over the last dim: megatron_ham.ops.hidden_norm, as the Megatron
    layers' HAMNorm."""

    def __init__(self, hidden_size: int, eps: float, kind: str = "RMSNorm"):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = None if kind == "RMSNorm" else nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x):
        return hidden_norm(x, self.weight, self.bias, eps=self.eps)


class HAMMLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)) (Megatron gated linear_fc1 = [gate; up])."""

    def __init__(self, config: HAMConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _sectioned(module, config: HAMConfig, layer_idx: int, param: str, suffix: str, make):
    """Add `make(rows)` as `<HF name>_<suffix>` to `module` for every section of the fused Megatron
    parameter `param` of this layer's kind (its section table, kind_sections); returns the
    HF names in section order."""
    table = kind_sections(config, config.layer_kinds()[layer_idx])[param]
    for name, rows in table:
        module.add_module(f"{name}_{suffix}", make(rows))
    return [name for name, _ in table]


class HAMAttention(nn.Module):
    """Causal softmax attention with RoPE and grouped query heads (a Megatron '*' layer)."""

    def __init__(self, config: HAMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.nkv, self.d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.base = config.rope_theta
        h = config.hidden_size
        _sectioned(self, config, layer_idx, "linear_qkv.weight", "proj",  # q, k, v_proj
                   lambda rows: nn.Linear(h, rows, bias=False))
        self.o_proj = nn.Linear(self.nh * self.d, h, bias=False)

    def forward(self, x, doc, has_docs, cache: Optional[HAMCache], positions, mask):
        """x [B, T, h]; doc int [B, T] document index within this chunk (0 = the cached one);
        positions int [B, T] (RoPE); mask bool [B, T] (False: padding, never a key) or None."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.d)
        k = self.k_proj(x).view(B, T, self.nkv, self.d)
        v = self.v_proj(x).view(B, T, self.nkv, self.d)
        cos, sin = rope_cos_sin(self.d, self.base, positions)                    # [B, T, d]
        cos, sin = cos[:, :, None], sin[:, :, None]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        i = self.layer_idx
        old = cache is not None and cache.keys[i] is not None and cache.keys[i].shape[1] > 0
        keys, vals = (torch.cat([cache.keys[i], k], 1), torch.cat([cache.values[i], v], 1)) if old else (k, v)
        rep = self.nh // self.nkv
        qh = q.transpose(1, 2)
        kh = keys.transpose(1, 2).repeat_interleave(rep, dim=1)
        vh = vals.transpose(1, 2).repeat_interleave(rep, dim=1)
        scale = 1.0 / math.sqrt(self.d)
        if not old and not has_docs and mask is None:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=T > 1, scale=scale)
        else:
            t = torch.arange(T, device=x.device)
            seen = (t[:, None] >= t[None, :])[None] & (doc[:, :, None] == doc[:, None, :])  # [B, T, T]
            if mask is not None:  # padding is no key; a padding query sees itself (no empty softmax)
                seen = (seen & mask[:, None, :]) | ((t[:, None] == t[None, :])[None] & ~mask[:, :, None])
            if old:
                m_old = cache.valid[i][:, None, :] & (doc == 0)[:, :, None]
                seen = torch.cat([m_old, seen], dim=-1)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=seen[:, None], scale=scale)
        if cache is not None:
            last = doc[:, -1:]
            new_valid = doc == last  # tokens of the document that goes on
            if mask is not None:
                new_valid = new_valid & mask
            cache.keys[i], cache.values[i] = keys, vals
            cache.valid[i] = torch.cat([cache.valid[i] & (last == 0), new_valid], 1) if old else new_valid
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.nh * self.d))


class GDNMixer(nn.Module):
    """Gated DeltaNet mixer ('G'): projections from the kind's section table (q, k, v, z, b, a
    [, gate_rnn, gate_kv]_proj; q, k, v_conv1d), depthwise causal conv + SiLU on q, k, v,
    gdn_activations, the gated delta rule, the gated per-head RMSNorm, o_proj."""

    def __init__(self, config: HAMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        H, K, V = config.mixer_num_heads, config.mixer_key_head_dim, config.mixer_value_head_dim
        self.H, self.K, self.V = H, K, V
        h = config.hidden_size
        kern = config.conv_kernel
        _sectioned(self, config, layer_idx, "in_proj.weight", "proj", lambda rows: nn.Linear(h, rows, bias=False))
        self.conv_names = _sectioned(self, config, layer_idx, "conv1d.weight", "conv1d",
                                     lambda rows: nn.Conv1d(rows, rows, kern, groups=rows, bias=False))
        self.A_log = nn.Parameter(torch.zeros(H))
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.o_norm = nn.Module()
        self.o_norm.weight = nn.Parameter(torch.ones(V))
        self.o_proj = nn.Linear(H * V, h, bias=False)

    # ------------------------------------------------------------------ conv
    def _conv(self, x, doc, cache, mask):
        """x [B, T, C] pre-conv q|k|v -> SiLU(causal depthwise conv) [B, T, C]; taps never cross
        documents nor land on padding (mask False); the cached conv inputs (the last kern - 1
        real ones) belong to document 0 (zeros elsewhere)."""
        B, T, C = x.shape
        n = self.config.conv_kernel - 1
        w = torch.cat([getattr(self, f"{c}_conv1d").weight for c in self.conv_names], 0)[:, 0, :]
        i = self.layer_idx
        prev = cache.conv[i] if cache is not None and cache.conv[i] is not None else None
        if prev is None:
            prev = x.new_zeros(B, n, C)
        ext = torch.cat([prev.to(x.dtype), x], dim=1)  # [B, n+T, C]
        ext_doc = torch.cat([doc.new_zeros(B, n), doc], dim=1)
        ext_mask = None if mask is None else torch.cat([mask.new_ones(B, n), mask], dim=1)
        if cache is not None:
            L = ext.shape[1]
            last = torch.arange(L - n, L, device=x.device).expand(B, n)
            if ext_mask is not None:  # the last n real inputs (padding sorts first)
                last = torch.argsort(ext_mask.to(torch.int8), dim=1, stable=True)[:, L - n:]
            tail = ext.gather(1, last[..., None].expand(B, n, C))
            keep = ext_doc.gather(1, last) == doc[:, -1:]
            cache.conv[i] = tail * keep[..., None].to(tail.dtype)
        return causal_conv_silu(ext, w, ext_doc, ext_mask)[:, n:]

    # ------------------------------------------------------------------ the state
    def _state(self, x, doc, has_docs, cache: Optional[HAMCache], mask, return_error: bool = False):
        """x [B, T, h] -> dict of q, k [B,T,H,K], v, z (None without an output gate), o_rnn
        [B,T,H,V] and err [B,T,H] (None unless return_error); updates the cached conv and state. Padding (mask False) leaves
        the conv taps and the state as they are."""
        B, T, _ = x.shape
        H, K, V = self.H, self.K, self.V
        cfg = self.config
        i = self.layer_idx
        qkv = torch.cat([getattr(self, f"{n}_proj")(x) for n in self.conv_names], dim=-1)
        qkv = self._conv(qkv, doc, cache, mask)
        q, k, v, g, beta = gdn_activations(qkv, self.a_proj(x), self.b_proj(x), self.A_log,
                                           self.dt_bias, H, K, V)
        # documents -> one packed row [1, B*T] with cu_seqlens (as Megatron does)
        cu = None
        init = cache.state[i] if cache is not None else None
        if has_docs:
            starts = torch.zeros(B, T, dtype=torch.bool, device=x.device)
            starts[:, 0] = True
            starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
            flat = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
            cu = torch.cat([flat, flat.new_tensor([B * T])])
            if init is not None:  # first segment of each row continues that row's cache
                first = (flat % T == 0)
                row = flat // T
                z0 = init.new_zeros((len(flat),) + tuple(init.shape[1:]))
                z0[first] = init[row[first]]
                init = z0
        pk = lambda t: t.reshape((1, B * T) + tuple(t.shape[2:])) if cu is not None else t  # noqa: E731
        o_rnn, final, err = gated_delta_rule(
            pk(q), pk(k), pk(v), pk(g), pk(beta), initial_state=init,
            output_final_state=cache is not None, return_error=return_error,
            error_metric="cosine" if cfg.router == "error_cosine" else "l2",
            cu_seqlens=cu, mask=None if mask is None else pk(mask), impl="naive" if T == 1 else cfg.ops_impl,
        )
        if cache is not None:
            if cu is not None:  # last segment of each row
                last_seg = torch.searchsorted(cu[1:-1], torch.arange(1, B + 1, device=x.device) * T - 1,
                                              right=True)
                final = final[last_seg]
            cache.state[i] = final
        if cu is not None:
            o_rnn = o_rnn.reshape(B, T, H, V)
            err = err.reshape(B, T, H) if err is not None else None
        z = self.z_proj(x).reshape(B, T, H, V) if cfg.output_gate == "silu" else None
        return dict(q=q, k=k, v=v, z=z, o_rnn=o_rnn, err=err)

    def forward(self, x, doc, has_docs, cache: Optional[HAMCache], positions, mask):
        """x [B, T, h] (normed layer input) -> [B, T, h]. doc int [B, T]: document index within
        this chunk, 0 = the document the cache belongs to; mask bool [B, T] (False: padding) or
        None; positions (RoPE) unused."""
        B, T, _ = x.shape
        t = self._state(x, doc, has_docs, cache, mask)
        y = gated_rms_norm(t["o_rnn"], t["z"], self.o_norm.weight, eps=self.config.mixer_norm_eps)
        return self.o_proj(y.to(x.dtype).reshape(B, T, self.H * self.V))


class HAMMixer(GDNMixer):
    """The HAM mixer ('H'): the GDN state plus the routed KV scratchpad, sharing q, k, v; the
    scratchpad is megatron_ham.ops.scratchpad_attention, its cache (the routed keys so far) the
    op's `past`."""

    def __init__(self, config: HAMConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.router = None
        if config.router == "learned":
            self.router = LearnedRouter(config.hidden_size, config.router_hidden_size,
                                        error_feature=config.router_input == "hidden+error")
        self.tau = config.effective_tau(layer_idx)
        self.last_routed: Optional[torch.Tensor] = None  # bool [B, T] of the last forward
        self.last_scores: Optional[torch.Tensor] = None  # fp32 [B, T] of the last forward
        self.last_mask: Optional[torch.Tensor] = None  # bool [B, T] real tokens (None: all)

    def forward(self, x, doc, has_docs, cache: Optional[HAMCache], positions, mask):
        B, T, _ = x.shape
        i = self.layer_idx
        rand = self.config.router == "random"  # content-independent: the row position's hash
        # the prediction error: the error router's score, or the learned router's error feature
        with_err = (self.router.error_weight is not None) if self.router is not None else not rand
        t = self._state(x, doc, has_docs, cache, mask, return_error=with_err)
        q, k, v = t["q"], t["k"], t["v"]
        if rand:
            # positions count a row's real tokens, so padding does not change a row's draws
            scores, r = random_router_scores(self.config.router_seed, i, 0, positions), None
        elif self.router is None:
            scores, r = min_over_heads(t["err"].float()), None
        else:  # router_score "logit" thresholds z; "sigmoid" (exports before the field) r
            z = self.router.logits(x, min_over_heads(t["err"].float()) if with_err else None)
            r = torch.sigmoid(z)
            scores = (z if self.config.router_score == "logit" else r).detach().float()
        routed = route(scores, float(self.tau))
        if mask is not None:  # padding is never stored
            routed = routed & mask
        self.last_scores, self.last_routed, self.last_mask = scores, routed, mask
        v_kv = v if r is None else router_weighted_values(v, r.to(v.dtype), routed)
        old = cache is not None and cache.keys[i] is not None and bool(cache.valid[i].any())
        past = (cache.keys[i], cache.values[i], cache.valid[i]) if old else None
        o_kv = scratchpad_attention(q, k, v_kv, routed, scale=self.config.scratchpad_scale,
                                    doc_ids=doc if has_docs else None, past=past)
        if cache is not None:
            keep = routed & (doc == doc[:, -1:])  # routed tokens of the document that goes on
            if old:
                kk_, vv_, val_ = (torch.cat([cache.keys[i], k], 1), torch.cat([cache.values[i], v_kv], 1),
                                  torch.cat([cache.valid[i] & (doc[:, -1:] == 0), keep], 1))
            else:
                kk_, vv_, val_ = k, v_kv, keep
            cache.keys[i], cache.values[i], cache.valid[i] = _compact_cache(kk_, vv_, val_)
        y = gated_combine(t["o_rnn"], o_kv, self.gate_rnn_proj(x), self.gate_kv_proj(x), t["z"],
                          self.o_norm.weight, eps=self.config.mixer_norm_eps)
        return self.o_proj(y.to(x.dtype).reshape(B, T, self.H * self.V))


class HAMDecoderLayer(nn.Module):
    """x + mixer(input_layernorm(x)), then + mlp(post_attention_layernorm(.)); the mixer is the
    layer kind's HF module (mixer_class), held in its slot (`self_attn` for
    attention, `mixer` for the others)."""

    def __init__(self, config: HAMConfig, layer_idx: int):
        super().__init__()
        kind = config.layer_kinds()[layer_idx]
        self.kind = kind
        self.slot = mixer_slot(kind)
        eps, norm = config.rms_norm_eps, config.normalization
        self.input_layernorm = HAMNorm(config.hidden_size, eps, norm)
        self.add_module(self.slot, mixer_class(kind)(config, layer_idx))
        self.post_attention_layernorm = HAMNorm(config.hidden_size, eps, norm)
        self.mlp = HAMMLP(config)

    def forward(self, x, doc, has_docs, cache, positions, mask):
        mix = getattr(self, self.slot)
        x = x + mix(self.input_layernorm(x), doc, has_docs, cache, positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


# ====================================================================================== models
class HAMPreTrainedModel(PreTrainedModel):
    config_class = HAMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["HAMDecoderLayer"]
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own HAMCache

    @torch.no_grad()
    def _init_weights(self, module):
        """Fresh weights (only used when a weight is missing from a checkpoint): as Megatron's
        init (normal(0, initializer_range)), norms 1, A ~ U[1, 16] (A_log = log A), dt_bias
        the inverse softplus of 1e-2."""
        std = self.config.initializer_range
        normal = getattr(_init, "normal_", nn.init.normal_)
        ones = getattr(_init, "ones_", nn.init.ones_)
        zeros = getattr(_init, "zeros_", nn.init.zeros_)
        copy = getattr(_init, "copy_", lambda p, v: p.copy_(v))
        if isinstance(module, (nn.Linear, nn.Embedding)):
            normal(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                zeros(module.bias)
        elif isinstance(module, nn.Conv1d):
            normal(module.weight, mean=0.0, std=0.5)
        elif isinstance(module, HAMNorm):
            ones(module.weight)
            if module.bias is not None:
                zeros(module.bias)
        elif isinstance(module, GDNMixer):
            H = module.H
            copy(module.A_log, torch.log(torch.linspace(1.0, 16.0, H)))
            dt = torch.full((H,), 1e-2)
            copy(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))
            ones(module.o_norm.weight)


class HAMModel(HAMPreTrainedModel):
    """Embedding + decoder layers + final norm; returns hidden states [B, T, hidden]."""

    def __init__(self, config: HAMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HAMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = HAMNorm(config.hidden_size, config.rms_norm_eps, config.normalization)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _eods(self, input_ids, mask):
        """bool [B, T]: the real EOD tokens (None when documents do not reset)."""
        eod = self.config.eod_token_id
        if input_ids is None or eod is None or not self.config.reset_at_eod:
            return None
        return input_ids == eod if mask is None else (input_ids == eod) & mask

    @staticmethod
    def _documents(eods, B, T, device):
        """(doc int [B, T], has_docs): document index of each token within this chunk, the real
        EODs before it (padding belongs to the document of the real token before it)."""
        if eods is None:
            return torch.zeros(B, T, dtype=torch.long, device=device), False
        ends = eods.long()
        doc = ends.cumsum(1) - ends
        return doc, bool(doc[:, -1].any())

    @staticmethod
    def _padding(attention_mask, B: int, T: int, seen: int):
        """bool [B, T]: the chunk's real tokens from attention_mask [B, T] or [B, seen + T] (the
        columns before the chunk are the cache's); None when every token is real."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, seen + T):
            raise ValueError(f"attention_mask must have shape [B, T] = [{B}, {T}] or [B, past + T] = "
                             f"[{B}, {seen + T}] (1 = token, 0 = padding), got {list(attention_mask.shape)}")
        mask = attention_mask[:, attention_mask.shape[1] - T:] != 0
        return None if bool(mask.all()) else mask

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, return_dict=None, cache=None, **kwargs):
        """input_ids int [B, T] (or inputs_embeds [B, T, hidden]); attention_mask [B, T] or
        [B, past + T], 0 = padding (skipped by every layer, see the module docstring)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("HAMModel.forward: pass exactly one of input_ids [B, T] or inputs_embeds [B, T, hidden]")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [B, T], got {list(input_ids.shape)}")
        B, T = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        # transformers >= 5.2x passes the cache as `cache`, older versions as `past_key_values`
        cache = past_key_values if past_key_values is not None else cache
        if cache is not None and not isinstance(cache, HAMCache):
            raise ValueError(f"past_key_values must be a HAMCache (from a previous forward), got "
                             f"{type(cache).__name__}")
        if cache is None and use_cache:
            cache = HAMCache(self.config, B)
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"past_key_values holds {cache.batch_size} rows, input has {B}")
        mask = self._padding(attention_mask, B, T, cache.seen if cache is not None else 0)
        if inputs_embeds is None:  # a pad id may lie outside the vocabulary: padding embeds id 0
            x = self.embed_tokens(input_ids if mask is None else input_ids.masked_fill(~mask, 0))
        else:
            x = inputs_embeds
        eods = self._eods(input_ids, mask)
        doc, has_docs = self._documents(eods, B, T, x.device)
        counts = torch.ones(B, T, dtype=torch.long, device=x.device) if mask is None else mask.long()
        # RoPE positions: the real tokens of the row before each token (the cached ones first)
        positions = counts.cumsum(1) - counts
        if cache is not None and cache.positions is not None:
            positions = positions + cache.positions[:, None]
        hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if hidden is not None:
                hidden.append(x)
            x = layer(x, doc, has_docs, cache, positions, mask)
        x = self.norm(x)
        if mask is not None:
            x = _after_last_real(x, mask)
        if hidden is not None:
            hidden.append(x)
        if cache is not None:
            cache.advance(counts, eods)
        return BaseModelOutputWithPast(last_hidden_state=x, **{_CACHE_FIELD: cache if use_cache else None},
                                       hidden_states=tuple(hidden) if hidden is not None else None)


class HAMForCausalLM(HAMPreTrainedModel, GenerationMixin):
    """HAM language model with an LM head (tied to the embedding when config.tie_word_embeddings)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HAMConfig):
        super().__init__(config)
        self.model = HAMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # ------------------------------------------------------------------ inference controls
    def ham_mixers(self):
        """[(layer index, HAMMixer)] of the HAM layers."""
        return [(i, l.mixer) for i, l in enumerate(self.model.layers) if l.kind == "ham"]

    def set_tau(self, tau) -> None:
        """Override the routing threshold: a float for every HAM layer, or a list with one entry
        per layer (None keeps the current value). Also recorded in config.tau_override."""
        n = self.config.num_hidden_layers
        if isinstance(tau, (list, tuple)):
            if len(tau) != n:
                raise ValueError(f"set_tau: a list needs {n} entries (one per layer), got {len(tau)}")
            taus = list(tau)
        elif isinstance(tau, (int, float)) and not isinstance(tau, bool):
            taus = [float(tau)] * n
        else:
            raise ValueError(f"set_tau: expected a float or a list of {n} floats/None, got {tau!r}")
        cur = [None] * n
        for i, m in self.ham_mixers():
            if taus[i] is not None:
                m.tau = float(taus[i])
            cur[i] = m.tau
        self.config.tau_override = cur

    @torch.no_grad()
    def calibrate_kv_fraction(self, input_ids: torch.Tensor, kv_fraction) -> List[Optional[float]]:
        """Set every HAM layer's tau so that a fraction `kv_fraction` (float, or a list per layer)
        of the tokens of `input_ids` [B, T] is routed (the score quantile at 1 - fraction, as the
        controller's warm-up does; 1 -> -inf, 0 -> +inf). Layers are calibrated in order (each
        with the earlier layers already at their new tau). Returns the taus per layer."""
        n = self.config.num_hidden_layers
        fr = list(kv_fraction) if isinstance(kv_fraction, (list, tuple)) else [kv_fraction] * n
        if len(fr) != n:
            raise ValueError(f"calibrate_kv_fraction: a list needs {n} entries, got {len(fr)}")
        for i, m in self.ham_mixers():
            f = fr[i]
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
                raise ValueError(f"calibrate_kv_fraction: fraction for layer {i} must be in [0, 1], got {f!r}")
            if f >= 1.0:
                m.tau = -math.inf
                continue
            if f <= 0.0:
                m.tau = math.inf
                continue
            m.tau = -math.inf
            self.forward(input_ids, use_cache=False)
            s = m.last_scores.reshape(-1).double().sort(descending=True).values
            n_top = min(max(int(round(f * s.numel())), 1), s.numel())
            # halfway between the n_top-th largest score and the next one: no score sits on tau
            nxt = s[n_top] if n_top < s.numel() else s[-1] - 1.0
            m.tau = float((s[n_top - 1] + nxt) / 2)
        taus = [None] * n
        for i, m in self.ham_mixers():
            taus[i] = m.tau
        self.config.tau_override = taus
        return taus

    def routed_fractions(self) -> List[Optional[float]]:
        """Per layer, the fraction of tokens routed to the scratchpad in the last forward
        (None for non-HAM layers)."""
        out = [None] * self.config.num_hidden_layers
        for i, m in self.ham_mixers():
            if m.last_routed is not None:
                routed = m.last_routed if m.last_mask is None else m.last_routed[m.last_mask]
                out[i] = float(routed.float().mean())
        return out

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory, *args, **kwargs):
        """As PreTrainedModel.save_pretrained, and the directory stays loadable with
        trust_remote_code=True: auto_map is written, and when this class comes from the
        megatron_ham package (not from remote code, which transformers copies itself) the
        modeling code and the ops files are copied next to the weights."""
        self.config.auto_map = {"AutoConfig": "configuration_ham.HAMConfig",
                                "AutoModel": "modeling_ham.HAMModel",
                                "AutoModelForCausalLM": "modeling_ham.HAMForCausalLM"}
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if getattr(self, "_auto_class", None) is None:
            try:
                from megatron_ham.hf.convert import write_code
            except ImportError:  # remote code without the package: nothing to add
                return out
            write_code(str(save_directory), self.config)
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, output_hidden_states=None, return_dict=None,
                logits_to_keep: int = 0, cache=None, **kwargs):
        """input_ids int [B, T] -> CausalLMOutputWithPast(logits [B, T, vocab], past_key_values =
        HAMCache when use_cache). labels [B, T]: next-token loss (shifted inside, -100 ignored)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, output_hidden_states=output_hidden_states, cache=cache)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: out.get(_CACHE_FIELD)},
                                      hidden_states=out.hidden_states)


__all__ = ["HAMForCausalLM", "HAMModel", "HAMPreTrainedModel", "HAMCache"]
