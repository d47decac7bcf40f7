"""A lower bound on one rank's training memory, checked before anything is allocated.

    estimate(cfg, dp, params=None) -> MemoryEstimate (bytes per rank)
    check(cfg, est, budget_bytes, budget_name, src)    raises ConfigError naming the keys

The bound counts what no layout avoids:
  weights    P / (tp * pp) x bytes of model.dtype
  grads      P / (tp * pp) x 4 (fp32 grad buffer: fp32 models, or train.grad_reduce_in_fp32) else 2
  optimizer  P / (tp * pp) x (12 for bf16/fp16: fp32 main weights + Adam m, v; 8 for fp32: m, v),
             divided by dp with the distributed optimizer
  activations, one micro-batch on one stage: (L / pp) x s x b x h x ACT_BYTES / tp, where
             ACT_BYTES = 16 x (dtype bytes / 2) per layer element without recomputation (the
             800M recipes measure 70-100, docs/benchmarks.md: this is a floor, not a forecast),
             only the layer input (dtype bytes) for recomputed layers; plus the fp32 logits
             s x b x padded_vocab / tp x 4
P is the exact count (models.accounting) at start-up; at validation, before the model config is
known to be sane, the floor L x 3 h f (the MLPs) + embedding(s), computed in O(1), so that
`model.num_layers=1000000000` is refused instantly instead of building a pattern string.

Budgets (`train.memory_budget_gib`: null = the device, a number = that many GiB, 0 = no check):
at validation (no device known) a ceiling of MAX_RANK_GIB; at start-up the GPU's total memory,
or without CUDA the host's RAM divided by the ranks on that host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

ACT_BYTES = 16  # per layer, token and hidden unit in bf16, no recomputation (a floor)
MAX_RANK_GIB = 4096.0  # no device or host gives one rank 4 TiB: beyond this nothing can fit
MAX_LAYERS = 100_000  # beyond any model this code builds; keeps pattern strings bounded
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class MemoryEstimate:
    params: int  # whole model
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def describe(self) -> str:
        g = 2.0 ** 30
        return (f"weights {self.weights / g:.2f} + grads {self.grads / g:.2f} + optimizer "
                f"{self.optimizer / g:.2f} + activations {self.activations / g:.2f} = "
                f"{self.total / g:.2f} GiB per rank")


def params_floor(m) -> int:
    """Parameters every architecture has at least: the MLPs and the embedding(s)."""
    f = m.resolved_ffn_hidden_size()
    emb = m.padded_vocab_size() * m.hidden_size * (1 if m.tie_embeddings else 2)
    return m.num_layers * 3 * m.hidden_size * f + emb


def estimate(cfg, dp: int = 1, params: Optional[int] = None) -> MemoryEstimate:
    """Per-rank lower bound for RunConfig `cfg` at data parallel size `dp` (see module doc)."""
    m, t, par = cfg.model, cfg.train, cfg.parallel
    P = params_floor(m) if params is None else int(params)
    per_rank = P / (par.tp * par.pp)
    db = _DTYPE_BYTES.get(m.dtype, 4)
    grad_b = 4 if (m.dtype == "fp32" or t.grad_reduce_in_fp32) else 2
    opt_b = 8 if m.dtype == "fp32" else 12
    opt = per_rank * opt_b / (dp if t.use_distributed_optimizer else 1)
    layers = m.num_layers / par.pp
    elems = m.seq_length * t.micro_batch_size * m.hidden_size / par.tp
    full = ACT_BYTES * db / 2
    if t.recompute == "none":
        act = layers * elems * full
    elif t.recompute == "full":
        act = layers * elems * db + elems * full  # stored inputs + one layer being recomputed
    else:  # block: the first recompute_num_layers layers of each stage are recomputed
        n = min(t.recompute_num_layers, layers)
        act = n * elems * db + (layers - n) * elems * full
    act += m.seq_length * t.micro_batch_size * m.padded_vocab_size() / par.tp * 4
    return MemoryEstimate(P, per_rank * db, per_rank * grad_b, opt, act)


def check(cfg, est: MemoryEstimate, budget_bytes: float, budget_name: str,
          src: Callable[[str], str]) -> None:
    """ConfigError when `est` exceeds the budget, naming the keys of the larger part."""
    from .config import ConfigError

    if est.total <= budget_bytes:
        return
    m, t = cfg.model, cfg.train
    fixed = est.weights + est.grads + est.optimizer
    if est.activations > fixed:
        key = "model.seq_length"
        what = (f"activations of model.seq_length={m.seq_length} x train.micro_batch_size="
                f"{t.micro_batch_size} over model.num_layers={m.num_layers} (train.recompute="
                f"{t.recompute!r})")
    else:
        key = "model.hidden_size"
        what = (f"{est.params / 1e9:.3g} B parameters from model.num_layers={m.num_layers}, "
                f"model.hidden_size={m.hidden_size}, model.ffn_hidden_size="
                f"{m.resolved_ffn_hidden_size()}, model.vocab_size={m.vocab_size}")
    raise ConfigError(
        f"{src(key)}: the model cannot fit: {what} need at least {est.describe()} (tp "
        f"{cfg.parallel.tp}, pp {cfg.parallel.pp}), more than {budget_name} "
        f"({budget_bytes / 2**30:.1f} GiB). Make it smaller, add parallelism or recomputation, "
        "or set train.memory_budget_gib (0 = no check)")


def device_budget(ranks_on_host: int):
    """(bytes, description) one rank may use here: the GPU's memory, else RAM / ranks."""
    import torch

    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(i)
        return float(props.total_memory), f"the memory of GPU {i} ({props.name})"
    import psutil

    ram = psutil.virtual_memory().total
    n = max(1, ranks_on_host)
    return ram / n, f"this host's RAM / {n} rank(s) on it"
