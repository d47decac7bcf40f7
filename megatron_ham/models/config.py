"""ModelConfig: the one typed description of a megatron-ham model (maps 1:1 onto recipe YAML).

It is the only model schema a user writes: the recipe loader (megatron_ham.training.config)
validates keys and types against `dataclasses.fields(ModelConfig)`; Megatron's TransformerConfig
(models/builder.transformer_config) and the Hugging Face HAMConfig (hf/convert.hf_config_from)
are derived from it, one function each, and the mixers read their settings from it.
`validate(tp=..., pp=...)` checks every rule once (the model-wide ones here, each layer kind's
own in its LayerKind.check) and raises SettingError (a ValueError with the key, what was expected
and the value).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List

import torch

from megatron_ham.layers.kinds import SettingError, kinds, parse_pattern, positive_int

#: architectures whose pattern mixes kinds (the others: one per layer kind, LayerKind.architecture)
MIXED_ARCHITECTURES = ("gdn_gsa", "hybrid")
#: recipe dtype name -> torch dtype (params and compute)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def architectures() -> List[str]:
    """Valid ModelConfig.architecture values: one per registered layer kind, plus the mixed ones."""
    return [k.architecture for k in kinds() if k.architecture] + list(MIXED_ARCHITECTURES)


@dataclass
class ModelConfig:
    """A model of the paper's four architectures.

    architecture: "transformer" | "gdn" | "gdn_gsa" | "ham" (the paper's four), or "hybrid"
        (any explicit pattern of registered layer symbols); a registered plugin kind adds its own.
    pattern: one symbol per layer, H = HAM, G = GDN, * = attention (each followed by an MLP);
        "" = the architecture's default: transformer "*"*L, gdn "G"*L, ham "H"*L (a layer kind's
        architecture: its symbol), gdn_gsa "G*" repeated (attention every
        `gsa_attention_every`-th layer, counting from 1).
    Attention layers: num_attention_heads, num_query_groups (0 = MHA), kv_channels (0 =
        hidden/heads), RoPE with rotary_base, sdpa_backend (the `local` backend's torch SDPA
        kernel on CUDA: "auto" = torch's choice (cuDNN on Hopper), "cudnn", "flash",
        "efficient"; CPU always uses torch's choice; docs/training.md "Attention kernel").
    GDN / HAM layers: mixer_num_heads, mixer_key_head_dim, mixer_value_head_dim, conv_kernel,
        mixer_norm_eps (eps of the gated per-head output RMSNorm; 1e-6, the value every model
        trained before it was a setting used; `norm_eps` is the hidden-state norms'),
        output_gate ("silu": the memory readout is RMSNorm(o) * silu(W_z x), Gated DeltaNet's and
        the paper's output gate; "none": RMSNorm(o) alone, no W_z; docs/design.md "Output
        combination": at small widths the gate keeps HAM and GDN from learning recall).
        conv_init ("uniform": the short conv's taps U(-1/sqrt(kernel), 1/sqrt(kernel)), nn.Conv1d's
        default and fla's; "shift": k's channels start as the previous token, q's and v's as
        the current token, other taps 0 -- the one-layer recall circuit. Init only: the
        architecture and checkpoints are the same. docs/results/gdn_learning_probe.md: with
        "uniform" a 2-layer d=128 GDN stays at chance on the CPU MQAR check, with "shift" it
        learns it).
    HAM: kv_fraction (target in [0, 1]), router ("error_l2" | "error_cosine" | "learned" |
        "random": the ablation, content-independent i.i.d. scores), router_seed (the random
        router's seed), router_score (what the learned router's threshold cuts: "logit" = its
        pre-sigmoid output, or "sigmoid" = r itself, the default only because checkpoints
        written before the setting used it: r saturates to exactly 1.0 in fp32 and ties;
        docs/design.md "Routing"), router_input (learned router: "hidden" = the layer input
        only, the paper's; "hidden+error" = plus w * log of the state's prediction error, a
        learned w: the input of a model's first layers carries no context, docs/design.md
        "Routing"), router_hidden_size (0 = hidden/4), scratchpad_scale (0 =
        sqrt(K)), scratchpad_impl ("auto" | "reference" | "compact" | "flex" | "triton",
        megatron_ham.ops.scratchpad_attention), controller_gain (in (0, 1]: the quantile-tracking
        gain, 1 = tau is the last step's quantile), controller_warmup, train_routing ("threshold":
        training routes at the controller's tau, the last step's quantile, as inference does;
        "batch": training routes the top kv_fraction of each micro-batch's scores per layer
        (its own quantile: no controller lag, exact fraction; tau still tracks the quantile for
        inference); docs/design.md "KV-fraction control").
    backend: "local" | "te"; dtype: "fp32" | "bf16" | "fp16" (params and compute).
    sequence_parallel: Megatron sequence parallelism (needs TP > 1 to matter).
    impl: op implementation for tests ("auto" on GPU/CPU picks the right one).
    fusions: torch.compile'd elementwise fusions ("auto" = on when CUDA is available, "on",
        "off"): Megatron-Core's SwiGLU (bias_activation_fusion, which also saves only its input
        for backward), for bf16 models its vocab-parallel cross entropy
        (cross_entropy_loss_fusion, "native"; it returns bf16 logit gradients), and the GDN/HAM
        mixers' elementwise ops (layers/fusion.py). Same math (docs/training.md "Fusions").
    norm_mlp_kernels: with the fusions on, the pre-norms hand out the residual branch (our RMSNorm
        kernels add its gradient in the norm's backward on CUDA) and the MLP's SwiGLU runs
        liger-kernel's kernel on CUDA; false keeps torch's norm and megatron-core's compiled
        SwiGLU (transformer_800m.yaml: measured slower with them, docs/benchmarks.md 2026-12-03).
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
    sdpa_backend: str = "auto"
    # GDN / HAM mixers
    mixer_num_heads: int = 4
    mixer_key_head_dim: int = 16
    mixer_value_head_dim: int = 16
    conv_kernel: int = 4
    mixer_norm_eps: float = 1e-6
    output_gate: str = "silu"
    conv_init: str = "uniform"
    # HAM
    kv_fraction: float = 0.5
    router: str = "error_l2"
    router_hidden_size: int = 0
    router_seed: int = 0
    router_score: str = "sigmoid"
    router_input: str = "hidden"
    scratchpad_scale: float = 0.0
    scratchpad_impl: str = "auto"
    controller_gain: float = 1.0
    controller_warmup: int = 1
    train_routing: str = "threshold"
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
    norm_mlp_kernels: bool = True

    # ------------------------------------------------------------------ derived
    def resolved_pattern(self) -> str:
        """The pattern: `pattern`, else the architecture's default ("" for "hybrid")."""
        if self.pattern:
            return self.pattern
        L = self.num_layers
        for k in kinds():
            if k.architecture == self.architecture:
                return k.symbol * L
        if self.architecture == "gdn_gsa":
            e = self.gsa_attention_every
            return "".join("*" if (i + 1) % e == 0 else "G" for i in range(L))
        if self.architecture == "hybrid":
            return ""
        raise SettingError("architecture", f"one of {architectures()}", self.architecture)

    def allowed_symbols(self) -> str:
        """The layer symbols an explicit pattern may use with this architecture."""
        for k in kinds():
            if k.architecture == self.architecture:
                return k.symbol
        return "G*" if self.architecture == "gdn_gsa" else "".join(k.symbol for k in kinds())

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

    # ------------------------------------------------------------------ validation
    def validate(self, tp: int = 1, pp: int = 1) -> None:
        """Raise SettingError for the first setting that breaks a rule at these parallel sizes:
        the model-wide rules here, then each layer kind's of the pattern (LayerKind.check)."""
        if self.architecture not in architectures():
            raise SettingError("architecture", f"one of {architectures()}", self.architecture)
        positive_int(self, "num_layers", "hidden_size", "vocab_size", "seq_length",
                     "num_attention_heads", "make_vocab_size_divisible_by", "gsa_attention_every")
        for name in ("ffn_hidden_size", "num_query_groups", "kv_channels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SettingError(name, "an int >= 0", v)
        if self.architecture == "hybrid" and not self.pattern:
            raise SettingError("pattern", "an explicit pattern with architecture='hybrid' (e.g. 'HG*H')",
                               self.pattern)
        pat = self.resolved_pattern()
        layer_kinds = parse_pattern(pat, self.num_layers)
        allowed = self.allowed_symbols()
        if self.pattern and not set(pat) <= set(allowed):
            raise SettingError("pattern", f"only the symbols {sorted(allowed)} with architecture="
                               f"{self.architecture!r}", pat)
        checks = {
            "dtype": (self.dtype in DTYPES, f"one of {list(DTYPES)}"),
            "fusions": (self.fusions in ("auto", "on", "off"), "'auto', 'on' or 'off'"),
            "norm_mlp_kernels": (isinstance(self.norm_mlp_kernels, bool), "true or false"),
            "backend": (self.backend in ("local", "te"), "'local' or 'te'"),
            "normalization": (self.normalization in ("RMSNorm", "LayerNorm"), "'RMSNorm' or 'LayerNorm'"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise SettingError(name, expected, getattr(self, name))
        for kind in dict.fromkeys(layer_kinds):  # each kind once, in pattern order
            kind.check(self, tp)
        if self.padded_vocab_size() % tp:
            raise SettingError("make_vocab_size_divisible_by", "a padded vocab "
                               f"({self.padded_vocab_size()}) divisible by tensor_model_parallel_size={tp}",
                               self.make_vocab_size_divisible_by)
        if self.num_layers % pp:
            raise SettingError("num_layers", f"a multiple of pipeline_model_parallel_size={pp}",
                               self.num_layers)
