"""ham-import-hf: a Hugging Face export of megatron-ham -> a Megatron checkpoint to fine-tune from.

    ham-import-hf --hf HF_DIR --output CHECKPOINT_DIR [--config RECIPE_OR_CONFIG_YAML] [--verify N]

The inverse of ham-convert-hf. The output is a model-only checkpoint at step 0
(CHECKPOINT_DIR/step_00000000, `latest`; train_state "model_only": true), written by ham-train's
own save path (training/checkpoint.save): the weights, every HAM layer's KV-controller tau and
config.yaml. ham-train with `checkpoint.dir=CHECKPOINT_DIR` loads its model at any tp x pp layout
and starts with a fresh optimizer, LR schedule and step count from its recipe
(docs/export.md "Import").

The export directory is untrusted input. Read from it: config.json, megatron_ham_export.json,
model.safetensors (or model.safetensors.index.json and the shards it names) -- JSON and
safetensors only, never its code; every file name must be a plain name inside the directory
(no links out of it); JSON files are read up to a size cap; every tensor's shape and dtype in
the safetensors headers is checked against the model the config describes before any tensor is
read, so memory stays within the size of the weights the config describes.

Steps (one process, CPU, gloo world of size 1):
  1. the ModelConfig: `--config` (a run config or recipe, read as ham-train reads one), else the
     `model_config` that ham-convert-hf records in megatron_ham_export.json; the HAMConfig
     derived from it (convert.hf_config_from) must have config.json's structural fields;
  2. the safetensors headers: exactly the tensors of that model, with their shapes;
  3. HF -> Megatron names (hf_to_megatron: the inverse of convert.megatron_to_hf, each layer
     kind's LayerKind.from_hf; Megatron's vocab padding rows are zeros), checked by mapping the
     result back (megatron_to_hf) and comparing bit for bit;
  4. the Megatron model at TP=1, PP=1, loaded strictly, saved as a model-only checkpoint.
Errors (ConversionError / ValueError, exit 2) name the file and key at fault.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

from .convert import EXPORT_JSON, LAYER_NORMS, ConversionError, hf_config_from, megatron_to_hf

PROG = "ham-import-hf"
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
MAX_JSON_BYTES = 64 << 20
#: safetensors dtype names accepted as weights
ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
#: config.json fields the weights depend on, besides every layer kind's hf_settings
STRUCTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "layer_pattern",
             "kind_symbols", "fused_sections", "tie_word_embeddings", "normalization", "rms_norm_eps")
#: kind settings that are inference choices, not structure
FREE_SETTINGS = ("ops_impl",)


def log(msg: str) -> None:
    print(f"[{PROG}] {msg}", flush=True)


# ============================================================================ reading the export
def _inside(hf_dir: str, name: str, what: str) -> str:
    """The path of file `name` of the export: a plain file name, resolving inside `hf_dir`."""
    from megatron_ham.safe_names import check_name

    try:
        check_name(name, f"--hf {hf_dir}: {what}: a file name inside the export")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    root = os.path.realpath(hf_dir)
    real = os.path.realpath(os.path.join(root, name))
    if os.path.dirname(real) != root:
        raise ConversionError(f"--hf {hf_dir}: {name} resolves to {real}, outside the export directory")
    if not os.path.isfile(real):
        raise ConversionError(f"--hf {hf_dir}: {name}: missing ({what})")
    return real


def _read_json(hf_dir: str, name: str, what: str) -> dict:
    from .tokenizer_files import read_json_object

    try:
        return read_json_object(_inside(hf_dir, name, what), what, MAX_JSON_BYTES)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def read_hf_config(hf_dir: str) -> dict:
    """config.json of a megatron-ham export (ConversionError naming what is wrong)."""
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"--hf {hf_dir}: not a directory (expected a ham-convert-hf export)")
    doc = _read_json(hf_dir, "config.json", "the model's config")
    if doc.get("model_type") != "megatron_ham":
        raise ConversionError(f"{os.path.join(hf_dir, 'config.json')}: model_type is "
                              f"{doc.get('model_type')!r}, not 'megatron_ham': not a megatron-ham export")
    return doc


def read_model_config(hf_dir: str, config_path: Optional[str]):
    """(RunConfig or None, ModelConfig, train_state or None): from `config_path` (a run config or
    recipe) or else megatron_ham_export.json's model_config."""
    from megatron_ham.models.config import SettingError
    from megatron_ham.training.config import ConfigError, load_run_config, model_config_from

    export = None
    if os.path.exists(os.path.join(hf_dir, EXPORT_JSON)):
        export = _read_json(hf_dir, EXPORT_JSON, "ham-convert-hf's record")
    ts = export.get("train_state") if export else None
    train_state = ts if isinstance(ts, dict) else None
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise ConversionError(f"--config {config_path}: no such file")
        try:
            run = load_run_config(config_path)
        except ConfigError as e:
            raise ConversionError(str(e)) from e
        return run, run.model, train_state
    if export is None:
        raise ConversionError(
            f"--hf {hf_dir}: no {EXPORT_JSON} (ham-convert-hf records the model's ModelConfig "
            "there); pass --config with the run config or recipe the model was trained with")
    where = os.path.join(hf_dir, EXPORT_JSON)
    mc = export.get("model_config")
    if not isinstance(mc, dict):
        raise ConversionError(f"{where}: key 'model_config': expected a mapping, got {type(mc).__name__}")
    try:
        cfg = model_config_from(mc, where)
        cfg.validate(tp=1, pp=1)
    except ConfigError as e:
        raise ConversionError(str(e)) from e
    except SettingError as e:
        raise ConversionError(f"{where}: key 'model_config.{e.key}': expected {e.expected}, got {e.got!r}") from e
    return None, cfg, train_state


