"""HAMConfig: the Hugging Face configuration of an exported megatron-ham model.

Written by `ham-convert-hf` from the checkpoint's ModelConfig (megatron_ham.models.ModelConfig)
and the per-layer KV-fraction controller state; this file is also copied into every export
directory (loaded there with `trust_remote_code=True`, without megatron_ham installed), so it
imports nothing but transformers.

Layer pattern: one symbol per layer, "H" = HAM mixer (Gated DeltaNet state + routed KV
scratchpad), "G" = Gated DeltaNet mixer, "*" = softmax attention with RoPE (`kind_symbols`
names the layer kind of each symbol: the export's registered kinds); every mixer is followed by
a SwiGLU MLP (pre-norm residual blocks, as Megatron's TransformerLayer).

Written by one function, megatron_ham.hf.convert.hf_config_from (from the ModelConfig: the
model-wide fields, then each layer kind's LayerKind.hf_settings), so its rules are the
ModelConfig's, checked there; `check()` only checks what is set here (pattern, taus, EOD).

Routing thresholds at inference: `ham_taus[i]` is layer i's tau from the checkpoint (None for
non-HAM layers; -inf routes every token, +inf none). `tau_override` replaces them: a float (all
HAM layers) or a list with one entry per layer (None keeps the checkpoint's tau). See
docs/export.md, and `HAMForCausalLM.set_tau` / `calibrate_kv_fraction` to change them after
loading.
"""
from __future__ import annotations

import math

from transformers import PretrainedConfig

#: kind_symbols of exports written before the field existed (the three built-in kinds)
BUILTIN_KIND_SYMBOLS = {"H": "ham", "G": "gdn", "*": "attention"}


