"""Recipe YAML + `key=value` overrides -> one validated, typed `RunConfig`.

A recipe is a YAML mapping with the sections of `RunConfig` (model, parallel, train, data,
checkpoint, logging) plus two optional top-level keys:

    base: _base.yaml        # another recipe (path relative to this file, or a list of them);
                            # this file's settings are deep-merged over the base's
    name: ham-800m          # the run's name (defaults to the recipe file's stem)

Overrides are dotted `key=value` strings (`train.lr=3e-4 model.num_layers=2`); the value is
parsed as YAML (so `true`, `1e-4`, `[1, 2]`, `null` work). Every key must exist in the schema
and every value must have the field's type: errors are `ConfigError` (a ValueError) naming the
dotted key and where it came from (the recipe file, or "override 'k=v'").

`model:` maps 1:1 onto `megatron_ham.models.ModelConfig`; the other sections are the dataclasses
below. Defaults are the tiny CPU settings; the paper recipes override them.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import yaml

from megatron_ham.models.config import ModelConfig, SettingError


class ConfigError(ValueError):
    """A recipe / override error; the message names the key and its source."""


# ----------------------------------------------------------------------------- schema
@dataclass
class ParallelConfig:
    """Model parallel layout; data parallelism is world_size / (tp * pp)."""

    tp: int = 1  # tensor model parallel size
    pp: int = 1  # pipeline model parallel size
    vp: Optional[int] = None  # virtual pipeline stages per rank (interleaved 1F1B), pp > 1 only


@dataclass
class TrainConfig:
    """Optimisation and schedule. One step = one global batch = one optimizer update."""

    train_steps: int = 50
    global_batch_size: int = 8  # sequences per step (all data-parallel ranks together)
    micro_batch_size: int = 1  # sequences per forward on one rank
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 5
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    lr_decay_steps: Optional[int] = None  # default: train_steps
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    # Megatron's activation recomputation of whole layers: "none"; "full" (every layer, in
    # uniform chunks of `recompute_num_layers`); "block" (only the first `recompute_num_layers`
    # layers of each pipeline stage: trade a little compute for just enough memory).
    recompute: Literal["none", "full", "block"] = "none"
    recompute_num_layers: int = 1
    overlap_grad_reduce: bool = True
    use_distributed_optimizer: bool = True
    # Megatron's gradient accumulation fusion: each weight gradient is summed into the fp32
    # main_grad by its GEMM (training/wgrad_fusion.py; apex's kernel if installed, else torch's
    # addmm with an fp32 output). "auto" = where it runs (CUDA), "on" = required, "off" = never.
    gradient_accumulation_fusion: Literal["auto", "on", "off"] = "auto"
    grad_reduce_in_fp32: bool = True
    eval_interval: int = 0  # validation every N steps (0 = never)
    eval_iters: int = 2  # global batches per validation
    # the per-rank memory the start-up check compares its lower bound with (training/memory.py):
    # null = the device (GPU memory, or RAM / ranks on the host); a number of GiB; 0 = no check
    memory_budget_gib: Optional[float] = None
    # persistent compilation caches (training/compile_cache.py): one directory for Inductor,
    # Triton and TileLang that survives the job (null = the compilers' own defaults), and
    # optionally a node-local copy of it (copied in at start, new entries copied back at exit)
    compile_cache_dir: Optional[str] = None
    compile_cache_local: Optional[str] = None


@dataclass
class DataConfig:
    """Where tokens come from.

    backend "megatron": GPTDataset over IndexedDataset prefixes via BlendedMegatronDatasetBuilder;
        `blend` is a blend file written by ham-prep-data (YAML/JSON list of {prefix, weight};
        relative prefixes resolve against the file's directory) and/or `prefixes` + `weights`.
    backend "webdataset": token shards written by ham-prep-data --format webdataset (`urls`).
    backend "synthetic": random tokens (benchmarks only; no learning signal).
    """

    backend: Literal["megatron", "webdataset", "synthetic"] = "megatron"
    blend: Optional[str] = None
    prefixes: List[str] = field(default_factory=list)
    weights: List[float] = field(default_factory=list)
    split: str = "98,2,0"  # train, valid, test fractions of each component's documents
    eod_id: Optional[int] = None  # default: from `tokenizer`, else the blend file's, else 0
    tokenizer: Optional[str] = None  # HF tokenizer directory (for the EOD id and the record)
    cache_dir: Optional[str] = None  # GPTDataset index cache (default: <checkpoint.dir>/../data_cache)
    urls: List[str] = field(default_factory=list)  # webdataset shards (brace patterns allowed)
    allow_pipe_urls: bool = False  # let data.urls hold `pipe:` URLs (shell commands run on every rank)
    documents: bool = True  # respect EOD boundaries in the model (document_forward_kwargs)
    # which tokens the loss averages over: "all" (every token, as Megatron pretraining) or
    # "blend" (per-token 0/1 weights from each blend entry's `loss_mask` IndexedDataset, e.g.
    # the answer tokens of a recall mixture written with --loss-mask; docs/training.md)
    loss_mask: Literal["all", "blend"] = "all"


@dataclass
class CheckpointConfig:
    """dist_checkpointing saves under `dir`/step_XXXXXXXX, published atomically (docs/training.md)."""

    dir: str = "runs/default/checkpoints"
    interval: int = 0  # save every N steps (0 = only at the end and on signals)
    keep_last: int = 0  # delete older complete checkpoints beyond the newest N (0 = keep all)
    resume: bool = True  # auto-resume from `latest` when it exists
    save_at_end: bool = True


@dataclass
class LoggingConfig:
    interval: int = 1  # print/log every N steps
    tensorboard_dir: Optional[str] = None  # default: <checkpoint.dir>/../tensorboard
    jsonl: Optional[str] = None  # metrics as JSON lines; default: <checkpoint.dir>/../metrics.jsonl
    peak_tflops: Optional[float] = None  # per-device peak for MFU; default by device name
    log_kv_layers: bool = True  # per-layer KV fraction and tau


@dataclass
class RunConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading
_RESERVED = ("base", "inherit")


MAX_YAML_BYTES = 1 << 20  # recipes and sweeps are a few KB
MAX_YAML_NODES = 100_000  # after alias expansion; a 755-byte alias bomb expands to ~10^9


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses documents whose aliases expand beyond MAX_YAML_NODES (or
    refer to themselves), checked on the node graph before anything is constructed."""

    def compose_document(self):
        node = super().compose_document()
        _check_expansion(node)
        return node


def _children(node):
    if isinstance(node, yaml.MappingNode):
        return [x for kv in node.value for x in kv]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root) -> None:
    """Count the nodes of the document as constructed (shared alias targets once per use)."""
    size, open_, stack = {}, set(), [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            open_.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in _children(node))
            if size[id(node)] > MAX_YAML_NODES:
                raise yaml.YAMLError(f"aliases expand to more than {MAX_YAML_NODES} nodes (an alias bomb?)")
            continue
        if id(node) in size:
            continue
        open_.add(id(node))
        stack.append((node, True))
        for c in _children(node):
            if id(c) in open_:
                raise yaml.YAMLError(f"a recursive alias at {c.start_mark}")
            if id(c) not in size:
                stack.append((c, False))


