"""ModelConfig: the one typed description of a megatron-ham model (maps 1:1 onto recipe YAML).

Field types are plain (int / float / str / bool) so a recipe loader can validate keys and types
against `dataclasses.fields(ModelConfig)`. `validate(tp=..., pp=...)` checks everything at build
time and raises ValueError naming the setting.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

ARCHITECTURES = ("transformer", "gdn", "gdn_gsa", "ham", "hybrid")
ROUTERS = ("error_l2", "error_cosine", "learned")
#: recipe dtype name -> torch dtype (params and compute)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelConfig:
    """A model of the paper's four architectures.

    architecture: "transformer" | "gdn" | "gdn_gsa" | "ham" (the paper's four), or "hybrid"
        (any explicit pattern mixing H / G / *).
    pattern: one symbol per layer, H = HAM, G = GDN, * = attention (each followed by an MLP);
        "" = the architecture's default: transformer "*"*L, gdn "G"*L, ham "H"*L, gdn_gsa
        "G*" repeated (attention every `gsa_attention_every`-th layer, counting from 1).
    Attention layers: num_attention_heads, num_query_groups (0 = MHA), kv_channels (0 =
        hidden/heads), RoPE with rotary_base.
    GDN / HAM layers: mixer_num_heads, mixer_key_head_dim, mixer_value_head_dim, conv_kernel.
    HAM: kv_fraction (target in [0, 1]), router ("error_l2" | "error_cosine" | "learned"),
        router_hidden_size (0 = hidden/4), scratchpad_scale (0 = sqrt(K)), controller_gain,
        controller_warmup.
    backend: "local" | "te"; dtype: "fp32" | "bf16" | "fp16" (params and compute).
    sequence_parallel: Megatron sequence parallelism (needs TP > 1 to matter).
    impl: op implementation for tests ("auto" on GPU/CPU picks the right one).
    fusions: torch.compile'd elementwise fusions ("auto" = on when CUDA is available, "on",
        "off"): Megatron-Core's SwiGLU (bias_activation_fusion, which also saves only its input
        for backward), for bf16 models its vocab-parallel cross entropy
        (cross_entropy_loss_fusion, "native"; it returns bf16 logit gradients), and the GDN/HAM
        mixers' elementwise ops (layers/fusion.py). Same math (docs/training.md "Fusions").
    Activation recomputation is a training setting (train.recompute), set on the built model's
    TransformerConfig; HAM layers record their routing scores once per micro-batch either way.
    """

    architecture: str = "ham"
    pattern: str = ""
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 0  # 0 = 8/3 * hidden rounded up to a multiple of 64
    vocab_size: int = 256
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 128
    tie_embeddings: bool = False
    # attention layers
    num_attention_heads: int = 4
    num_query_groups: int = 0
    kv_channels: int = 0
    rotary_base: int = 10000
    # GDN / HAM mixers
    mixer_num_heads: int = 4
    mixer_key_head_dim: int = 16
    mixer_value_head_dim: int = 16
    conv_kernel: int = 4
    # HAM
    kv_fraction: float = 0.5
    router: str = "error_l2"
    router_hidden_size: int = 0
    scratchpad_scale: float = 0.0
    controller_gain: float = 1.0
    controller_warmup: int = 1
    # GDN-GSA
    gsa_attention_every: int = 2
    # numerics / init
    normalization: str = "RMSNorm"
    norm_eps: float = 1e-5
    init_method_std: float = 0.02
    dtype: str = "bf16"
    backend: str = "local"
    sequence_parallel: bool = False
    use_cpu_initialization: bool = False
    impl: str = "auto"
    fusions: str = "auto"

    # ------------------------------------------------------------------ derived
    def resolved_pattern(self) -> str:
        if self.pattern:
            return self.pattern
        L = self.num_layers
        if self.architecture == "transformer":
            return "*" * L
        if self.architecture == "gdn":
            return "G" * L
        if self.architecture == "ham":
            return "H" * L
        if self.architecture == "gdn_gsa":
            e = self.gsa_attention_every
            return "".join("*" if (i + 1) % e == 0 else "G" for i in range(L))
        if self.architecture == "hybrid":
            return ""
        raise ValueError(f"ModelConfig.architecture: must be one of {list(ARCHITECTURES)}, "
                         f"got {self.architecture!r}")

    def resolved_ffn_hidden_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        f = int(8 * self.hidden_size / 3)
        return (f + 63) // 64 * 64

    def resolved_kv_channels(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def resolved_num_query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def resolved_fusions(self) -> bool:
        """Whether Megatron's compiled elementwise fusions are used (see `fusions`)."""
        return torch.cuda.is_available() if self.fusions == "auto" else self.fusions == "on"

    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to a multiple of make_vocab_size_divisible_by. Independent of
        the TP size (so checkpoints reshard); validate() checks it is divisible by tp."""
        m = self.make_vocab_size_divisible_by
        return (self.vocab_size + m - 1) // m * m

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "model") -> "ModelConfig":
        """Build from a mapping; unknown keys or wrong types raise ValueError naming the key."""
        known = {f.name: f for f in fields(cls)}
        kw = {}
        for k, v in d.items():
            if k not in known:
                raise ValueError(f"{where}.{k}: unknown model setting; known: {sorted(known)}")
            want = type(getattr(cls(), k))
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                raise ValueError(f"{where}.{k}: expected {want.__name__}, got {v!r}")
            kw[k] = v
        return cls(**kw)

    # ------------------------------------------------------------------ validation
    def validate(self, tp: int = 1, pp: int = 1) -> None:
        """Raise ValueError naming the first bad setting (for these parallel sizes)."""

        def bad(name, msg):
            raise ValueError(f"ModelConfig.{name}: {msg}")

        if self.architecture not in ARCHITECTURES:
            bad("architecture", f"must be one of {list(ARCHITECTURES)}, got {self.architecture!r}")
        for name in ("num_layers", "hidden_size", "vocab_size", "seq_length", "num_attention_heads",
                     "mixer_num_heads", "mixer_key_head_dim", "mixer_value_head_dim",
                     "conv_kernel", "make_vocab_size_divisible_by", "gsa_attention_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                bad(name, f"must be a positive int, got {v!r}")
        for name in ("ffn_hidden_size", "num_query_groups", "kv_channels", "router_hidden_size",
                     "controller_warmup"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                bad(name, f"must be an int >= 0, got {v!r}")
        from megatron_ham.layers.specs import LAYER_SYMBOLS

        pat = self.resolved_pattern()
        unknown = sorted({c for c in pat if c not in LAYER_SYMBOLS})
        if unknown:
            bad("pattern", f"{pat!r}: unknown layer symbol(s) {unknown}; allowed: "
                + ", ".join(f"{k!r}={v}" for k, v in LAYER_SYMBOLS.items()))
        if len(pat) != self.num_layers:
            bad("pattern", f"{pat!r} has {len(pat)} layers but num_layers={self.num_layers}")
        if self.architecture == "hybrid" and not self.pattern:
            bad("pattern", "architecture='hybrid' needs an explicit pattern (e.g. 'HG*H')")
        expect = {"transformer": set("*"), "gdn": set("G"), "ham": set("H"), "gdn_gsa": set("G*"),
                  "hybrid": set("HG*")}
        if self.pattern and not set(pat) <= expect[self.architecture]:
            bad("pattern", f"{pat!r} uses symbols not allowed for architecture="
                f"{self.architecture!r} (allowed: {sorted(expect[self.architecture])})")
        if isinstance(self.kv_fraction, bool) or not isinstance(self.kv_fraction, (int, float)) \
                or not 0.0 <= float(self.kv_fraction) <= 1.0:
            bad("kv_fraction", f"must be in [0, 1], got {self.kv_fraction!r}")
        if self.router not in ROUTERS:
            bad("router", f"must be one of {list(ROUTERS)}, got {self.router!r}")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.fusions not in ("auto", "on", "off"):
            bad("fusions", f"must be 'auto', 'on' or 'off', got {self.fusions!r}")
        if self.backend not in ("local", "te"):
            bad("backend", f"must be 'local' or 'te', got {self.backend!r}")
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            bad("normalization", f"must be 'RMSNorm' or 'LayerNorm', got {self.normalization!r}")
        if self.scratchpad_scale < 0:
            bad("scratchpad_scale", f"must be >= 0 (0 = sqrt(K)), got {self.scratchpad_scale!r}")
        if not self.controller_gain > 0:
            bad("controller_gain", f"must be > 0, got {self.controller_gain!r}")
        if "*" in pat:
            if self.hidden_size % self.num_attention_heads and not self.kv_channels:
                bad("num_attention_heads", f"{self.num_attention_heads} must divide hidden_size="
                    f"{self.hidden_size} (or set kv_channels)")
            if self.num_attention_heads % tp:
                bad("num_attention_heads", f"{self.num_attention_heads} is not divisible by "
                    f"tensor_model_parallel_size={tp}")
            g = self.resolved_num_query_groups()
            if self.num_attention_heads % g:
                bad("num_query_groups", f"{g} must divide num_attention_heads={self.num_attention_heads}")
            if g % tp:
                bad("num_query_groups", f"{g} is not divisible by tensor_model_parallel_size={tp}")
        if set(pat) & set("HG") and self.mixer_num_heads % tp:
            bad("mixer_num_heads", f"{self.mixer_num_heads} is not divisible by "
                f"tensor_model_parallel_size={tp}")
        if self.padded_vocab_size() % tp:
            bad("make_vocab_size_divisible_by", f"padded vocab {self.padded_vocab_size()} is not "
                f"divisible by tensor_model_parallel_size={tp}")
        if self.num_layers % pp:
            bad("num_layers", f"{self.num_layers} is not divisible by pipeline_model_parallel_size={pp}")
        if self.sequence_parallel and tp == 1:
            pass  # harmless: Megatron turns it off with TP=1
        if self.tie_embeddings and pp > 1:
            pass  # Megatron handles the embedding group
        if self.impl not in ("auto", "naive", "chunk"):
            bad("impl", f"must be 'auto', 'naive' or 'chunk', got {self.impl!r}")
