"""The tokenizer part of an export: data files only, from a fixed allow-list.

A tokenizer directory can come from elsewhere (the run config inside a checkpoint names it), and
`from_pretrained(..., trust_remote_code=True)` on the export runs every `.py` the export holds.
So ``write_tokenizer`` never copies a directory as it is:

* a tokenizer without custom code is loaded with ``trust_remote_code=False``, saved by
  transformers into a scratch dir, and only the names in ``TOKENIZER_FILES`` are copied from
  there into the export;
* a ``tokenizer_config.json`` with an ``auto_map`` (the tokenizer's own Python classes) is
  refused unless the caller passes ``allow_code`` (``ham-convert-hf --allow-tokenizer-code``);
  then the allow-listed files and the ``.py`` modules the auto_map names are copied as they are
  (nothing is loaded in this process);
* no file is ever written over a name the exporter writes (``reserved``), and the exporter
  writes its own code after the tokenizer, so nothing can replace it.

Errors are ValueError naming the path.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Iterable, List

from megatron_ham.safe_names import check_name

# the data files of Hugging Face tokenizers (BPE / WordPiece / SentencePiece / tiktoken)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "sentencepiece.model", "spm.model", "bpe.codes", "tokenizer.tiktoken", "chat_template.jinja",
    "chat_template.json",
)
MAX_CONFIG_BYTES = 16 << 20


def read_json_object(path: str, what: str = "tokenizer config", max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """A JSON object from a file from elsewhere, at most `max_bytes`; ValueError naming the path."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise ValueError(f"{path}: {size} bytes, more than the {max_bytes} a {what} may have")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable as a JSON {what} ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object ({what}), got {type(doc).__name__}")
    return doc


def code_modules(config: dict, where: str) -> List[str]:
    """The ``.py`` files a tokenizer config's ``auto_map`` makes transformers import (each must be
    a ``tokenization*.py`` of the tokenizer dir; another repository's code is refused)."""
    auto_map = config.get("auto_map")
    if not auto_map:
        return []
    if not isinstance(auto_map, dict):
        raise ValueError(f"{where}: auto_map must be a mapping, got {type(auto_map).__name__}")
    refs = []
    for v in auto_map.values():
        refs += [r for r in (v if isinstance(v, list) else [v]) if r is not None]
    mods = []
    for r in refs:
        if not isinstance(r, str) or "." not in r:
            raise ValueError(f"{where}: auto_map entry {r!r} is not 'module.Class'")
        if "--" in r:
            raise ValueError(f"{where}: auto_map entry {r!r} loads code from another repository; refused")
        mod = check_name(r.rsplit(".", 1)[0], f"{where}: auto_map entry {r!r}") + ".py"
        if not mod.startswith("tokenization"):  # the exporter's own modules never are
            raise ValueError(f"{where}: auto_map entry {r!r}: a tokenizer's code module must be named "
                             "tokenization*.py (other names are reserved for the export's own code)")
        if mod not in mods:
            mods.append(mod)
    return mods


def _copy(src_dir: str, names: Iterable[str], out_dir: str, reserved: Iterable[str], where: str) -> List[str]:
    reserved = set(reserved)
    written = []
    for name in names:
        if name in reserved:
            raise ValueError(f"{where}: {name} would replace a file the exporter writes; refused")
        p = os.path.join(src_dir, name)
        if not os.path.isfile(p):
            raise ValueError(f"{where}: {p} is not a regular file")
        shutil.copyfile(p, os.path.join(out_dir, name))
        written.append(name)
    return written


def check_tokenizer(src: str, allow_code: bool = False) -> List[str]:
    """Refuse what ``write_tokenizer`` would refuse, before any work: a missing path, a file that
    is not a tokenizer.json, a tokenizer_config.json with an auto_map unless ``allow_code``.
    Returns the code modules that would be shipped (empty without an auto_map)."""
    where = f"--tokenizer {src}"
    if not os.path.exists(src):
        raise ValueError(f"{where}: no such file or directory")
    if not os.path.isdir(src):
        if not src.endswith(".json"):
            raise ValueError(f"{where}: expected a tokenizer directory or a tokenizer.json file")
        return []
    cfg_path = os.path.join(src, "tokenizer_config.json")
    config = read_json_object(cfg_path) if os.path.isfile(cfg_path) else {}
    mods = code_modules(config, cfg_path)
    if config.get("auto_map") and not allow_code:
        raise ValueError(
            f"{where}: {cfg_path} has an auto_map {config['auto_map']}: loading this tokenizer runs its "
            "own Python code, which would ship in the export and run on every "
            "from_pretrained(trust_remote_code=True). Refused; pass --allow-tokenizer-code to ship it "
            "(only for a tokenizer you trust), or give a tokenizer without custom code")
    return mods


def write_tokenizer(src: str, out_dir: str, reserved: Iterable[str] = (), allow_code: bool = False) -> List[str]:
    """Put the tokenizer at ``src`` (HF tokenizer dir or a tokenizer.json) into ``out_dir``;
    returns the file names written. See the module docstring for what is refused."""
    where = f"--tokenizer {src}"
    mods = check_tokenizer(src, allow_code)
    if mods:  # allowed custom code: copy the files as they are, load nothing here
        names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
        return _copy(src, names + mods, out_dir, reserved, where)
    scratch = tempfile.mkdtemp(prefix="ham_tokenizer_")
    try:
        _save_without_code(src, scratch, where)
        names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(scratch, n))]
        return _copy(scratch, names, out_dir, reserved, where)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _save_without_code(src: str, dest: str, where: str) -> None:
    """Load with transformers (no remote code) and save the files transformers writes to ``dest``."""
    try:
        if os.path.isdir(src):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
        else:
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast(tokenizer_file=src)
        tok.save_pretrained(dest)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, tokenizers' Exception
        raise ValueError(f"{where}: cannot load it as a tokenizer without custom code "
                         f"({type(e).__name__}: {e})") from None