def parse_yaml(text: str):
    """yaml.safe_load with the size and alias-expansion bounds (raises yaml.YAMLError)."""
    if len(text) > MAX_YAML_BYTES:
        raise yaml.YAMLError(f"{len(text)} characters, more than {MAX_YAML_BYTES}")
    return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_file(path: str, what: str = "recipe"):
    """Parse a YAML file with the bounds; ConfigError names the file (missing, too large, bad YAML)."""
    try:
        size = os.path.getsize(path)
        if size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: {size} bytes; a {what} is at most {MAX_YAML_BYTES}")
        with open(path, encoding="utf-8") as f:
            return parse_yaml(f.read(MAX_YAML_BYTES + 1))
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a {what} file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the {what} ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def _read_yaml(path: str) -> dict:
    doc = read_yaml_file(path)
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping, got {type(doc).__name__}")
    return doc


def _merge(dst: dict, src: dict, sources: dict, origin: str, prefix: str = "") -> None:
    """Deep-merge `src` into `dst`, recording each leaf's origin in `sources` (dotted keys)."""
    for k, v in src.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v, sources, origin, key + ".")
        else:
            dst[k] = v
            sources[key] = origin
            if isinstance(v, dict):
                for sub in _leaf_keys(v, key + "."):
                    sources[sub] = origin


