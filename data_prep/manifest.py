"""Dataset manifests: which files make up which component, how to read them, and their weights.

A manifest is a YAML file::

    name: long-data-collections
    repo_id: togethercomputer/Long-Data-Collections   # Hugging Face dataset (informational)
    revision: <commit sha>                            # revision the local copy was downloaded at
    components:
      - name: rp_sub                    # output prefix <out>/<name>.bin/.idx
        files: [pretrain/rp_sub.jsonl.zst]   # paths or globs, relative to --data-root
        text_field: text                # field tokenized (default "text")
        required_fields: [text]         # fields every record must have (default [text_field])
        weight: 0.3                     # sampling weight in the blend (normalised over components)
        optional: false                 # true: a missing file is a warning, not an error

Built-in manifests are referred to by name (``sample``, ``long-data-collections``); see
``data_prep/manifests/``. ``--input`` builds an ad-hoc manifest from paths/globs.
"""
from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

import yaml

from megatron_ham.safe_names import check_name

MANIFEST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "manifests")
BUILTIN = {
    "sample": os.path.join(MANIFEST_DIR, "sample.yaml"),
    "long-data-collections": os.path.join(MANIFEST_DIR, "long_data_collections.yaml"),
}
SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.zst", ".json.zst", ".parquet")
_COMPONENT_KEYS = {"name", "files", "text_field", "required_fields", "weight", "optional", "kind",
                   "meta_fields", "description"}


@dataclass
class Component:
    name: str
    patterns: List[str]
    text_field: str = "text"
    required_fields: List[str] = field(default_factory=list)
    weight: float = 1.0
    optional: bool = False
    kind: str = "pretrain"
    files: List[str] = field(default_factory=list)  # resolved absolute paths, sorted

    def to_dict(self) -> dict:
        return {"name": self.name, "files": self.files, "text_field": self.text_field,
                "required_fields": self.required_fields, "weight": self.weight, "kind": self.kind}


@dataclass
class Manifest:
    name: str
    path: Optional[str]
    components: List[Component]
    repo_id: Optional[str] = None
    revision: Optional[str] = None
    data_root: Optional[str] = None
    default_tokenizer: Optional[str] = None

    def normalized_weights(self) -> dict:
        live = [c for c in self.components if c.files and c.weight > 0]
        total = sum(c.weight for c in live)
        return {c.name: (c.weight / total if total > 0 else 0.0) for c in live}


def _err(where: str, msg: str) -> ValueError:
    return ValueError(f"{where}: {msg}")


def load_manifest(spec: str, data_root: Optional[str] = None) -> Manifest:
    """Load a manifest by built-in name or path and resolve its files under ``data_root``.

    ``data_root`` defaults to the manifest's own ``data_root`` key (relative to the manifest
    file), else the manifest's directory. Raises ValueError naming the file and key on bad input.
    """
    path = BUILTIN.get(spec, spec)
    if not os.path.isfile(path):
        raise ValueError(f"--manifest: {spec!r} is neither a built-in manifest "
                         f"({', '.join(sorted(BUILTIN))}) nor an existing YAML file")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("components"), list) or not raw["components"]:
        raise _err(path, "expected a mapping with a non-empty 'components' list")
    base = os.path.dirname(os.path.abspath(path))
    root = data_root or (os.path.join(base, raw["data_root"]) if raw.get("data_root") else base)
    tok = raw.get("tokenizer")
    if tok and not os.path.isabs(tok) and os.path.exists(os.path.join(base, tok)):
        tok = os.path.normpath(os.path.join(base, tok))
    comps = []
    seen = set()
    for i, c in enumerate(raw["components"]):
        where = f"{path}: components[{i}]"
        if not isinstance(c, dict):
            raise _err(where, "expected a mapping")
        unknown = set(c) - _COMPONENT_KEYS
        if unknown:
            raise _err(where, f"unknown keys {sorted(unknown)}; expected some of {sorted(_COMPONENT_KEYS)}")
        name = check_name(c.get("name"), f"{where}.name")  # <out>/<name>.bin: one path component
        if name in seen:
            raise _err(where, f"'name' {name!r} is used by an earlier component")
        seen.add(name)
        files = c.get("files")
        if isinstance(files, str):
            files = [files]
        if not isinstance(files, list) or not files or not all(isinstance(x, str) for x in files):
            raise _err(where, f"'files' must be a path/glob or a list of them, got {files!r}")
        weight = c.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight < 0:
            raise _err(where, f"'weight' must be a number >= 0, got {weight!r}")
        text_field = c.get("text_field", "text")
        required = c.get("required_fields", [text_field])
        if not isinstance(required, list) or text_field not in required:
            required = [text_field] + [r for r in (required or []) if r != text_field]
        comps.append(Component(name=name, patterns=files, text_field=text_field,
                               required_fields=list(required), weight=float(weight),
                               optional=bool(c.get("optional", False)), kind=c.get("kind", "pretrain")))
    m = Manifest(name=raw.get("name", os.path.basename(path)), path=os.path.abspath(path),
                 components=comps, repo_id=raw.get("repo_id"), revision=raw.get("revision"),
                 data_root=os.path.abspath(root), default_tokenizer=tok)
    resolve_files(m)
    return m


