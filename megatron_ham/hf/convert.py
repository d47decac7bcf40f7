"""ham-convert-hf: a megatron-ham dist_checkpointing checkpoint -> a Hugging Face model directory.

    ham-convert-hf --checkpoint RUN_DIR_OR_STEP_DIR --output DIR [--tokenizer PATH] [--dtype fp32]

Steps (all in one process, on CPU, torch.distributed gloo world of size 1):
  1. resolve the checkpoint: a step dir (step_XXXXXXXX with metadata.json and train_state.json),
     or a run's checkpoint dir (its `latest` pointer, else the newest complete step dir);
  2. read the run config the trainer saved next to the shards (config.yaml: its model / data
     sections, loaded as ham-train loads a recipe: training.config.load_run_config) and the EOD
     id training used (training.data.resolve_eod_id, the trainer's own order);
  3. build the Megatron model at TP=1, PP=1 (the checkpoint may have any TP/PP layout: its
     tensors are stored layout-free) and load the model part of the checkpoint into it;
  4. map the Megatron state dict to HF names (each layer kind's key map: fused projections split
     by its section table; vocab padding dropped, per-layer tau into the config) and write, into
     a temp dir next to --output: model.safetensors, config.json (with auto_map),
     generation_config.json, the tokenizer (data files from an allow-list,
     hf/tokenizer_files.py), then the modeling code last (configuration_ham.py, modeling_ham.py,
     ham_ops.py and the megatron_ham.ops files it needs, layer_kinds.py for the model's kinds and
     the HF module of a plugin kind), and megatron_ham_export.json (the list of files written);
  5. with --verify, load that directory in a fresh process without megatron_ham
     (hf/verify_export.py) and compare its logits with the Megatron model's; then give it normal
     permissions and rename it to --output (an existing export of this tool is replaced only
     with --overwrite, and only the files it lists are deleted: megatron_ham/publish.py).
Errors name the path / key at fault. See docs/export.md for the name mapping, docs/security.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import torch

from megatron_ham.models.config import DTYPES
from megatron_ham.publish import publish_dir, temp_dir_for

from .tokenizer_files import check_tokenizer, write_tokenizer

PROG = "ham-convert-hf"
MARKER = "train_state.json"
OPS_FILES = ("gated_delta_rule.py", "scratchpad.py", "routing.py", "combine.py", "short_conv.py",
             "gdn_activations.py", "norm.py", "rope.py", "_checks.py", "_kernels.py")
CODE_FILES = ("configuration_ham.py", "modeling_ham.py")
EXPORT_JSON = "megatron_ham_export.json"
#: a decoder layer's norms: (Megatron name, HF name)
LAYER_NORMS = (("input_layernorm", "input_layernorm"), ("pre_mlp_layernorm", "post_attention_layernorm"))


class ConversionError(RuntimeError):
    """A checkpoint / config problem; the message names the path or key."""


def log(msg: str) -> None:
    print(f"[{PROG}] {msg}", flush=True)


# ============================================================================ checkpoint paths
def resolve_checkpoint(path: str) -> str:
    """The step directory to convert: `path` itself when it is a checkpoint, else the run dir's
    `latest`, else its newest complete step_XXXXXXXX -- verified before anything is loaded
    (training.checkpoint.usable_checkpoints, shared with ham-train's resume: a damaged one is
    reported and an older one used; foreign code in it is refused). ConversionError names the path."""
    from megatron_ham.training.checkpoint import usable_checkpoints
    from megatron_ham.training.safe_checkpoint import CheckpointError

    try:
        found = next(usable_checkpoints(path, warn=log), None)
    except CheckpointError as e:
        raise ConversionError(f"--checkpoint {e}") from None
    if found is None:
        found_names = ", ".join(sorted(os.listdir(path))[:10]) or "nothing"
        raise ConversionError(
            f"--checkpoint {path}: no complete checkpoint found (a complete step_XXXXXXXX dir has "
            f"metadata.json and {MARKER}; found: {found_names})")
    return found


# ============================================================================ run config
def read_run_config(step_dir: str, config_path: Optional[str] = None):
    """The RunConfig of the checkpoint: config.yaml next to the shards (or `config_path`, a run
    config or a recipe), its model / data sections loaded as ham-train loads a recipe
    (training.config.load_run_config: unknown keys and wrong types are errors naming the key and
    the file)."""
    from megatron_ham.training.config import load_run_config

    path = config_path or os.path.join(step_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: missing (the run config saved with the checkpoint; pass "
                              "--config RECIPE_OR_CONFIG_YAML when it is elsewhere)")
    return load_run_config(path)


def export_eod_id(run) -> int:
    """The EOD id the run trained with: training.data.resolve_eod_id, the trainer's order
    (data.eod_id, which ham-train records in the saved config; else data.tokenizer's EOS; else
    the blend file's eod_id; else 0). Raises ConversionError when the file that decided it is
    not readable here."""
    from megatron_ham.training.data import read_blend, resolve_eod_id

    d = run.data
    try:
        info = None
        if d.eod_id is None and not d.tokenizer and d.backend == "megatron" and d.blend:
            info = read_blend(d.blend)[2]
        return resolve_eod_id(run, info)
    except Exception as e:  # a missing tokenizer / blend file, an unreadable one
        raise ConversionError(f"cannot resolve the EOD id the run trained with ({type(e).__name__}: "
                              f"{e}); pass --config with data.eod_id set") from e


# ============================================================================ Megatron side
_OWN_GROUP = False  # True when this module created the process group (main() tears it down)


def _init_single_process() -> None:
    """gloo world of size 1 with a file rendezvous (no port to collide with other jobs)."""
    global _OWN_GROUP
    import torch.distributed as dist

    from megatron_ham.distributed import initialize

    if not dist.is_initialized():
        _OWN_GROUP = True
        fd, rdv = tempfile.mkstemp(prefix="ham_convert_rdv_")
        os.close(fd)
        os.remove(rdv)
        dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise ConversionError(f"{PROG} runs in one process; torch.distributed has world size "
                              f"{dist.get_world_size()}")
    initialize(tp=1, pp=1, backend="gloo")


def load_megatron_model(step_dir: str, cfg):
    """Build the TP=1, PP=1 Megatron model for `cfg` on CPU and load the checkpoint's model."""
    from megatron.core import dist_checkpointing

    from megatron_ham.models import build_model

    _init_single_process()
    cfg.use_cpu_initialization = True
    cfg.sequence_parallel = False
    model = build_model(cfg)
    check_checkpoint_shapes(model, step_dir)
    sharded = model.sharded_state_dict()
    from torch.distributed.checkpoint.api import CheckpointException  # not an Exception subclass

    from megatron_ham.training.checkpoint import describe_load_failure

    try:
        loaded = dist_checkpointing.load({"model": sharded}, step_dir)
    except (Exception, CheckpointException) as e:  # name the checkpoint and the bad file
        raise ConversionError(f"--checkpoint {describe_load_failure(step_dir, e)}") from None
    model.load_state_dict(loaded["model"], strict=True)
    model.eval()
    return model


def check_checkpoint_shapes(model, step_dir: str) -> None:
    """Every model tensor must be in the checkpoint with the same global shape (a run config
    that does not match the checkpoint would otherwise load partially). Raises ConversionError
    naming the key and both shapes."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors

    from torch.distributed.checkpoint.api import CheckpointException

    try:
        meta = dist_checkpointing.load_tensors_metadata(step_dir)
    except (Exception, CheckpointException) as e:
        raise ConversionError(f"--checkpoint {step_dir}: cannot read the tensor metadata "
                              f"({type(e).__name__}: {e})") from e
    sd = model.sharded_state_dict()
    apply_factories(sd)
    tensors, _ = extract_sharded_tensors(sd)
    problems = []

    def visit(x):
        if isinstance(x, ShardedTensor):
            if x.key not in meta:
                problems.append(f"{x.key}: not in the checkpoint")
            elif tuple(meta[x.key].global_shape) != tuple(x.global_shape):
                problems.append(f"{x.key}: checkpoint shape {list(meta[x.key].global_shape)}, "
                                f"model shape {list(x.global_shape)}")
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    visit(tensors)
    if problems:
        raise ConversionError(
            f"--checkpoint {step_dir}: does not match the model built from the run config "
            f"({len(problems)} tensor(s)): " + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else ""))


# ============================================================================ name mapping
def megatron_to_hf(sd: Dict[str, torch.Tensor], cfg) -> Tuple[Dict[str, torch.Tensor], List[Optional[float]]]:
    """Megatron GPTModel state dict (TP=1) -> (HF state dict, per-layer tau (None for non-HAM)).

    The embedding, norms, MLP and output layer are mapped here; each layer's mixer by its layer
    kind (LayerKind.to_hf, into the kind's HF slot). Every Megatron key must be consumed (else
    ConversionError naming it)."""
    from megatron_ham.layers.kinds import parse_pattern

    sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    out: Dict[str, torch.Tensor] = {}
    used = set()

    def take(key):
        if key not in sd:
            raise ConversionError(f"checkpoint model state: missing key {key!r}")
        used.add(key)
        return sd[key].detach().clone()

    V = cfg.vocab_size
    out["model.embed_tokens.weight"] = take("embedding.word_embeddings.weight")[:V]
    taus: List[Optional[float]] = []
    for i, kind in enumerate(parse_pattern(cfg.resolved_pattern(), cfg.num_layers)):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        for norm_m, norm_h in LAYER_NORMS:
            out[f"{h}{norm_h}.weight"] = take(f"{m}{norm_m}.weight")
            if f"{m}{norm_m}.bias" in sd:
                out[f"{h}{norm_h}.bias"] = take(f"{m}{norm_m}.bias")
        fc1 = take(f"{m}mlp.linear_fc1.weight")
        f = fc1.shape[0] // 2
        out[f"{h}mlp.gate_proj.weight"], out[f"{h}mlp.up_proj.weight"] = fc1[:f], fc1[f:]
        out[f"{h}mlp.down_proj.weight"] = take(f"{m}mlp.linear_fc2.weight")
        a = f"{m}self_attention."
        state = {k[len(a):]: sd[k].detach().clone() for k in sd if k.startswith(a)}
        names = set(state)
        try:
            tensors, entries = kind.to_hf(state, cfg)
        except (KeyError, ValueError) as e:
            raise ConversionError(f"checkpoint model state: layer {i} ({kind.name}): {a}{e}") from e
        used.update(a + k for k in names - set(state))
        out.update({f"{h}{kind.hf_slot}.{k}": t for k, t in tensors.items()})
        taus.append(entries.get("tau"))
    out["model.norm.weight"] = take("decoder.final_layernorm.weight")
    if "decoder.final_layernorm.bias" in sd:
        out["model.norm.bias"] = take("decoder.final_layernorm.bias")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("output_layer.weight")[:V]
    left = sorted(set(sd) - used)
    if left:
        raise ConversionError(f"checkpoint model state: keys with no HF mapping: {left[:8]}"
                              f"{' ...' if len(left) > 8 else ''}")
    return out, taus


def special_token_ids(tokenizer: Optional[str], eod: Optional[int]) -> Dict[str, Optional[int]]:
    """The export's bos / eos / pad ids (config.json and generation_config.json alike):
    eos = the EOD the model trained with (a row stops at the end of its document); pad = the
    pad token of the tokenizer shipped (`tokenizer`: an HF tokenizer dir or a tokenizer.json),
    else the EOD; bos = the tokenizer's BOS, else None. Padding is a "no token" to the model
    (attention_mask 0), so the pad id only has to be the one the tokenizer pads with."""
    ids = {"bos_token_id": None, "eos_token_id": eod, "pad_token_id": eod}
    if not tokenizer or not os.path.exists(tokenizer):
        return ids
    try:
        if os.path.isdir(tokenizer):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=False)
        else:
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer)
    except Exception as e:  # the copy fallback of write_tokenizer: ids from the EOD alone
        log(f"warning: tokenizer {tokenizer} did not load ({type(e).__name__}: {e}); pad = eos = EOD {eod}")
        return ids
    if tok.pad_token_id is not None:
        ids["pad_token_id"] = int(tok.pad_token_id)
    if tok.bos_token_id is not None:
        ids["bos_token_id"] = int(tok.bos_token_id)
    if tok.eos_token_id is not None and eod is not None and tok.eos_token_id != eod:
        log(f"warning: the tokenizer's EOS id {tok.eos_token_id} is not the EOD id {eod} the model "
            f"trained with; eos_token_id = {eod}")
    return ids


def hf_config_from(cfg, taus, eod: Optional[int], documents: bool,
                   special: Optional[Dict[str, Optional[int]]] = None):
    """The HAMConfig of ModelConfig `cfg` (the one derivation): the model-wide fields here, each
    registered layer kind's own (LayerKind.hf_settings), its section table (fused_sections)
    and symbol; `taus` per layer from the checkpoint, the EOD id and whether documents reset;
    `special`: the bos / eos / pad ids (special_token_ids; default eos = pad = EOD)."""
    from megatron_ham.layers.kinds import kinds

    from .configuration_ham import HAMConfig
    from .layer_kinds import section_table

    settings = {}
    for k in kinds():
        settings.update(k.hf_settings(cfg))
    return HAMConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.resolved_ffn_hidden_size(),
        num_hidden_layers=cfg.num_layers,
        layer_pattern=cfg.resolved_pattern(),
        max_position_embeddings=cfg.seq_length,
        ham_taus=taus,
        normalization=cfg.normalization,
        rms_norm_eps=cfg.norm_eps,
        eod_token_id=eod,
        reset_at_eod=bool(documents and eod is not None),
        initializer_range=cfg.init_method_std,
        tie_word_embeddings=cfg.tie_embeddings,
        **(special or {"eos_token_id": eod, "pad_token_id": eod}),
        architectures=["HAMForCausalLM"],
        auto_map={"AutoConfig": "configuration_ham.HAMConfig",
                  "AutoModel": "modeling_ham.HAMModel",
                  "AutoModelForCausalLM": "modeling_ham.HAMForCausalLM"},
        dtype=str(DTYPES[cfg.dtype]).removeprefix("torch."),
        kind_symbols={k.symbol: k.name for k in kinds()},
        fused_sections={k.name: section_table(k, cfg) for k in kinds()},
        **settings,
    )


# ============================================================================ writing
def _check_portable(path: str) -> None:
    """The copied code may import only torch / transformers / the stdlib / its siblings."""
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    bad = [m for m in get_imports(path) if m.split(".")[0] in ("megatron_ham", "megatron", "fla", "triton",
                                                             "transformer_engine", "apex")]
    if bad:
        raise ConversionError(f"{path}: imports {bad} outside a try block; the export must load "
                              "without megatron_ham (wrap optional GPU imports in try/except)")
    here = os.path.dirname(path)
    # transformers copies `from .x import` siblings (even inside try blocks): each must be a file here
    missing = [r for r in get_relative_imports(path)
               if r.startswith(".") or not os.path.isfile(os.path.join(here, r.replace(".", "/") + ".py"))]
    if missing:
        raise ConversionError(f"{path}: relative imports {missing} do not resolve to files of the "
                              "export (use absolute megatron_ham imports inside try/except for GPU paths)")


def write_code(out_dir: str, config) -> None:
    """Copy the modeling code and the ops it needs into `out_dir` (flat, relative imports), and
    write layer_kinds.py for the layer kinds of HAMConfig `config` (write_layer_kinds)."""
    here = os.path.dirname(os.path.abspath(__file__))
    ops = os.path.join(os.path.dirname(here), "ops")
    for name in CODE_FILES:
        shutil.copyfile(os.path.join(here, name), os.path.join(out_dir, name))
    with open(os.path.join(here, "ham_ops.py"), encoding="utf-8") as f:
        src = f.read()
    src = src.replace("from ..ops.", "from .")
    with open(os.path.join(out_dir, "ham_ops.py"), "w", encoding="utf-8") as f:
        f.write(src)
    for name in OPS_FILES:
        src_path = os.path.join(ops, name)
        if not os.path.isfile(src_path):
            raise ConversionError(f"{src_path}: missing (megatron_ham.ops file the export needs)")
        shutil.copyfile(src_path, os.path.join(out_dir, name))
    kind_files = write_layer_kinds(out_dir, config)
    for name in CODE_FILES + ("ham_ops.py",) + OPS_FILES + tuple(kind_files):
        _check_portable(os.path.join(out_dir, name))


def write_layer_kinds(out_dir: str, config) -> List[str]:
    """Write `out_dir`/layer_kinds.py: mixer_class / mixer_slot / kind_sections (the API of
    megatron_ham/hf/layer_kinds.py) for the layer kinds of HAMConfig `config`, with static
    relative imports so that transformers copies the files they name. A kind whose hf_module is
    a class outside the shipped modeling code (a plugin) ships the source of that class as
    kind_<name>.py, after a header importing math, torch, nn, F and the ops of ham_ops: the
    class must need nothing else (docs/export.md "Layer kinds"). Returns the files written."""
    import inspect
    import textwrap

    from megatron_ham.layers.kinds import get_kind

    names = list(dict.fromkeys(config.layer_kinds()))
    files, branches = ["layer_kinds.py"], []
    for name in names:
        kind = get_kind(name)
        m = kind.hf_module
        if isinstance(m, str):  # "modeling_ham.<Class>"
            module, cls = m.split(".", 1)
        else:
            module, cls = f"kind_{name}", m.__name__
            try:
                body = textwrap.dedent(inspect.getsource(m))
            except (OSError, TypeError) as e:
                raise ConversionError(f"layer kind {name!r}: cannot read the source of its HF module "
                                      f"{m!r} ({e})") from e
            _write_text(os.path.join(out_dir, f"{module}.py"), (
                f'"""Written by {PROG}: the Hugging Face module of layer kind {name!r} (the source of\n'
                f'{m.__module__}.{m.__qualname__})."""\n'
                "import math\n\nimport torch\nimport torch.nn.functional as F\nfrom torch import nn\n\n"
                "from .ham_ops import *  # noqa: F401,F403\n\n\n" + body))
            files.append(f"{module}.py")
        branches.append(f"    if kind == {name!r}:\n        from .{module} import {cls}\n\n        return {cls}\n")
    slots = {n: get_kind(n).hf_slot for n in names}
    _write_text(os.path.join(out_dir, "layer_kinds.py"), (
        f'"""Written by {PROG}: the HF module, decoder-layer slot and section table of each layer\n'
        'kind of this model (in the package: megatron_ham/hf/layer_kinds.py, from the registry)."""\n\n'
        f"SLOTS = {slots!r}\n\n\n"
        "def mixer_class(kind):\n" + "".join(branches)
        + '    raise ValueError(f"layer kind {kind!r} is not part of this export ({sorted(SLOTS)})")\n\n\n'
        "def mixer_slot(kind):\n    return SLOTS[kind]\n\n\n"
        "def kind_sections(config, kind):\n    return config.fused_sections[kind]\n"))
    return files


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def own_export_files(output: str) -> Optional[List[str]]:
    """The files an earlier export of this tool wrote into `output` (its megatron_ham_export.json
    lists them), or None when `output` holds no such export."""
    try:
        with open(os.path.join(output, EXPORT_JSON), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    files = doc.get("files")
    if isinstance(files, list) and all(isinstance(n, str) for n in files):
        return files
    from .tokenizer_files import TOKENIZER_FILES  # an export from before the file list

    return [EXPORT_JSON, "config.json", "generation_config.json", "model.safetensors", *CODE_FILES, "ham_ops.py",
            "layer_kinds.py", *OPS_FILES, *TOKENIZER_FILES]


def convert(checkpoint: str, output: str, tokenizer: Optional[str] = None, dtype: str = "auto",
            config_path: Optional[str] = None, overwrite: bool = False,
            verify_tokens: int = 0, allow_tokenizer_code: bool = False,
            verify_atol: Optional[float] = None) -> str:
    """Convert; returns the output directory. Raises ConversionError / ValueError."""
    if dtype not in ("auto",) + tuple(DTYPES):
        raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    t0 = time.time()
    output = os.path.abspath(output)
    own_files = own_export_files(output)
    if os.path.lexists(output):
        if own_files is None and not (os.path.isdir(output) and not os.listdir(output)):
            raise ConversionError(f"--output {output}: exists and is not an export of {PROG} (no {EXPORT_JSON}); "
                                  "choose a new or empty directory")
        if not overwrite:
            raise ConversionError(f"--output {output}: exists; pass --overwrite to replace it")
    if tokenizer is not None:  # refused now, not after loading the model
        check_tokenizer(tokenizer, allow_tokenizer_code)
    step_dir = resolve_checkpoint(checkpoint)
    log(f"checkpoint: {step_dir}")
    run = read_run_config(step_dir, config_path)
    cfg, data = run.model, run.data
    tok_path = tokenizer or data.tokenizer
    if tokenizer is None and tok_path and not os.path.exists(tok_path):
        log(f"warning: the run's data.tokenizer {tok_path} does not exist here; no tokenizer written")
        tok_path = None
    if tok_path:
        check_tokenizer(tok_path, allow_tokenizer_code)
    eod = export_eod_id(run)
    documents = bool(data.documents)
    log(f"model: {cfg.architecture} pattern {cfg.resolved_pattern()!r}, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size} (padded {cfg.padded_vocab_size()}), dtype {cfg.dtype}, "
        f"eod {eod}, documents {documents}")
    model = load_megatron_model(step_dir, cfg)
    log(f"loaded the Megatron model (TP=1, PP=1) in {time.time() - t0:.1f} s")
    hf_sd, taus = megatron_to_hf(model.state_dict(), cfg)
    special = special_token_ids(tok_path, eod)
    hf_cfg = hf_config_from(cfg, taus, eod, documents, special)
    ham_taus = {i: t for i, t in enumerate(taus) if t is not None}
    if ham_taus:
        log("per-layer tau: " + ", ".join(f"{i}: {t:.4g}" for i, t in ham_taus.items()))

    from transformers import GenerationConfig

    from .modeling_ham import HAMForCausalLM

    out_dtype = DTYPES[cfg.dtype] if dtype == "auto" else DTYPES[dtype]
    hf_cfg.dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[out_dtype]
    hf = HAMForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict({k: v.to(torch.float32) for k, v in hf_sd.items()}, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConversionError(f"HF model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    hf = hf.to(out_dtype).eval()

    tmp = temp_dir_for(output)
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        gen = GenerationConfig(**special, do_sample=False)
        gen.save_pretrained(tmp)
        if tok_path:
            names = write_tokenizer(tok_path, tmp, reserved=os.listdir(tmp), allow_code=allow_tokenizer_code)
            log(f"tokenizer: {tok_path} ({', '.join(names)})")
        else:
            log("no tokenizer given (--tokenizer, or data.tokenizer in the run config)")
        write_code(tmp, hf_cfg)  # last: whatever was written before, the code in the export is ours
        files = sorted(set(os.listdir(tmp)) | {EXPORT_JSON})  # what --overwrite may delete later
        with open(os.path.join(tmp, EXPORT_JSON), "w", encoding="utf-8") as f:
            json.dump({"checkpoint": os.path.abspath(step_dir), "model_config": cfg.to_dict(),
                       "train_state": _read_json(os.path.join(step_dir, MARKER)),
                       "dtype": hf_cfg.dtype, "files": files}, f, indent=1, default=str)
        if verify_tokens:
            diff, tol = verify(model, tmp, cfg, eod, documents, verify_tokens, out_dtype, verify_atol)
            log(f"verify: max |logits(Megatron) - logits(HF)| = {diff:.3e} on {verify_tokens} tokens "
                f"(the export directory, loaded with trust_remote_code=True in a fresh process; "
                f"tolerance {tol:.1e})")
        publish_dir(tmp, output, own_files, overwrite, "--output")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temp dir
        raise
    log(f"wrote {output} in {time.time() - t0:.1f} s "
        f"({sum(v.numel() for v in hf_sd.values()) / 1e6:.2f} M parameters, {hf_cfg.dtype})")
    return output


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@torch.no_grad()
def megatron_reference_logits(model, cfg, eod, documents, n_tokens: int):
    """(tokens int [1, n_tokens], the Megatron model's fp32 logits [1, n_tokens, vocab_size]):
    seeded random tokens with one EOD in the middle when an EOD id is known (documents reset
    there when `documents`), the real vocabulary only."""
    from megatron_ham.models import document_forward_kwargs

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (1, n_tokens), generator=g)
    kw = {}
    if eod is not None:
        x[x == eod] = (eod + 1) % cfg.vocab_size
        if n_tokens > 2:
            x[0, n_tokens // 2] = eod
        if documents:
            kw = document_forward_kwargs(x, eod)
    ref = model(x, None, None, **kw).float()[..., : cfg.vocab_size]
    if ref.shape[0] != x.shape[0]:  # [s, b, v] on older megatron-core
        ref = ref.transpose(0, 1)
    return x, ref


@torch.no_grad()
def verify(model, export_dir: str, cfg, eod, documents, n_tokens: int, out_dtype,
           atol: Optional[float] = None) -> Tuple[float, float]:
    """(max |logits| difference, tolerance) between the Megatron model and the export directory
    loaded in a fresh process (hf/verify_export.py), on random tokens (one EOD in the middle when
    an EOD id is known), over the real vocabulary. Raises ConversionError above the tolerance
    (default 1e-3 for fp32 weights, else 5% of the largest reference logit)."""
    from .verify_export import VerifyError, export_logits

    x, ref = megatron_reference_logits(model, cfg, eod, documents, n_tokens)
    try:
        got, _info = export_logits(export_dir, x.numpy())
    except VerifyError as e:
        raise ConversionError(f"--verify: {e}") from None
    got = torch.from_numpy(got)
    if got.shape != ref.shape:
        raise ConversionError(f"--verify: the export's logits have shape {list(got.shape)}, the Megatron "
                              f"model's {list(ref.shape)}")
    diff = float((ref - got).abs().max())
    if atol is None:
        atol = 1e-3 if out_dtype == torch.float32 else 0.05 * max(1.0, float(ref.abs().max()))
    if not diff <= atol:  # also catches NaN
        raise ConversionError(f"--verify: the export's logits differ from the Megatron model's by {diff:.3e} "
                              f"(tolerance {atol:.1e}); nothing was written to {os.path.dirname(export_dir)}")
    return diff, atol


# ============================================================================ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Convert a megatron-ham training checkpoint (Megatron dist_checkpointing, saved at any "
            "TP/PP layout) into a Hugging Face model directory loadable with "
            "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True), or without "
            "trust_remote_code after `import megatron_ham.hf`. Runs on CPU in one process."),
        epilog=(
            "Example: ham-convert-hf --checkpoint runs/tiny/checkpoints --output exports/tiny "
            "--tokenizer data_prep/sample/tokenizer\n"
            "The output is written to a temp dir next to --output and renamed when complete. "
            "See docs/export.md."),
    )
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR_OR_STEP_DIR",
                   help="a run's checkpoint dir (uses its `latest`, else the newest complete "
                        "step_XXXXXXXX) or one step_XXXXXXXX dir")
    p.add_argument("--output", required=True, metavar="DIR", help="the HF model directory to write")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="HF tokenizer dir or tokenizer.json to ship with the model (default: the "
                        "run config's data.tokenizer, when it exists)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights dtype of the export (auto = the checkpoint's model dtype)")
    p.add_argument("--config", metavar="YAML",
                   help="run config to read the model settings from (default: config.yaml in the "
                        "checkpoint dir, written by the trainer)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it holds an earlier export of this tool (only the files "
                        "that export lists are deleted; a directory that is not an export is never replaced)")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="before publishing, load the export directory itself with "
                        "from_pretrained(trust_remote_code=True) in a fresh process without megatron_ham, "
                        "compare its logits with the Megatron model's on N random tokens and fail "
                        "(nothing written) above the tolerance (0 = skip)")
    p.add_argument("--verify-atol", type=float, metavar="X",
                   help="--verify tolerance (default 1e-3 for fp32 weights, else 5%% of the largest logit)")
    p.add_argument("--allow-tokenizer-code", action="store_true",
                   help="ship a tokenizer whose tokenizer_config.json has an auto_map, i.e. its own Python "
                        "code (tokenization_*.py), which then runs on every from_pretrained(..., "
                        "trust_remote_code=True) of the export. Off: such a tokenizer is refused. Only the "
                        "allow-listed tokenizer data files are ever copied otherwise (never a .py)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    global _OWN_GROUP
    args = build_parser().parse_args(argv)
    try:
        convert(args.checkpoint, args.output, tokenizer=args.tokenizer, dtype=args.dtype,
                config_path=args.config, overwrite=args.overwrite, verify_tokens=args.verify,
                allow_tokenizer_code=args.allow_tokenizer_code, verify_atol=args.verify_atol)
    except (ConversionError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if _OWN_GROUP:
            from megatron_ham.distributed import destroy

            destroy()
            _OWN_GROUP = False
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