def check_structure(hf_doc: dict, derived, cfg, hf_dir: str) -> None:
    """config.json must have the structural fields of `derived`, the HAMConfig of ModelConfig
    `cfg`, for the layer kinds of its pattern (JSON-normalised comparison); ConversionError
    naming the key and both values."""
    from megatron_ham.layers.kinds import parse_pattern

    used = {k.name: k for k in parse_pattern(cfg.resolved_pattern(), cfg.num_layers)}
    keys = set(STRUCTURE)
    for k in used.values():
        keys |= set(k.hf_settings(cfg))
    want = json.loads(json.dumps(derived.to_dict()))
    have = dict(hf_doc)
    for key, pick in (("kind_symbols", lambda d: {s: n for s, n in d.items() if n in used}),
                      ("fused_sections", lambda d: {n: t for n, t in d.items() if n in used})):
        want[key] = pick(want[key])
        if isinstance(have.get(key), dict):
            have[key] = pick(have[key])
    bad = []
    for key in sorted(keys - set(FREE_SETTINGS)):
        if key in want and have.get(key) != want[key]:
            bad.append(f"{key}: config.json has {have.get(key)!r}, the model config gives {want[key]!r}")
    if bad:
        raise ConversionError(f"{os.path.join(hf_dir, 'config.json')}: does not describe the model of the "
                              f"model config ({len(bad)} key(s)): " + "; ".join(bad[:6]))