def manifest_from_inputs(inputs: List[str], text_field: str = "text") -> Manifest:
    """Ad-hoc manifest from ``--input`` values: ``PATH_OR_GLOB`` (component named after the
    file's stem) or ``NAME=PATH_OR_GLOB[,PATH_OR_GLOB...]`` (optionally ``NAME:WEIGHT=...``)."""
    comps = {}
    for spec in inputs:
        if "=" in spec:
            name, pats = spec.split("=", 1)
            weight = 1.0
            if ":" in name:
                name, w = name.rsplit(":", 1)
                try:
                    weight = float(w)
                except ValueError:
                    raise ValueError(f"--input {spec!r}: weight {w!r} is not a number") from None
                if not math.isfinite(weight) or weight < 0:
                    raise ValueError(f"--input {spec!r}: weight must be a finite number >= 0, got {w!r}")
            patterns = pats.split(",")
        else:
            base = os.path.basename(spec)
            for suf in SUPPORTED_SUFFIXES:
                if base.endswith(suf):
                    base = base[: -len(suf)]
            name, patterns, weight = base.replace("*", "all") or "input", [spec], 1.0
        check_name(name, f"--input {spec!r}: component name (give one with --input NAME=FILES)")
        if name in comps:
            comps[name].patterns += patterns
        else:
            comps[name] = Component(name=name, patterns=patterns, text_field=text_field,
                                    required_fields=[text_field], weight=weight)
    m = Manifest(name="inputs", path=None, components=list(comps.values()), data_root=os.getcwd())
    resolve_files(m)
    return m


def resolve_files(m: Manifest) -> None:
    """Expand globs (sorted, deterministic) and check that files exist and have a known type."""
    missing = []
    for c in m.components:
        found = []
        for pat in c.patterns:
            full = pat if os.path.isabs(pat) else os.path.join(m.data_root, pat)
            hits = sorted(glob.glob(full, recursive=True)) if glob.has_magic(full) else (
                [full] if os.path.lexists(full) else [])
            if not hits:
                missing.append((c, full))
            for h in hits:
                # directories and dangling links stay: the pipeline reports them as unreadable inputs
                if not h.endswith(SUPPORTED_SUFFIXES) and not os.path.isdir(h) and os.path.exists(h):
                    raise ValueError(f"component {c.name!r}: {h}: unsupported file type; expected one of "
                                     f"{', '.join(SUPPORTED_SUFFIXES)}")
                h = os.path.abspath(h)
                if h not in found:
                    found.append(h)
        c.files = found
    hard = [(c, p) for c, p in missing if not c.optional]
    if hard:
        lines = "\n".join(f"  component {c.name!r}: {p}" for c, p in hard)
        where = f"manifest {m.path}" if m.path else "--input"
        raise ValueError(f"{where}: no file matches:\n{lines}\n(data root: {m.data_root}; "
                         "pass --data-root or mark the component 'optional: true')")
    for c, p in missing:
        if c.optional:
            import logging
            logging.getLogger("data_prep").warning("optional component %r: no file matches %s; skipped",
                                                   c.name, p)