def _as_tau(value, where: str):
    """float (inf allowed) or None; strings 'inf' / '-inf' accepted."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where}: expected a float or None, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a float or None, got {value!r}")
    if math.isnan(float(value)):
        raise ValueError(f"{where}: expected a float or None (not NaN), got {value!r}")
    return float(value)


class HAMConfig(PretrainedConfig):
    """Configuration of HAMForCausalLM.

    Sizes: vocab_size (the real vocabulary; Megatron's padding rows are dropped at export),
    hidden_size, intermediate_size (SwiGLU width), num_hidden_layers == len(layer_pattern).
    Attention ("*"): num_attention_heads, num_key_value_heads (GQA groups), head_dim, rope_theta.
    HAM / GDN ("H", "G"): mixer_num_heads, mixer_key_head_dim (K), mixer_value_head_dim (V),
        conv_kernel, mixer_norm_eps (gated per-head output RMSNorm), output_gate ("silu" |
        "none": whether that norm is gated by silu(z_proj(x)); exports before the field: "silu").
    HAM: router ("error_l2" | "error_cosine" | "learned" | "random"), router_hidden_size,
        router_seed (the random router's), router_score (learned router: "logit" thresholds its
        pre-sigmoid output, "sigmoid" the output itself: exports written before the field),
        router_input (learned router: "hidden", or "hidden+error" = plus w * log of the
        state's prediction error; exports before the field: "hidden"),
        scratchpad_scale
        (the softmax scale actually used; q, k are L2-normalised), kv_fraction (the training
        target, for the record), ham_taus (per layer), tau_override.
    Norms: normalization ("RMSNorm" | "LayerNorm"), rms_norm_eps.
    Documents: eod_token_id and reset_at_eod. With reset_at_eod (how the model was trained when
        the recipe's data.documents was true) the token after an EOD starts a new document: the
        recurrent state, conv, scratchpad and attention restart there, exactly as in training.
    ops_impl: implementation of the gated delta rule for prefill ("auto" | "chunk" | "naive").
    Layer kinds: kind_symbols {symbol: kind name}; fused_sections {kind name: {fused Megatron
        parameter: [[HF name, rows], ...]}}, the layer kind's section table for this model's
        sizes (what the HF modules build their projections from). A plugin kind's settings
        arrive as extra keyword arguments.
    """

    model_type = "megatron_ham"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 256,
        hidden_size: int = 64,
        intermediate_size: int = 192,
        num_hidden_layers: int = 2,
        layer_pattern: str = "HH",
        num_attention_heads: int = 4,
        num_key_value_heads: int = 4,
        head_dim: int = 16,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 4096,
        mixer_num_heads: int = 4,
        mixer_key_head_dim: int = 16,
        mixer_value_head_dim: int = 16,
        conv_kernel: int = 4,
        mixer_norm_eps: float = 1e-6,
        output_gate: str = "silu",
        router: str = "error_l2",
        router_hidden_size: int = 16,
        router_seed: int = 0,
        router_score: str = "sigmoid",
        router_input: str = "hidden",
        scratchpad_scale: float = 4.0,
        kv_fraction: float = 0.5,
        ham_taus=None,
        tau_override=None,
        normalization: str = "RMSNorm",
        rms_norm_eps: float = 1e-5,
        eod_token_id=None,
        reset_at_eod: bool = True,
        initializer_range: float = 0.02,
        ops_impl: str = "auto",
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        kind_symbols=None,
        fused_sections=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.layer_pattern = layer_pattern
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.rope_theta = float(rope_theta)
        self.max_position_embeddings = max_position_embeddings
        self.mixer_num_heads = mixer_num_heads
        self.mixer_key_head_dim = mixer_key_head_dim
        self.mixer_value_head_dim = mixer_value_head_dim
        self.conv_kernel = conv_kernel
        self.mixer_norm_eps = float(mixer_norm_eps)
        self.output_gate = output_gate
        self.router = router
        self.router_hidden_size = router_hidden_size
        self.router_seed = router_seed
        self.router_score = router_score
        self.router_input = router_input
        self.scratchpad_scale = float(scratchpad_scale)
        self.kv_fraction = float(kv_fraction)
        self.ham_taus = list(ham_taus) if ham_taus is not None else None
        self.tau_override = list(tau_override) if isinstance(tau_override, (list, tuple)) else tau_override
        self.normalization = normalization
        self.rms_norm_eps = float(rms_norm_eps)
        self.eod_token_id = eod_token_id
        self.reset_at_eod = bool(reset_at_eod)
        self.initializer_range = initializer_range
        self.ops_impl = ops_impl
        self.use_cache = use_cache
        self.kind_symbols = dict(kind_symbols) if kind_symbols is not None else dict(BUILTIN_KIND_SYMBOLS)
        self.fused_sections = fused_sections
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.check()

    # ------------------------------------------------------------------ validation
    def check(self) -> None:
        """Raise ValueError ("HAMConfig: key '<name>': expected ..., got ...") for a bad field."""

        def bad(name, expected, got):
            raise ValueError(f"HAMConfig: key '{name}': expected {expected}, got {got!r}")

        pat, table = self.layer_pattern, self.kind_symbols
        if not isinstance(pat, str) or not pat or not set(pat) <= set(table):
            bad("layer_pattern", f"a non-empty string of the symbols of kind_symbols {table}", pat)
        if len(pat) != self.num_hidden_layers:
            bad("num_hidden_layers", f"len(layer_pattern {pat!r}) = {len(pat)}", self.num_hidden_layers)
        if self.ham_taus is not None:
            if len(self.ham_taus) != len(pat):
                bad("ham_taus", f"one entry per layer ({len(pat)})", self.ham_taus)
            self.ham_taus = [_as_tau(t, f"HAMConfig: key 'ham_taus[{i}]'") for i, t in enumerate(self.ham_taus)]
        if isinstance(self.tau_override, list):
            if len(self.tau_override) != len(pat):
                bad("tau_override", f"a float, or a list with one entry per layer ({len(pat)})",
                    self.tau_override)
            self.tau_override = [_as_tau(t, f"HAMConfig: key 'tau_override[{i}]'")
                                 for i, t in enumerate(self.tau_override)]
        else:
            self.tau_override = _as_tau(self.tau_override, "HAMConfig: key 'tau_override'")
        if self.output_gate not in ("silu", "none"):
            bad("output_gate", "'silu' or 'none'", self.output_gate)
        if self.router_input not in ("hidden", "hidden+error"):
            bad("router_input", "'hidden' or 'hidden+error'", self.router_input)
        if self.eod_token_id is not None and (isinstance(self.eod_token_id, bool)
                                              or not isinstance(self.eod_token_id, int)):
            bad("eod_token_id", "an int or None", self.eod_token_id)

    # ------------------------------------------------------------------ derived
    def layer_kinds(self):
        """The layer kind name of each layer ('ham' | 'gdn' | 'attention' | a plugin's)."""
        return [self.kind_symbols[c] for c in self.layer_pattern]

    def effective_tau(self, layer: int) -> float:
        """The routing threshold layer `layer` (0-based, a HAM layer) uses: tau_override (float,
        or its list entry when not None), else ham_taus[layer], else 0.0 (routes every
        non-negative score)."""
        o = self.tau_override
        if isinstance(o, list):
            if o[layer] is not None:
                return float(o[layer])
        elif o is not None:
            return float(o)
        if self.ham_taus is not None and self.ham_taus[layer] is not None:
            return float(self.ham_taus[layer])
        return 0.0


__all__ = ["HAMConfig"]