def _leaf_keys(d: dict, prefix: str):
    for k, v in d.items():
        yield f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _leaf_keys(v, f"{prefix}{k}.")


def load_recipe_tree(path: str, _seen: Tuple[str, ...] = ()) -> Tuple[dict, dict]:
    """The merged mapping of `path` and its bases, and {dotted key: source file}."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"{path}: circular base: {' -> '.join(_seen + (path,))}")
    doc = _read_yaml(path)
    bases = doc.get("base", doc.get("inherit"))
    merged: dict = {}
    sources: dict = {}
    if bases is not None:
        if isinstance(bases, str):
            bases = [bases]
        if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
            raise ConfigError(f"{path}: key 'base': expected a file name or a list of them, got {bases!r}")
        for b in bases:
            bpath = b if os.path.isabs(b) else os.path.join(os.path.dirname(path), b)
            bdoc, bsrc = load_recipe_tree(bpath, _seen + (path,))
            _merge(merged, bdoc, sources, "")
            sources.update(bsrc)
    own = {k: v for k, v in doc.items() if k not in _RESERVED}
    _merge(merged, own, sources, path)
    return merged, sources


def parse_override(text: str) -> Tuple[List[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 3e-4). The value is YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {text!r}: bad key {key!r} (expected dotted.key=value)")
    try:
        value = parse_yaml(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from None
    return parts, value


def apply_overrides(tree: dict, sources: dict, overrides: List[str]) -> None:
    for text in overrides:
        parts, value = parse_override(text)
        node = tree
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[:-1])} is not a section")
            node = nxt
        node[parts[-1]] = value
        sources[".".join(parts)] = f"override {text!r}"


# ----------------------------------------------------------------------------- typing
_FLOAT_RE = __import__("re").compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str, where: str):
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}': expected a mapping (section), got {value!r}")
        return _build(tp, value, key, None, where)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):  # YAML 1.1: on/off are booleans
            value = "on" if value else "off"
        if value not in args:
            raise ConfigError(f"{where}: key '{key}': expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: key '{key}': expected a list, got {value!r}")
        (et,) = args or (Any,)
        return [_coerce(v, et, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: key '{key}': expected bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: key '{key}': expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: key '{key}': expected float, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{where}: key '{key}': expected a finite number, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off (yes/no) as booleans: fusions=on
            value = "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"{where}: key '{key}': expected str, got {value!r}")
        return value
    raise ConfigError(f"{where}: key '{key}': unsupported schema type {tp!r}")  # pragma: no cover


def _source_of(sources: Optional[dict], key: str, default: str) -> str:
    if sources:
        if sources.get(key):
            return sources[key]
        for k, v in sources.items():
            if k.startswith(key + ".") and v:
                return v
    return default


def _build(cls, data: dict, prefix: str, sources: Optional[dict], default_where: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        where = _source_of(sources, key, default_where)
        if k not in known:
            raise ConfigError(
                f"{where}: unknown key '{key}' (valid keys here: {', '.join(sorted(known))})"
            )
        if dataclasses.is_dataclass(hints[k]):
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: key '{key}': expected a mapping (section), got {v!r}")
            kwargs[k] = _build(hints[k], v, key, sources, default_where)
        else:
            kwargs[k] = _coerce(v, hints[k], key, where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{default_where}: section '{prefix or '<top>'}': {e}") from None


def load_config(recipe: Optional[str], overrides: Optional[List[str]] = None,
                sections: Optional[Tuple[str, ...]] = None) -> RunConfig:
    """Load, merge and validate a recipe (None = the built-in tiny defaults) plus overrides.

    sections: read only these top-level keys of the merged recipe (the others keep their
    defaults); None reads everything.
    """
    overrides = list(overrides or [])
    if recipe is not None:
        tree, sources = load_recipe_tree(recipe)
        where = os.path.abspath(recipe)
    else:
        tree, sources, where = {}, {}, "<defaults>"
    apply_overrides(tree, sources, overrides)
    if sections is not None:
        tree = {k: v for k, v in tree.items() if k in sections}
    tree.setdefault("name", os.path.splitext(os.path.basename(recipe))[0] if recipe else "run")
    cfg = _build(RunConfig, tree, "", sources, where)
    validate(cfg, sources, where)
    return cfg


#: what a model (and its export) needs of a run config
MODEL_SECTIONS = ("name", "model", "data")


def model_config_from(mapping: dict, where: str):
    """A ModelConfig from a mapping (e.g. the model_config an export records), each key checked
    as a recipe's `model.<key>` (ConfigError naming the key and `where`)."""
    return _build(ModelConfig, mapping, "model", None, where)


