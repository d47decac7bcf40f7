"""One small interface over the two model sources ham-eval reads.

    info = describe(checkpoint=DIR) | describe(hf=HF_DIR)      # cheap: configs only, no weights
    model = load(info, device="cpu", dtype="auto")              # -> EvalModel
    out = model.forward(tokens)     # tokens int [b, s] -> Forward(logits fp32 [b, s, vocab],
                                    #   routing {layer: (scores fp32 [b, s], routed bool [b, s])})
    model.taus() / model.set_taus({layer: tau})                 # HAM layers, 0-based layer index
    model.close()

- Megatron checkpoint (`ham-train`'s dist_checkpointing, any TP/PP layout): loaded on ONE
  process at TP=1, PP=1 by `megatron_ham.hf.convert.load_megatron_model` (tensors are stored
  layout-free). Documents as in training: `document_forward_kwargs(tokens, eod)` when the run's
  data.documents is on. Routing: each HAM mixer's `last_scores` / `last_routed` of the forward.
- Hugging Face export (`ham-convert-hf`): loaded with this package's own HAMForCausalLM (the
  export's code is never run); routing from each HAM mixer's `last_scores` / `last_routed`.
Logits cover the real vocabulary only (Megatron's vocab-padding rows are dropped), so both
sources give the same numbers (fp32: ~1e-6).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from .errors import EvalError

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelInfo:
    """What ham-eval knows about a model before loading its weights."""

    source: str  # "megatron" | "hf"
    path: str  # the step dir / the HF dir
    architecture: str
    pattern: str  # one symbol per layer: H (HAM), G (GDN), * (attention)
    vocab_size: int  # the real vocabulary (logits width)
    seq_length: int  # the trained context
    eod_id: Optional[int]
    documents: bool  # the model restarts its state after each EOD
    router: Optional[str]
    kv_fraction: Optional[float]  # the trained KV-fraction target (HAM)
    dtype: str  # the checkpoint's dtype name
    run_config: object = None  # megatron_ham.training.config.RunConfig (data split, seed, sizes)
    run_config_path: Optional[str] = None  # where run_config came from (None: defaults)
    notes: List[str] = field(default_factory=list)  # warnings found while describing

    @property
    def ham_layers(self) -> List[int]:
        from megatron_ham.layers.kinds import get_kind

        ham = get_kind("ham").symbol
        return [i for i, c in enumerate(self.pattern) if c == ham]

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("source", "path", "architecture", "pattern", "vocab_size",
                                              "seq_length", "eod_id", "documents", "router",
                                              "kv_fraction", "dtype", "run_config_path")}


class Forward(NamedTuple):
    logits: torch.Tensor  # fp32 [b, s, vocab]
    routing: Dict[int, Tuple[torch.Tensor, torch.Tensor]]  # layer -> (scores fp32 [b, s], routed bool [b, s])


# ============================================================================ describe
def _run_config(path: Optional[str], model_cfg, notes: List[str]):
    """RunConfig from a saved config / recipe at `path`, else defaults around `model_cfg`."""
    from megatron_ham.training.config import ConfigError, RunConfig, load_config

    if path:
        try:
            return load_config(path), path
        except ConfigError as e:
            notes.append(f"{path}: not usable as a run config ({e}); the data split and seed are "
                         "the recipe defaults")
    cfg = RunConfig()
    if model_cfg is not None:
        cfg.model = model_cfg
    return cfg, None


def training_blend(run_cfg) -> dict:
    """The run's own blend file's info (eod_id, vocab_size, ...) when that file exists here."""
    blend = getattr(run_cfg.data, "blend", None) if run_cfg is not None else None
    if not blend or not os.path.isfile(blend):
        return {}
    try:
        with open(blend, encoding="utf-8") as f:
            raw = json.load(f) if blend.endswith(".json") else __import__("yaml").safe_load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return dict({k: v for k, v in raw.items() if k != "blend"}, path=blend)


def describe(checkpoint: Optional[str] = None, hf: Optional[str] = None,
             run_config: Optional[str] = None) -> ModelInfo:
    """ModelInfo of a Megatron checkpoint (run dir or step dir) or of an HF export dir.
    `run_config`: a recipe / saved config.yaml whose data and train sections define the held-out
    split (default: the checkpoint's config.yaml; for an export, the config.yaml of the checkpoint
    it was exported from when that still exists). Raises EvalError naming the path."""
    if (checkpoint is None) == (hf is None):
        raise EvalError("pass exactly one of --checkpoint DIR or --hf HF_DIR")
    if run_config is not None and not os.path.isfile(run_config):
        raise EvalError(f"--run-config {run_config}: no such file")
    return _describe_megatron(checkpoint, run_config) if checkpoint is not None else _describe_hf(hf, run_config)


def _describe_megatron(checkpoint: str, run_config: Optional[str]) -> ModelInfo:
    from megatron_ham.hf.convert import (ConversionError, export_eod_id, read_run_config,
                                         resolve_checkpoint)

    try:
        step_dir = resolve_checkpoint(checkpoint)
        run = read_run_config(step_dir)
    except ConversionError as e:
        raise EvalError(str(e)) from e
    cfg = run.model
    notes: List[str] = []
    rc, rc_path = _run_config(run_config or os.path.join(step_dir, "config.yaml"), cfg, notes)
    try:
        eod = export_eod_id(run)  # the trainer's order (data.eod_id, tokenizer, blend, 0)
    except ConversionError as e:
        eod = None
        notes.append(f"{step_dir}: {e}")
    documents = bool(run.data.documents)
    if documents and eod is None:
        notes.append(f"{step_dir}: the run's EOD id is unknown here; documents are not separated")
    return ModelInfo("megatron", step_dir, cfg.architecture, cfg.resolved_pattern(), cfg.vocab_size,
                     cfg.seq_length, eod, documents and eod is not None, cfg.router if "H" in cfg.resolved_pattern() else None,
                     float(cfg.kv_fraction), cfg.dtype, rc, rc_path, notes)


def _describe_hf(hf: str, run_config: Optional[str]) -> ModelInfo:
    if not os.path.isdir(hf):
        raise EvalError(f"--hf {hf}: not a directory (expected a ham-convert-hf export)")
    cj = os.path.join(hf, "config.json")
    if not os.path.isfile(cj):
        raise EvalError(f"--hf {hf}: no config.json: not a Hugging Face model directory "
                        "(ham-convert-hf writes one)")
    try:
        with open(cj, encoding="utf-8") as f:
            conf = json.load(f)
    except (OSError, ValueError) as e:
        raise EvalError(f"--hf {cj}: not valid JSON ({e})") from e
    if not isinstance(conf, dict) or conf.get("model_type") != "megatron_ham":
        got = conf.get("model_type") if isinstance(conf, dict) else None
        raise EvalError(f"--hf {hf}: config.json has model_type {got!r}, not 'megatron_ham': not a "
                        "megatron-ham export (make one with ham-convert-hf)")
    if not any(os.path.isfile(os.path.join(hf, n)) for n in ("model.safetensors", "model.safetensors.index.json")):
        raise EvalError(f"--hf {hf}: no model.safetensors (incomplete export?)")
    notes: List[str] = []
    meta, model_cfg = {}, None
    mpath = os.path.join(hf, "megatron_ham_export.json")
    if os.path.isfile(mpath):
        try:
            with open(mpath, encoding="utf-8") as f:
                meta = json.load(f)
            from dataclasses import fields

            from megatron_ham.models import ModelConfig
            from megatron_ham.training.config import model_config_from

            known = {f.name for f in fields(ModelConfig)}
            model_cfg = model_config_from({k: v for k, v in (meta.get("model_config") or {}).items()
                                           if k in known}, where=f"{mpath}: model_config")
        except (OSError, ValueError, TypeError) as e:
            notes.append(f"{mpath}: unreadable ({e}); using config.json only")
            meta, model_cfg = {}, None
    if run_config is None and isinstance(meta.get("checkpoint"), str):
        src = os.path.join(meta["checkpoint"], "config.yaml")
        run_config = src if os.path.isfile(src) else None
    rc, rc_path = _run_config(run_config, model_cfg, notes)
    if rc_path is None:
        notes.append(f"--hf {hf}: no run config (pass --run-config CONFIG_YAML): a blend's held-out "
                     f"split uses the defaults split={rc.data.split!r}, seed={rc.train.seed}")
    pattern = str(conf.get("layer_pattern", ""))
    eod = conf.get("eod_token_id")
    return ModelInfo("hf", os.path.abspath(hf), model_cfg.architecture if model_cfg else "hybrid", pattern,
                     int(conf["vocab_size"]), int(conf.get("max_position_embeddings") or 0),
                     None if eod is None else int(eod), bool(conf.get("reset_at_eod")) and eod is not None,
                     conf.get("router") if "H" in pattern else None, conf.get("kv_fraction"),
                     str(conf.get("dtype") or conf.get("torch_dtype") or "float32"), rc, rc_path, notes)


# ============================================================================ load
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {device}: CUDA is not available on this machine")
    return dev


def _compute_dtype(info: ModelInfo, dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        if dtype not in DTYPE_NAMES:
            raise EvalError(f"--dtype must be one of auto, {', '.join(DTYPE_NAMES)}; got {dtype!r}")
        return DTYPE_NAMES[dtype]
    if device.type == "cpu":
        return torch.float32  # bf16 matmuls on CPU are slow and lose precision for nothing
    name = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(info.dtype, info.dtype)
    return DTYPE_NAMES.get(name, torch.float32)


def load(info: ModelInfo, device: str = "auto", dtype: str = "auto") -> "EvalModel":
    dev = resolve_device(device)
    dt = _compute_dtype(info, dtype, dev)
    cls = MegatronEvalModel if info.source == "megatron" else HFEvalModel
    return cls(info, dev, dt)


class EvalModel:
    """Common interface (see the module docstring). Layers are 0-based global indices."""

    def __init__(self, info: ModelInfo, device: torch.device, dtype: torch.dtype):
        self.info, self.device, self.dtype = info, device, dtype

    @property
    def ham_layers(self) -> List[int]:
        return self.info.ham_layers

    def forward(self, tokens: torch.Tensor) -> Forward:  # pragma: no cover - abstract
        raise NotImplementedError

    def taus(self) -> Dict[int, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_taus(self, taus: Dict[int, float]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def num_parameters(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(f"tokens must be an int tensor [b, s], got "
                             f"{getattr(tokens, 'shape', type(tokens).__name__)}")
        return tokens.to(self.device, torch.long)


class MegatronEvalModel(EvalModel):
    """A ham-train checkpoint as a TP=1, PP=1 Megatron GPTModel in one process."""

    def __init__(self, info: ModelInfo, device: torch.device, dtype: torch.dtype):
        super().__init__(info, device, dtype)
        import torch.distributed as dist

        from megatron_ham.hf.convert import ConversionError, load_megatron_model, read_run_config
        from megatron_ham.layers.ham_mixer import HAMMixer

        self._owns_group = not dist.is_initialized()
        cfg = read_run_config(info.path).model
        try:
            model = load_megatron_model(info.path, cfg)
        except ConversionError as e:
            raise EvalError(str(e)) from e
        self.model = model.to(device=device, dtype=dtype).eval()
        self._mixers = [(int(m.layer_number) - 1, m) for m in self.model.modules() if isinstance(m, HAMMixer)]

    def forward(self, tokens: torch.Tensor) -> Forward:
        from megatron_ham.models import document_forward_kwargs

        tokens = self._check_tokens(tokens)
        b, s = tokens.shape
        kw = document_forward_kwargs(tokens, self.info.eod_id) if self.info.documents else {}
        with torch.no_grad():
            out = self.model(tokens, None, None, **kw)
        if out.shape[0] != b:
            out = out.transpose(0, 1)  # [s, b, v] on older megatron-core
        routing = {}
        for i, m in self._mixers:
            routing[i] = (m.last_scores.reshape(b, s).float(), m.last_routed.reshape(b, s))
        return Forward(out[..., : self.info.vocab_size].float(), routing)

    def taus(self) -> Dict[int, float]:
        return {i: float(m.kv_controller.tau) for i, m in self._mixers}

    def set_taus(self, taus: Dict[int, float]) -> None:
        for i, m in self._mixers:
            if i in taus:
                m.kv_controller.set_tau(float(taus[i]))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def close(self) -> None:
        import torch.distributed as dist

        if self._owns_group and dist.is_initialized():
            from megatron_ham.distributed import destroy

            destroy()


class HFEvalModel(EvalModel):
    """A ham-convert-hf export through this package's HAMForCausalLM (its own code is not run)."""

    def __init__(self, info: ModelInfo, device: torch.device, dtype: torch.dtype):
        super().__init__(info, device, dtype)
        import megatron_ham.hf  # noqa: F401  (registers model_type megatron_ham)
        from megatron_ham.hf import HAMForCausalLM

        try:
            model = HAMForCausalLM.from_pretrained(info.path, dtype=dtype)
        except (OSError, ValueError, KeyError) as e:
            raise EvalError(f"--hf {info.path}: cannot load the export ({type(e).__name__}: {e})") from e
        self.model = model.to(device).eval()
        self._mixers = [(i, m) for i, m in self.model.ham_mixers()]

    def forward(self, tokens: torch.Tensor) -> Forward:
        tokens = self._check_tokens(tokens)
        b, s = tokens.shape
        with torch.no_grad():
            logits = self.model(tokens, use_cache=False).logits
        routing = {i: (m.last_scores.reshape(b, s).float(), m.last_routed.reshape(b, s))
                   for i, m in self._mixers}
        return Forward(logits.float(), routing)

    def taus(self) -> Dict[int, float]:
        return {i: float(m.tau) for i, m in self._mixers}

    def set_taus(self, taus: Dict[int, float]) -> None:
        n = self.model.config.num_hidden_layers
        self.model.set_tau([float(taus[i]) if i in taus else None for i in range(n)])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


__all__ = ["ModelInfo", "Forward", "EvalModel", "describe", "load", "resolve_device"]
