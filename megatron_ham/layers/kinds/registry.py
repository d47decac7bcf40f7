"""The layer-kind registry: what a layer kind IS, declared in one module per kind.

Every layer of a megatron-ham model is norm -> mixer -> residual -> norm -> SwiGLU MLP ->
residual; a layer KIND is its mixer. One `LayerKind` object per kind (megatron_ham/layers/kinds/
attention.py, gdn.py, ham.py; a plugin may register its own) answers everything the rest of the
code asks of a kind:

  symbol / architecture   its pattern symbol, and the architecture name of a pattern of only it
  check(cfg, tp)          the rules of the ModelConfig settings it reads (raises SettingError)
  spec(backend, cfg)      the Megatron ModuleSpec of the mixer (TransformerLayer's self_attention)
  fused(cfg)              its section table: parameters whose rows are named sections per head
                          (`Fused`); the single source of the TP split, the layout-independent
                          init, the sectioned checkpoint, the HF key map and parameter count
  parameters(cfg)         parameters of the mixer (norms and MLP are the layer's)
  flops_per_token(cfg, f) forward FLOPs per token besides 2 x the matmul weights (training.logging)
  cache_bytes(cfg, ...)   inference memory: KV bytes per token, state bytes per sequence
  hf_module / hf_slot     its Hugging Face module (a class, or "modeling_ham.<Class>" for the
                          classes of the shipped modeling code) and the attribute that holds it
  hf_settings(cfg)        the HAMConfig fields its HF module reads
  to_hf(state, cfg)       its Megatron -> HF key map (default: `fused` split + `renames`)
  from_hf(tensors, ...)   the inverse map, HF -> Megatron (ham-import-hf; default: `fused`
                          join + `renames` reversed)

The rest of the code iterates the registry: layers/specs.py, models/{config,accounting}.py,
training/logging/metrics.py, hf/{convert,modeling_ham}.py. CONTRIBUTING.md "How to add a layer
kind" says what to write.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch


class SettingError(ValueError):
    """A ModelConfig setting breaks a rule. `key` is the setting's name (relative to the model
    section), `expected` what the rule wants, `got` the value; the message is
    "key '<key>': expected <expected>, got <got>" (the recipe loader adds the file)."""

    def __init__(self, key: str, expected: str, got: Any):
        self.key, self.expected, self.got = key, expected, got
        super().__init__(f"key '{key}': expected {expected}, got {got!r}")


def positive_int(cfg, *names: str) -> None:
    """SettingError unless every `cfg.<name>` is an int > 0."""
    for n in names:
        v = getattr(cfg, n)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise SettingError(n, "a positive int", v)


def divisible(name: str, value: int, by: int, what: str) -> None:
    """SettingError unless `value` (the setting `name`, maybe resolved) is divisible by `by`
    (`what`: the name of `by`, for the message)."""
    if value % by:
        raise SettingError(name, f"a multiple of {what}={by}", value)


@dataclass(frozen=True)
class Section:
    """One named block of rows per unit (head or query group) of a fused parameter.

    name: its checkpoint name (the sharded tensor `<param>.<name>`); width: rows per unit;
    hf: its name on the Hugging Face side (formats `Fused.hf`)."""

    name: str
    width: int
    hf: str


@dataclass(frozen=True)
class Fused:
    """A parameter made of named sections, split over tensor parallelism by units.

    param: its name inside the mixer ("in_proj.weight"); units: heads (or query groups) of the
    whole model, split over TP ranks; row_size: elements per row (hidden for a projection,
    the kernel for a depthwise conv); hf: the HF key template relative to the HF module
    ("{}_proj.weight"). Row order: `interleaved=False` is section-major per TP rank (this rank's
    rows of section 1, then of section 2, ...: the megatron-ham mixers); `interleaved=True` is
    unit-major (for each unit, its rows of every section: Megatron's fused QKV).
    """

    param: str
    sections: Tuple[Section, ...]
    units: int
    row_size: int
    hf: str
    interleaved: bool = False

    @property
    def rows(self) -> int:
        return self.units * sum(s.width for s in self.sections)

    def numel(self) -> int:
        return self.rows * self.row_size

    def widths(self, units: int) -> List[int]:
        """Rows of each section for `units` units (this rank's: units // tp), section-major."""
        return [s.width * units for s in self.sections]

    def split(self, t: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The whole (TP=1) tensor [rows, ...] -> {HF key: its rows} in section order."""
        if t.shape[0] != self.rows:
            raise ValueError(f"{self.param}: {t.shape[0]} rows, expected {self.rows} "
                             f"({self.units} x {[(s.name, s.width) for s in self.sections]})")
        if self.interleaved:
            per_unit = t.reshape(self.units, self.rows // self.units, *t.shape[1:])
            parts = torch.split(per_unit, [s.width for s in self.sections], dim=1)
            parts = [p.reshape(-1, *t.shape[1:]) for p in parts]
        else:
            parts = torch.split(t, self.widths(self.units), dim=0)
        return {self.hf.format(s.hf): p for s, p in zip(self.sections, parts)}

    def join(self, parts: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The inverse of `split`: {HF key: its rows} (takes, pops, every section's key) -> the
        whole (TP=1) tensor [rows, ...]. ValueError naming a missing key or a wrong row count."""
        blocks = []
        for s in self.sections:
            key = self.hf.format(s.hf)
            if key not in parts:
                raise ValueError(f"{key}: missing (section {s.name!r} of {self.param})")
            t = parts.pop(key)
            if t.shape[0] != s.width * self.units:
                raise ValueError(f"{key}: {t.shape[0]} rows, expected {s.width * self.units} "
                                 f"({self.units} x {s.width})")
            blocks.append(t)
        if self.interleaved:  # unit-major: each unit's rows of every section
            per_unit = [b.reshape(self.units, -1, *b.shape[1:]) for b in blocks]
            return torch.cat(per_unit, dim=1).reshape(self.rows, *blocks[0].shape[1:])
        return torch.cat(blocks, dim=0)


class LayerKind:
    """What the code asks of one layer kind (see the module docstring). Subclass it in the
    kind's module, instantiate once, `register()` the instance."""

    name: str = ""
    symbol: str = ""
    #: the ModelConfig.architecture whose default pattern is this kind only (None: no such name)
    architecture: Optional[str] = None
    #: the model needs rotary position embeddings when a layer of this kind is present
    uses_rope: bool = False
    #: HF side: the module class (or "modeling_ham.<Class>", a class of the shipped modeling
    #: code) built as HFModule(config, layer_idx), and the decoder-layer attribute holding it
    hf_module: Union[str, type] = ""
    hf_slot: str = "mixer"

    # ------------------------------------------------------------------ settings
    def check(self, cfg, tp: int) -> None:
        """Raise SettingError for a setting of `cfg` (a ModelConfig) this kind cannot run with
        at tensor-parallel size `tp`."""

    # ------------------------------------------------------------------ Megatron
    def spec(self, backend, cfg):
        """The ModuleSpec of the mixer (TransformerLayer's self_attention slot) for `cfg`."""
        raise NotImplementedError(f"layer kind {self.name!r}: spec()")

    def fused(self, cfg) -> List[Fused]:
        """The section table of the mixer's fused parameters (may be empty)."""
        return []

    # ------------------------------------------------------------------ accounting
    def parameters(self, cfg) -> int:
        """Parameters of the mixer of one layer (unsharded)."""
        raise NotImplementedError(f"layer kind {self.name!r}: parameters()")

    def flops_per_token(self, cfg, kv_fraction: Optional[float] = None) -> float:
        """Forward FLOPs per token of the mixer that are NOT 2 x a weight matrix (attention
        scores, recurrences, ...), at cfg.seq_length; kv_fraction: the measured routed fraction
        of this layer where the kind routes (None: its target)."""
        return 0.0

    def cache_bytes(self, cfg, kv_bytes: int = 2, state_bytes: int = 4) -> Tuple[float, float]:
        """(KV-cache bytes per token, constant state bytes per sequence) of one layer at
        inference, keys/values stored in `kv_bytes`, recurrent states in `state_bytes`."""
        return 0.0, 0.0

    # ------------------------------------------------------------------ Hugging Face
    def hf_settings(self, cfg) -> Dict[str, Any]:
        """HAMConfig fields the HF module reads, derived from ModelConfig `cfg`."""
        return {}

    def renames(self, cfg) -> Dict[str, str]:
        """Mixer tensors copied as they are: Megatron name -> HF name (relative to the mixer)."""
        return {}

    def to_hf(self, state: Dict[str, torch.Tensor], cfg) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """Megatron mixer tensors (names relative to the mixer, TP=1) -> (HF tensors relative
        to the HF module, per-layer HF config entries such as {"tau": x}). Takes (pops) what it
        maps from `state`; the converter refuses keys left over."""
        out = {}
        for f in self.fused(cfg):
            out.update(f.split(state.pop(f.param)))
        for m, h in self.renames(cfg).items():
            out[h] = state.pop(m)
        return out, {}

    def from_hf(self, tensors: Dict[str, torch.Tensor], entries: Dict[str, Any], cfg) -> Dict[str, torch.Tensor]:
        """The inverse of `to_hf`: HF tensors relative to the HF module (takes, pops, what it
        maps) and the layer's HF config entries (to_hf's second result, e.g. {"tau": x}, plus
        "steps": the optimizer steps of the exported checkpoint, None when unknown) -> the
        Megatron mixer tensors (TP=1). A kind that overrides `to_hf` overrides this too
        (ham-import-hf checks that to_hf maps the result back exactly)."""
        out = {f.param: f.join(tensors) for f in self.fused(cfg)}
        for m, h in self.renames(cfg).items():
            if h not in tensors:
                raise ValueError(f"{h}: missing")
            out[m] = tensors.pop(h)
        return out


_KINDS: Dict[str, LayerKind] = {}


def register(kind: LayerKind) -> LayerKind:
    """Add `kind`; its name and symbol must be new (ValueError naming the clash)."""
    if not kind.name or not isinstance(kind.symbol, str) or len(kind.symbol) != 1:
        raise ValueError(f"layer kind {kind!r}: needs a name and a one-character symbol")
    for k in _KINDS.values():
        if k.name == kind.name or k.symbol == kind.symbol:
            raise ValueError(f"layer kind {kind.name!r} (symbol {kind.symbol!r}): clashes with the "
                             f"registered {k.name!r} (symbol {k.symbol!r})")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove the kind `name` (tests and plugins that register temporarily)."""
    _KINDS.pop(name, None)


def kinds() -> List[LayerKind]:
    """All registered kinds, in registration order."""
    return list(_KINDS.values())


def get_kind(name: str) -> LayerKind:
    if name not in _KINDS:
        raise ValueError(f"unknown layer kind {name!r}; registered: {sorted(_KINDS)}")
    return _KINDS[name]


def symbols() -> Dict[str, str]:
    """{pattern symbol: kind name}."""
    return {k.symbol: k.name for k in _KINDS.values()}


def parse_pattern(pattern: str, num_layers: Optional[int] = None, key: str = "pattern") -> List[LayerKind]:
    """The kind of each layer of `pattern` (one symbol per layer). SettingError naming `key`
    for an empty pattern, an unknown symbol or a length other than `num_layers`."""
    table = {k.symbol: k for k in _KINDS.values()}
    allowed = ", ".join(f"{s!r}={k.name}" for s, k in table.items())
    if not isinstance(pattern, str) or not pattern:
        raise SettingError(key, f"a non-empty string of layer symbols ({allowed})", pattern)
    bad = sorted({c for c in pattern if c not in table})
    if bad:
        raise SettingError(key, f"layer symbols among {allowed} (unknown: {bad})", pattern)
    if num_layers is not None and len(pattern) != num_layers:
        raise SettingError(key, f"one symbol per layer (num_layers={num_layers})", pattern)
    return [table[c] for c in pattern]