def load_run_config(path: str) -> RunConfig:
    """The run config a checkpoint was saved with (its `config.yaml`, written by ham-train) or a
    recipe, loaded as ham-train loads a recipe, reading only the `model` and `data` sections:
    the other sections do not describe the model, and a saved config may carry keys of another
    version there. Used by ham-convert-hf and anything else that rebuilds a trained model."""
    return load_config(path, sections=MODEL_SECTIONS)


def validate(cfg: RunConfig, sources: Optional[dict] = None, where: str = "<config>") -> None:
    """Cross-field checks that need no process group (world size is checked at start-up)."""
    src = lambda k: (sources or {}).get(k, where) or where  # noqa: E731

    def bad(key, msg):
        raise ConfigError(f"{src(key)}: key '{key}': {msg}")

    t = cfg.train
    for k in ("train_steps", "global_batch_size", "micro_batch_size", "eval_iters", "recompute_num_layers"):
        if getattr(t, k) <= 0:
            bad(f"train.{k}", f"must be > 0, got {getattr(t, k)}")
    if t.global_batch_size % t.micro_batch_size:
        bad("train.global_batch_size",
            f"{t.global_batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}")
    if t.warmup_steps < 0 or t.warmup_steps > t.train_steps:
        bad("train.warmup_steps", f"must be in [0, train.train_steps={t.train_steps}], got {t.warmup_steps}")
    if not 0 <= t.lr < float("inf"):  # 0 freezes the weights (a dry run of the step)
        bad("train.lr", f"must be finite and >= 0, got {t.lr}")
    if not 0 <= t.min_lr <= t.lr:
        bad("train.min_lr", f"must be in [0, train.lr={t.lr}], got {t.min_lr}")
    for k in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, k) < 1:
            bad(f"train.{k}", f"must be in [0, 1), got {getattr(t, k)}")
    for k, low in (("adam_eps", "> 0"), ("weight_decay", ">= 0"), ("clip_grad", ">= 0")):
        v = getattr(t, k)
        if not (v > 0 if low == "> 0" else v >= 0):
            bad(f"train.{k}", f"must be {low}, got {v}")
    if t.eval_interval < 0:
        bad("train.eval_interval", f"must be >= 0, got {t.eval_interval}")
    if t.memory_budget_gib is not None and t.memory_budget_gib < 0:
        bad("train.memory_budget_gib", f"must be >= 0 (0 = no check; null = the device), got {t.memory_budget_gib}")
    _check_compile_cache(t, bad)
    if cfg.parallel.tp < 1:
        bad("parallel.tp", f"must be >= 1, got {cfg.parallel.tp}")
    if cfg.parallel.pp < 1:
        bad("parallel.pp", f"must be >= 1, got {cfg.parallel.pp}")
    if cfg.parallel.vp is not None and (cfg.parallel.pp == 1 or cfg.parallel.vp < 1):
        bad("parallel.vp", "virtual pipeline stages need parallel.pp > 1 and vp >= 1")
    d = cfg.data
    if d.backend == "megatron" and not d.blend and not d.prefixes:
        bad("data.blend", "backend 'megatron' needs data.blend (a blend file) or data.prefixes")
    if d.loss_mask == "blend" and (d.backend != "megatron" or not d.blend or d.prefixes):
        bad("data.loss_mask", "'blend' needs backend 'megatron' and data.blend only (no data.prefixes): "
            "the masks are named by the blend file's entries")
    if d.prefixes and d.weights and len(d.weights) != len(d.prefixes):
        bad("data.weights", f"{len(d.weights)} weights for {len(d.prefixes)} prefixes")
    if d.backend == "webdataset" and not d.urls:
        bad("data.urls", "backend 'webdataset' needs data.urls (shard paths or brace patterns)")
    try:
        parts = [float(x) for x in d.split.split(",")]
        assert len(parts) == 3 and all(p >= 0 for p in parts) and sum(parts) > 0
    except Exception:
        bad("data.split", f"expected three comma-separated non-negative numbers like '98,2,0', got {d.split!r}")
    if cfg.checkpoint.interval < 0:
        bad("checkpoint.interval", f"must be >= 0 (0 = only at the end and on signals), got {cfg.checkpoint.interval}")
    if cfg.checkpoint.keep_last < 0:
        bad("checkpoint.keep_last", f"must be >= 0 (0 = keep all), got {cfg.checkpoint.keep_last}")
    if cfg.logging.interval <= 0:
        bad("logging.interval", f"must be > 0, got {cfg.logging.interval}")
    if cfg.logging.peak_tflops is not None and cfg.logging.peak_tflops <= 0:
        bad("logging.peak_tflops", f"must be > 0 (or null), got {cfg.logging.peak_tflops}")
    _check_size_bounds(cfg, src)
    try:
        cfg.model.validate(tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    except SettingError as e:
        bad(f"model.{e.key}", f"expected {e.expected}, got {e.got!r}")


def _check_compile_cache(t: TrainConfig, bad) -> None:
    """train.compile_cache_dir / compile_cache_local: usable paths, the local copy distinct from
    (and not nested with) the shared directory. Writability is checked at start-up."""
    for k in ("compile_cache_dir", "compile_cache_local"):
        v = getattr(t, k)
        if v is not None and (not v.strip() or any(c in v for c in "\0\n\r")):
            bad(f"train.{k}", f"expected a directory path (or null), got {v!r}")
    if t.compile_cache_local is not None:
        if t.compile_cache_dir is None:
            bad("train.compile_cache_local", "a node-local copy needs train.compile_cache_dir (the shared cache)")
        a, b = (os.path.abspath(x) for x in (t.compile_cache_dir, t.compile_cache_local))
        if a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep):
            bad("train.compile_cache_local",
                f"must be a directory apart from train.compile_cache_dir={t.compile_cache_dir!r}, got {t.compile_cache_local!r}")


