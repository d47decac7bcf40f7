"""Layer kind "ham" ('H'): the HAM mixer (megatron_ham/layers/ham_mixer.py), a GDN layer plus
the routed KV scratchpad; and the once-per-step KV-fraction controller update of its layers.

Settings (ModelConfig, besides the GDN ones): kv_fraction, router, router_hidden_size,
router_seed, router_score, router_input, scratchpad_scale, scratchpad_impl, controller_gain,
controller_warmup, train_routing.
Fused parameters: GDN's, plus in_proj gate_rnn 1 and gate_kv 1 per head. Other tensors: GDN's,
the learned router (router.fc1/fc2; router.error_weight with router_input "hidden+error") and
the controller's buffers (kv_controller.tau -> the HF config's ham_taus; num_updates is
training state).
"""
from __future__ import annotations

from typing import Dict

import torch

from .gdn import GDNKind
from .registry import Section, SettingError, register

ROUTERS = ("error_l2", "error_cosine", "learned", "random")
ROUTER_SCORES = ("sigmoid", "logit")
ROUTER_INPUTS = ("hidden", "hidden+error")
SCRATCHPAD_IMPLS = ("auto", "reference", "compact", "flex", "triton")
TRAIN_ROUTINGS = ("threshold", "batch")


class HAMKind(GDNKind):
    name = "ham"
    symbol = "H"
    architecture = "ham"
    hf_module = "modeling_ham.HAMMixer"

    def check(self, cfg, tp: int) -> None:
        super().check(cfg, tp)
        f = cfg.kv_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= float(f) <= 1.0:
            raise SettingError("kv_fraction", "a float in [0, 1]", f)
        if cfg.router not in ROUTERS:
            raise SettingError("router", f"one of {list(ROUTERS)}", cfg.router)
        if cfg.router_score not in ROUTER_SCORES:
            raise SettingError("router_score", f"one of {list(ROUTER_SCORES)}", cfg.router_score)
        if cfg.router_input not in ROUTER_INPUTS:
            raise SettingError("router_input", f"one of {list(ROUTER_INPUTS)}", cfg.router_input)
        if cfg.router_input != "hidden" and cfg.router != "learned":
            raise SettingError("router_input", "'hidden' unless router is 'learned' (the other "
                               f"routers have no input; router is {cfg.router!r})", cfg.router_input)
        for n in ("router_hidden_size", "router_seed", "controller_warmup"):
            v = getattr(cfg, n)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SettingError(n, "an int >= 0", v)
        if cfg.scratchpad_scale < 0:
            raise SettingError("scratchpad_scale", "a float >= 0 (0 = sqrt(K))", cfg.scratchpad_scale)
        if cfg.scratchpad_impl not in SCRATCHPAD_IMPLS:
            raise SettingError("scratchpad_impl", f"one of {list(SCRATCHPAD_IMPLS)}", cfg.scratchpad_impl)
        if cfg.train_routing not in TRAIN_ROUTINGS:
            raise SettingError("train_routing", f"one of {list(TRAIN_ROUTINGS)}", cfg.train_routing)
        if not 0 < cfg.controller_gain <= 1:
            raise SettingError("controller_gain", "a float in (0, 1]", cfg.controller_gain)

    def module(self):
        from ..ham_mixer import HAMMixer

        return HAMMixer

    def in_proj_sections(self, cfg):
        return super().in_proj_sections(cfg) + (Section("gate_rnn", 1, "gate_rnn"),
                                                Section("gate_kv", 1, "gate_kv"))

    def router_hidden(self, cfg) -> int:
        return cfg.router_hidden_size or max(1, cfg.hidden_size // 4)

    def renames(self, cfg):
        out = super().renames(cfg)
        if cfg.router == "learned":
            out.update({f"router.{p}": f"router.{p}" for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")})
            if cfg.router_input == "hidden+error":
                out["router.error_weight"] = "router.error_weight"
        return out

    def parameters(self, cfg) -> int:
        n = super().parameters(cfg)
        if cfg.router == "learned":
            h, rh = cfg.hidden_size, self.router_hidden(cfg)
            n += h * rh + rh + rh + 1 + (cfg.router_input == "hidden+error")
        return n

    def flops_per_token(self, cfg, kv_fraction=None) -> float:
        # + the scratchpad: 2 x 2 x H (K + V) / 2 per visible routed key, f x s_avg of them
        f = float(cfg.kv_fraction if kv_fraction is None else kv_fraction)
        s_avg = (cfg.seq_length + 1) / 2.0
        H, K, V = cfg.mixer_num_heads, cfg.mixer_key_head_dim, cfg.mixer_value_head_dim
        return super().flops_per_token(cfg) + 2.0 * H * (K + V) * f * s_avg

    def cache_bytes(self, cfg, kv_bytes: int = 2, state_bytes: int = 4):
        # + K and V of the routed tokens only (kv_fraction of them)
        _, state = super().cache_bytes(cfg, kv_bytes, state_bytes)
        H, K, V = cfg.mixer_num_heads, cfg.mixer_key_head_dim, cfg.mixer_value_head_dim
        return float(cfg.kv_fraction) * H * (K + V) * kv_bytes, state

    def hf_settings(self, cfg):
        K = cfg.mixer_key_head_dim
        return {**super().hf_settings(cfg), "router": cfg.router,
                "router_hidden_size": self.router_hidden(cfg), "router_seed": int(cfg.router_seed),
                "router_score": cfg.router_score, "router_input": cfg.router_input,
                "scratchpad_scale": float(cfg.scratchpad_scale) if cfg.scratchpad_scale > 0 else K ** 0.5,
                "kv_fraction": float(cfg.kv_fraction)}

    def to_hf(self, state, cfg):
        out, _ = super().to_hf(state, cfg)
        tau = float(state.pop("kv_controller.tau"))
        state.pop("kv_controller.num_updates")  # training state
        return out, {"tau": tau}

    def from_hf(self, tensors, entries, cfg):
        """+ the controller: tau from the export (0.0, the controller's start, when it has
        none); num_updates = the exported checkpoint's steps (one update per step), else
        controller_warmup, so a finite tau is not reset by a warm-up."""
        out = super().from_hf(tensors, entries, cfg)
        tau, steps = entries.get("tau"), entries.get("steps")
        out["kv_controller.tau"] = torch.tensor(0.0 if tau is None else float(tau), dtype=torch.float32)
        updates = steps if steps is not None else (cfg.controller_warmup if tau is not None else 0)
        out["kv_controller.num_updates"] = torch.tensor(int(updates), dtype=torch.int64)
        return out


HAM = register(HAMKind())


def _ham_mixers(model_chunks):
    HAMMixer = HAM.module()
    if isinstance(model_chunks, torch.nn.Module):
        model_chunks = [model_chunks]
    for chunk in model_chunks:
        for m in chunk.modules():
            if isinstance(m, HAMMixer):
                yield m


def step_kv_controllers(model_chunks, dp_group=None) -> Dict[int, Dict[str, float]]:
    """Update every HAM layer's KV-fraction controller once, after an optimizer step.

    model_chunks: a model or a list of (possibly DDP-wrapped) model chunks of this rank.
    dp_group: the data-parallel group; the routed fraction (and the warm-up quantile) is averaged
        over it so every rank holds the same tau. None = no averaging.
    Uses the per-token scores each HAM layer recorded (detached) in its training-mode forwards
    since the last call (all micro-batches), updates tau, clears the records. Every rank of
    dp_group must call it (it is collective) with the same layers. Layers that recorded nothing
    (e.g. eval-only) are skipped on all ranks alike.
    Returns {global layer number: {"fraction": measured routed fraction at the step's tau,
    "tau": the new tau}}.
    """
    updated = []  # (layer number, fraction, tau), read to the host together at the end
    for m in _ham_mixers(model_chunks):
        scores = m.pop_recorded_scores()
        if scores is None:
            continue
        f = m.kv_controller.update_on_device(scores, group=dp_group)
        updated.append((int(m.layer_number), torch.stack([f, m.kv_controller.tau.to(f).reshape(())])))
    if not updated:
        return {}
    values = torch.stack([v for _, v in updated]).tolist()  # the one host sync
    return {n: {"fraction": f, "tau": tau} for (n, _), (f, tau) in zip(updated, values)}