def expected_hf_shapes(hf_cfg) -> Dict[str, Tuple[int, ...]]:
    """{HF key: shape} of the tensors an export of `hf_cfg` holds (built on the meta device:
    nothing is allocated); a tied lm_head is not stored."""
    from .modeling_ham import HAMForCausalLM

    with torch.device("meta"):
        model = HAMForCausalLM(hf_cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if hf_cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def weight_files(hf_dir: str) -> Dict[str, str]:
    """{tensor name: safetensors file path}: model.safetensors, or the index's weight_map."""
    if os.path.exists(os.path.join(hf_dir, WEIGHTS)) or not os.path.exists(os.path.join(hf_dir, INDEX)):
        path = _inside(hf_dir, WEIGHTS, "the weights")
        return {k: path for k in _header(path)}
    index = _read_json(hf_dir, INDEX, "the weights' index")
    wm = index.get("weight_map")
    if not isinstance(wm, dict):
        raise ConversionError(f"{os.path.join(hf_dir, INDEX)}: key 'weight_map': expected a mapping")
    files, out = {}, {}
    for key, name in wm.items():
        if name not in files:
            files[name] = _inside(hf_dir, name, f"{INDEX} (tensor {key!r})")
        out[key] = files[name]
    for name, path in files.items():
        have = _header(path)
        missing = [k for k, n in wm.items() if n == name and k not in have]
        if missing:
            raise ConversionError(f"{path}: lacks {missing[:4]}, which {INDEX} places there")
    return out


def _header(path: str) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """{tensor name: (safetensors dtype, shape)} from a safetensors header (no tensor read)."""
    from safetensors import safe_open

    try:
        out = {}
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (sl.get_dtype(), tuple(sl.get_shape()))
        return out
    except Exception as e:  # a truncated / malformed file
        raise ConversionError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def check_tensors(files: Dict[str, str], shapes: Dict[str, Tuple[int, ...]]) -> None:
    """The files hold exactly the expected tensors, with their shapes and a float dtype."""
    missing = sorted(set(shapes) - set(files))
    extra = sorted(set(files) - set(shapes))
    problems = [f"{k}: missing" for k in missing[:6]] + [f"{k}: not a tensor of this model" for k in extra[:6]]
    headers: Dict[str, dict] = {}
    for k in sorted(set(files) & set(shapes)):
        path = files[k]
        if path not in headers:
            headers[path] = _header(path)
        dtype, shape = headers[path][k]
        if shape != shapes[k]:
            problems.append(f"{k}: shape {list(shape)}, the model config gives {list(shapes[k])}")
        elif dtype not in ST_DTYPES:
            problems.append(f"{k}: dtype {dtype}, expected one of {sorted(ST_DTYPES)}")
    if problems:
        where = ", ".join(sorted({os.path.basename(p) for p in files.values()})) or WEIGHTS
        raise ConversionError(f"{where}: does not hold the weights of the model config "
                              f"({len(missing) + len(extra)} missing/extra): " + "; ".join(problems[:10]))


def read_tensors(files: Dict[str, str]) -> Dict[str, torch.Tensor]:
    """Every tensor, one file open at a time (progress bar)."""
    from safetensors import safe_open
    from tqdm import tqdm

    out: Dict[str, torch.Tensor] = {}
    by_file: Dict[str, List[str]] = {}
    for k, p in files.items():
        by_file.setdefault(p, []).append(k)
    with tqdm(total=len(files), desc=f"[{PROG}] reading tensors", unit="tensor", file=sys.stderr) as bar:
        for path, keys in by_file.items():
            with safe_open(path, framework="pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
                    bar.update(1)
    return out


# ============================================================================ name mapping
def hf_to_megatron(hf: Dict[str, torch.Tensor], cfg, taus: List[Optional[float]],
                   steps: Optional[int]) -> Dict[str, torch.Tensor]:
    """HF state dict -> Megatron GPTModel state dict (TP=1): the inverse of
    convert.megatron_to_hf. The embedding / output rows Megatron adds to pad the vocabulary
    (padded_vocab_size - vocab_size) are zeros; each mixer comes from its layer kind
    (LayerKind.from_hf, with {"tau": taus[i], "steps": steps}). Every HF key must be used."""
    from megatron_ham.layers.kinds import parse_pattern

    hf = dict(hf)
    out: Dict[str, torch.Tensor] = {}

    def take(key):
        if key not in hf:
            raise ConversionError(f"HF state: missing key {key!r}")
        return hf.pop(key)

    def padded(t):  # [V, h] -> [padded V, h]
        return torch.cat([t, t.new_zeros(cfg.padded_vocab_size() - t.shape[0], *t.shape[1:])])

    out["embedding.word_embeddings.weight"] = padded(take("model.embed_tokens.weight"))
    for i, kind in enumerate(parse_pattern(cfg.resolved_pattern(), cfg.num_layers)):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        for (norm_m, norm_h), part in itertools.product(LAYER_NORMS, ("weight", "bias")):
            if part == "weight" or f"{h}{norm_h}.bias" in hf:  # a LayerNorm has a bias
                out[f"{m}{norm_m}.{part}"] = take(f"{h}{norm_h}.{part}")
        out[f"{m}mlp.linear_fc1.weight"] = torch.cat([take(f"{h}mlp.gate_proj.weight"),
                                                      take(f"{h}mlp.up_proj.weight")])
        out[f"{m}mlp.linear_fc2.weight"] = take(f"{h}mlp.down_proj.weight")
        p = f"{h}{kind.hf_slot}."
        rel = {k[len(p):]: hf.pop(k) for k in [k for k in hf if k.startswith(p)]}
        try:
            mixer = kind.from_hf(rel, {"tau": taus[i], "steps": steps}, cfg)
        except (KeyError, ValueError) as e:
            raise ConversionError(f"HF state: layer {i} ({kind.name}): {p}{e}") from e
        if rel:
            raise ConversionError(f"HF state: layer {i} ({kind.name}): keys its kind does not map: "
                                  f"{sorted(p + k for k in rel)[:6]}")
        out.update({f"{m}self_attention.{k}": t for k, t in mixer.items()})
    out["decoder.final_layernorm.weight"] = take("model.norm.weight")
    if "model.norm.bias" in hf:
        out["decoder.final_layernorm.bias"] = take("model.norm.bias")
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = padded(take("lm_head.weight"))
    if hf:
        raise ConversionError(f"HF state: keys with no Megatron mapping: {sorted(hf)[:8]}")
    return out


def check_inverse(meg: Dict[str, torch.Tensor], hf: Dict[str, torch.Tensor], cfg,
                  taus: List[Optional[float]]) -> None:
    """megatron_to_hf(meg) must give `hf` back bit for bit, and the taus: each layer kind's
    from_hf is the inverse of its to_hf."""
    back, taus_back = megatron_to_hf(meg, cfg)
    diff = sorted(k for k in hf if k not in back or back[k].dtype != hf[k].dtype
                  or not torch.equal(back[k], hf[k]))
    same_taus = all((a is None and b is None) or (a is not None and b is not None and float(a) == float(b))
                    for a, b in zip(taus, taus_back))
    if diff or set(back) != set(hf) or not same_taus:
        raise ConversionError(f"the HF -> Megatron map is not the inverse of ham-convert-hf's for "
                              f"{diff[:6] or sorted(set(back) ^ set(hf))[:6] or 'the taus'} (a layer "
                              "kind whose to_hf is overridden needs a matching from_hf)")


def _taus(hf_doc: dict, n: int, where: str) -> List[Optional[float]]:
    from .configuration_ham import _as_tau

    t = hf_doc.get("ham_taus")
    if t is None:
        return [None] * n
    if not isinstance(t, list) or len(t) != n:
        raise ConversionError(f"{where}: key 'ham_taus': expected a list with one entry per layer ({n}), got {t!r}")
    try:
        return [_as_tau(x, f"{where}: key 'ham_taus[{i}]'") for i, x in enumerate(t)]
    except ValueError as e:
        raise ConversionError(str(e)) from e


def _steps(train_state: Optional[dict]) -> Optional[int]:
    s = (train_state or {}).get("step")
    return s if isinstance(s, int) and not isinstance(s, bool) and s >= 0 else None


# ============================================================================ writing
def _check_output(output: str) -> None:
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ConversionError(f"--output {output}: exists and is not an empty directory (the import "
                              "writes a new run's checkpoint dir; choose another)")


def import_hf(hf_dir: str, output: str, config_path: Optional[str] = None, verify_tokens: int = 0) -> str:
    """Import; returns the step directory written. Raises ConversionError / ValueError."""
    from megatron_ham.models import build_model
    from megatron_ham.training import checkpoint as ckpt
    from megatron_ham.training.config import DataConfig, RunConfig, dump_config

    from .convert import _init_single_process, megatron_reference_logits
    from .modeling_ham import HAMForCausalLM

    t0 = time.time()
    output = os.path.abspath(output)
    _check_output(output)
    hf_doc = read_hf_config(hf_dir)
    where = os.path.join(hf_dir, "config.json")
    run, cfg, train_state = read_model_config(hf_dir, config_path)
    eod = hf_doc.get("eod_token_id")
    if eod is not None and (isinstance(eod, bool) or not isinstance(eod, int)):
        raise ConversionError(f"{where}: key 'eod_token_id': expected an int or null, got {eod!r}")
    documents = bool(hf_doc.get("reset_at_eod", False))
    taus = _taus(hf_doc, cfg.num_layers, where)
    if hf_doc.get("tau_override") is not None:
        log(f"note: {where} has tau_override {hf_doc['tau_override']!r} (an inference setting); the "
            "KV controllers start from the checkpoint's ham_taus")
    hf_cfg = hf_config_from(cfg, taus, eod, documents)
    check_structure(hf_doc, hf_cfg, cfg, hf_dir)
    files = weight_files(hf_dir)
    check_tensors(files, expected_hf_shapes(hf_cfg))
    log(f"export {hf_dir}: {cfg.architecture} pattern {cfg.resolved_pattern()!r}, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size} (padded {cfg.padded_vocab_size()}), {len(files)} tensors; eod {eod}, "
        f"documents {documents}")
    hf_sd = read_tensors(files)
    steps = _steps(train_state)
    meg = hf_to_megatron(hf_sd, cfg, taus, steps)
    check_inverse(meg, hf_sd, cfg, taus)

    _init_single_process()
    model = build_model(dataclasses.replace(cfg, use_cpu_initialization=True, sequence_parallel=False))
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    bad = sorted(set(own) ^ set(meg))
    bad += [f"{k}: {list(meg[k].shape)} vs the model's {list(own[k].shape)}"
            for k in sorted(set(own) & set(meg)) if meg[k].shape != own[k].shape]
    if bad:
        raise ConversionError(f"the Megatron model built from the model config does not take the mapped "
                              f"weights: {bad[:6]}")
    model.load_state_dict(meg, strict=False)
    model.eval()
    if verify_tokens:  # this package's HF model on the export's tensors (never the export's code)
        hf = HAMForCausalLM(hf_cfg)
        hf.load_state_dict({k: v.to(torch.float32) for k, v in hf_sd.items()}, strict=not cfg.tie_embeddings)
        if cfg.tie_embeddings:
            hf.tie_weights()
        x, ref = megatron_reference_logits(model, cfg, eod, documents, verify_tokens)
        with torch.no_grad():
            diff = float((ref - hf.eval()(x, use_cache=False).logits.float()).abs().max())
        log(f"verify: max |logits(Megatron) - logits(HF)| = {diff:.3e} on {verify_tokens} tokens")

    if run is None:
        run = RunConfig(name=os.path.basename(os.path.abspath(hf_dir).rstrip("/")), model=cfg,
                        data=DataConfig(backend="synthetic"))
    run.data.eod_id, run.data.documents = eod if eod is not None else run.data.eod_id, documents
    run.checkpoint.dir = output
    state = {"step": 0, "consumed_samples": 0, "model_only": True, "world_size": 1, "tp": 1, "pp": 1,
             "name": run.name, "imported_from": os.path.abspath(hf_dir), "export_train_state": train_state}
    path = ckpt.save(output, 0, [model], None, None, state, dump_config(run))
    log(f"wrote {path} in {time.time() - t0:.1f} s (model only: ham-train with checkpoint.dir={output} "
        "fine-tunes from it with a fresh optimizer)")
    return path


# ============================================================================ CLI
DESCRIPTION = (
    "Import a ham-convert-hf export (a Hugging Face model directory) back into a Megatron "
    "checkpoint that ham-train fine-tunes from: a model-only checkpoint at step 0 (weights, "
    "KV-controller taus, config.yaml). ham-train with checkpoint.dir=OUTPUT loads it at any TP/PP "
    "layout and starts a fresh optimizer and LR schedule from its recipe. The export is read as "
    "data only (JSON and safetensors; its code never runs). Runs on CPU in one process.")
EPILOG = ("Example: ham-import-hf --hf exports/tiny --output runs/tiny-ft/checkpoints, then "
          "ham-train recipes/tiny_cpu.yaml checkpoint.dir=runs/tiny-ft/checkpoints. "
          "See docs/export.md (Import).")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--hf", required=True, metavar="HF_DIR", help="the export directory (ham-convert-hf output)")
    p.add_argument("--output", required=True, metavar="CHECKPOINT_DIR",
                   help="the run's checkpoint dir to create (must not exist, or be empty)")
    p.add_argument("--config", metavar="YAML",
                   help="run config or recipe describing the model (default: the model_config "
                        f"ham-convert-hf records in HF_DIR/{EXPORT_JSON})")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="compare the imported Megatron model's logits with the export's on N random "
                        "tokens and log the max difference (0 = skip)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from . import convert

    args = build_parser().parse_args(argv)
    try:
        import_hf(args.hf, args.output, config_path=args.config, verify_tokens=args.verify)
    except (ConversionError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if convert._OWN_GROUP:
            from megatron_ham.distributed import destroy

            destroy()
            convert._OWN_GROUP = False
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