def _check_size_bounds(cfg: RunConfig, src) -> None:
    """Before ModelConfig.validate builds the layer pattern: a layer count this code could ever
    build, and the memory floor of training/memory.py against its absolute ceiling (or
    train.memory_budget_gib). The device comparison happens at start-up (loop.setup)."""
    from . import memory

    m = cfg.model
    for k in ("num_layers", "hidden_size", "seq_length", "vocab_size", "make_vocab_size_divisible_by",
              "ffn_hidden_size"):
        v = getattr(m, k)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "ffn_hidden_size" else 1):
            return  # ModelConfig.validate names it
    if m.num_layers > memory.MAX_LAYERS:
        raise ConfigError(f"{src('model.num_layers')}: key 'model.num_layers': {m.num_layers} layers; "
                          f"at most {memory.MAX_LAYERS}")
    budget = cfg.train.memory_budget_gib
    if budget == 0:
        return
    gib = memory.MAX_RANK_GIB if budget is None else budget
    name = f"the {gib:g} GiB ceiling of any one rank" if budget is None else f"train.memory_budget_gib={gib:g}"
    memory.check(cfg, memory.estimate(cfg), gib * 2.0 ** 30, name, lambda k: f"{src(k)}: key '{k}'")


def dump_config(cfg: RunConfig) -> str:
    """The fully resolved config as YAML (written next to the checkpoints)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
