"""HAMConfig: the Hugging Face configuration of an exported megatron-ham model.

Written by `ham-convert-hf` from the checkpoint's ModelConfig (megatron_ham.models.ModelConfig)
and the per-layer KV-fraction controller state; this file is also copied into every export
directory (loaded there with `trust_remote_code=True`, without megatron_ham installed), so it
imports nothing but transformers.

Layer pattern: one symbol per layer, "H" = HAM mixer (Gated DeltaNet state + routed KV
scratchpad), "G" = Gated DeltaNet mixer, "*" = softmax attention with RoPE; every mixer is
followed by a SwiGLU MLP (pre-norm residual blocks, as Megatron's TransformerLayer).

Routing thresholds at inference: `ham_taus[i]` is layer i's tau from the checkpoint (None for
non-HAM layers; -inf routes every token, +inf none). `tau_override` replaces them: a float (all
HAM layers) or a list with one entry per layer (None keeps the checkpoint's tau). See
docs/export.md, and `HAMForCausalLM.set_tau` / `calibrate_kv_fraction` to change them after
loading.
"""
from __future__ import annotations

import math

from transformers import PretrainedConfig

LAYER_SYMBOLS = {"H": "ham", "G": "gdn", "*": "attention"}
ROUTERS = ("error_l2", "error_cosine", "learned")


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
        raise ValueError(f"{where}: tau must not be NaN")
    return float(value)


class HAMConfig(PretrainedConfig):
    """Configuration of HAMForCausalLM.

    Sizes: vocab_size (the real vocabulary; Megatron's padding rows are dropped at export),
    hidden_size, intermediate_size (SwiGLU width), num_hidden_layers == len(layer_pattern).
    Attention ("*"): num_attention_heads, num_key_value_heads (GQA groups), head_dim, rope_theta.
    HAM / GDN ("H", "G"): mixer_num_heads, mixer_key_head_dim (K), mixer_value_head_dim (V),
        conv_kernel, mixer_norm_eps (gated per-head output RMSNorm).
    HAM: router ("error_l2" | "error_cosine" | "learned"), router_hidden_size, scratchpad_scale
        (the softmax scale actually used; q, k are L2-normalised), kv_fraction (the training
        target, for the record), ham_taus (per layer), tau_override.
    Norms: normalization ("RMSNorm" | "LayerNorm"), rms_norm_eps.
    Documents: eod_token_id and reset_at_eod. With reset_at_eod (how the model was trained when
        the recipe's data.documents was true) the token after an EOD starts a new document: the
        recurrent state, conv, scratchpad and attention restart there, exactly as in training.
    ops_impl: implementation of the gated delta rule for prefill ("auto" | "chunk" | "naive").
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
        router: str = "error_l2",
        router_hidden_size: int = 16,
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
        self.router = router
        self.router_hidden_size = router_hidden_size
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
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.check()

    # ------------------------------------------------------------------ validation
    def check(self) -> None:
        """Raise ValueError naming the first bad field."""

        def bad(name, msg):
            raise ValueError(f"HAMConfig.{name}: {msg}")

        pat = self.layer_pattern
        if not isinstance(pat, str) or not pat:
            bad("layer_pattern", f"must be a non-empty string of {sorted(LAYER_SYMBOLS)}, got {pat!r}")
        unknown = sorted({c for c in pat if c not in LAYER_SYMBOLS})
        if unknown:
            bad("layer_pattern", f"{pat!r}: unknown symbol(s) {unknown}; allowed: "
                + ", ".join(f"{k!r}={v}" for k, v in LAYER_SYMBOLS.items()))
        if len(pat) != self.num_hidden_layers:
            bad("num_hidden_layers", f"{self.num_hidden_layers} != len(layer_pattern {pat!r}) = {len(pat)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "mixer_num_heads", "mixer_key_head_dim",
                     "mixer_value_head_dim", "conv_kernel", "router_hidden_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                bad(name, f"must be a positive int, got {v!r}")
        if "*" in pat and self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"{self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}")
        if self.router not in ROUTERS:
            bad("router", f"must be one of {list(ROUTERS)}, got {self.router!r}")
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            bad("normalization", f"must be 'RMSNorm' or 'LayerNorm', got {self.normalization!r}")
        if self.ops_impl not in ("auto", "chunk", "naive"):
            bad("ops_impl", f"must be 'auto', 'chunk' or 'naive', got {self.ops_impl!r}")
        if self.ham_taus is not None:
            if len(self.ham_taus) != len(pat):
                bad("ham_taus", f"needs one entry per layer ({len(pat)}), got {len(self.ham_taus)}")
            self.ham_taus = [_as_tau(t, f"HAMConfig.ham_taus[{i}]") for i, t in enumerate(self.ham_taus)]
        if isinstance(self.tau_override, list):
            if len(self.tau_override) != len(pat):
                bad("tau_override", f"a list needs one entry per layer ({len(pat)}), "
                    f"got {len(self.tau_override)}")
            self.tau_override = [_as_tau(t, f"HAMConfig.tau_override[{i}]")
                                 for i, t in enumerate(self.tau_override)]
        else:
            self.tau_override = _as_tau(self.tau_override, "HAMConfig.tau_override")
        if self.eod_token_id is not None and (isinstance(self.eod_token_id, bool)
                                              or not isinstance(self.eod_token_id, int)):
            bad("eod_token_id", f"must be an int or None, got {self.eod_token_id!r}")

    # ------------------------------------------------------------------ derived
    def layer_kinds(self):
        """['ham' | 'gdn' | 'attention'] per layer."""
        return [LAYER_SYMBOLS[c] for c in self.layer_pattern]

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
