"""Layer kind "gdn" ('G'): the Gated DeltaNet mixer (megatron_ham/layers/gdn_mixer.py).

Settings (ModelConfig): mixer_num_heads (split over TP), mixer_key_head_dim K,
mixer_value_head_dim V, conv_kernel, conv_init, mixer_norm_eps, output_gate, impl, fusions.
Fused parameters, per head: in_proj q K, k K, v V, z V (the output gate; only with output_gate
"silu"), beta 1, a 1 (decay input);
conv1d (depthwise, `conv_kernel` taps) q K, k K, v V. Other tensors: A_log, dt_bias [H],
norm_weight [V], out_proj [h, H*V].
"""
from __future__ import annotations

from .registry import Fused, LayerKind, Section, SettingError, divisible, positive_int, register

#: chunk length of the chunked delta rule (FLOPs accounting)
GDN_CHUNK = 64
IMPLS = ("auto", "naive", "chunk")
OUTPUT_GATES = ("silu", "none")
CONV_INITS = ("uniform", "shift")


class GDNKind(LayerKind):
    name = "gdn"
    symbol = "G"
    architecture = "gdn"
    hf_module = "modeling_ham.GDNMixer"

    def check(self, cfg, tp: int) -> None:
        positive_int(cfg, "mixer_num_heads", "mixer_key_head_dim", "mixer_value_head_dim", "conv_kernel")
        divisible("mixer_num_heads", cfg.mixer_num_heads, tp, "tensor_model_parallel_size")
        if isinstance(cfg.mixer_norm_eps, bool) or not cfg.mixer_norm_eps > 0:
            raise SettingError("mixer_norm_eps", "a float > 0", cfg.mixer_norm_eps)
        if cfg.output_gate not in OUTPUT_GATES:
            raise SettingError("output_gate", f"one of {list(OUTPUT_GATES)}", cfg.output_gate)
        if cfg.conv_init not in CONV_INITS:
            raise SettingError("conv_init", f"one of {list(CONV_INITS)}", cfg.conv_init)
        if cfg.impl not in IMPLS:
            raise SettingError("impl", f"one of {list(IMPLS)}", cfg.impl)

    def module(self):
        from ..gdn_mixer import GDNMixer

        return GDNMixer

    def spec(self, backend, cfg):
        from megatron.core.transformer.spec_utils import ModuleSpec

        from ..gdn_mixer import GDNMixerSubmodules

        return ModuleSpec(
            module=self.module(),
            submodules=GDNMixerSubmodules(in_proj=backend.column_parallel_linear,
                                          out_proj=backend.row_parallel_linear),
            params={"kind": self, "model_config": cfg},
        )

    def in_proj_sections(self, cfg):
        K, V = cfg.mixer_key_head_dim, cfg.mixer_value_head_dim
        gate = (Section("z", V, "z"),) if cfg.output_gate == "silu" else ()
        return ((Section("q", K, "q"), Section("k", K, "k"), Section("v", V, "v")) + gate
                + (Section("beta", 1, "b"), Section("a", 1, "a")))

    def fused(self, cfg):
        H, K, V = cfg.mixer_num_heads, cfg.mixer_key_head_dim, cfg.mixer_value_head_dim
        conv = (Section("q", K, "q"), Section("k", K, "k"), Section("v", V, "v"))
        return [Fused("in_proj.weight", self.in_proj_sections(cfg), H, cfg.hidden_size, "{}_proj.weight"),
                Fused("conv1d.weight", conv, H, cfg.conv_kernel, "{}_conv1d.weight")]

    def renames(self, cfg):
        return {"A_log": "A_log", "dt_bias": "dt_bias", "norm_weight": "o_norm.weight",
                "out_proj.weight": "o_proj.weight"}

    def parameters(self, cfg) -> int:
        H, V = cfg.mixer_num_heads, cfg.mixer_value_head_dim
        # + A_log, dt_bias [H], norm_weight [V], out_proj [h, H*V]
        return sum(f.numel() for f in self.fused(cfg)) + 2 * H + V + H * V * cfg.hidden_size

    def flops_per_token(self, cfg, kv_fraction=None) -> float:
        # per head and token: state readout, prediction, update 2KV each; intra-chunk q k^T and
        # attention x values 2C(K+V)
        H, K, V = cfg.mixer_num_heads, cfg.mixer_key_head_dim, cfg.mixer_value_head_dim
        return H * (6.0 * K * V + 2.0 * GDN_CHUNK * (K + V))

    def cache_bytes(self, cfg, kv_bytes: int = 2, state_bytes: int = 4):
        # the state H*K*V (state_bytes) and the conv tail H*(2K+V)*(kernel-1) (kv_bytes)
        H, K, V = cfg.mixer_num_heads, cfg.mixer_key_head_dim, cfg.mixer_value_head_dim
        return 0.0, float(H * K * V * state_bytes + H * (2 * K + V) * (cfg.conv_kernel - 1) * kv_bytes)

    def hf_settings(self, cfg):
        return {"mixer_num_heads": cfg.mixer_num_heads, "mixer_key_head_dim": cfg.mixer_key_head_dim,
                "mixer_value_head_dim": cfg.mixer_value_head_dim, "conv_kernel": cfg.conv_kernel,
                "mixer_norm_eps": float(cfg.mixer_norm_eps), "output_gate": cfg.output_gate,
                "ops_impl": cfg.impl if cfg.impl in IMPLS else "auto"}


GDN = register(GDNKind())
