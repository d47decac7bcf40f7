"""Rebuild the embedded sample corpus and its tokenizer, reproducibly and offline.

The sample mirrors the layout of togethercomputer/Long-Data-Collections::

    data_prep/sample/pretrain/python_docs_library.jsonl.zst   {"text", "meta"}
    data_prep/sample/pretrain/python_docs_guides.jsonl.zst    {"text", "meta"}
    data_prep/sample/pretrain/licenses.jsonl.zst              {"text", "metadata"}
    data_prep/sample/fine-tune/python_docs_titles.jsonl.zst   {"prompt", "completion", "text", "meta"}
    data_prep/sample/tokenizer/                               Hugging Face tokenizer directory

Sources (all redistributable, recorded per document in ``meta``/``metadata``):

* the reStructuredText sources of the Python 3.11 documentation as shipped in the Debian
  package ``python3.11-doc`` (``usr/share/doc/python3.11/html/_sources``), PSF License v2;
* the licence texts in ``/usr/share/common-licenses`` (Debian ``base-files``), which each
  permit verbatim copying and distribution of the licence document.

Usage::

    python -m data_prep.build_sample                 # apt-get download python3.11-doc, rebuild
    python -m data_prep.build_sample --deb FILE.deb  # use an already downloaded package
    python -m data_prep.build_sample --check         # rebuild into a temp dir, compare bytes

The selection is a fixed function of the package contents (sorted file names and size
budgets), the zstd level is fixed and the BPE training is deterministic, so re-running with
the same package version reproduces the files byte for byte.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import zstandard

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "sample")
DEB_NAME = "python3.11-doc"
DEB_VERSION = "3.11.2-6+deb12u8"
DEB_SHA256 = "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b"
SOURCES_DIR = "usr/share/doc/python3.11/html/_sources"
LICENSES_DIR = "/usr/share/common-licenses"
PSF = "PSF-2.0 (Python Software Foundation License Version 2)"
VOCAB_SIZE = 8000
EOS = "<|endoftext|>"
PAD = "<|pad|>"
ZSTD_LEVEL = 19

# (component file, doc sub-directories, minimum size of one page in bytes, byte budget)
PRETRAIN_DOCS = [
    ("python_docs_library", ["library"], 40_000, 3_000_000),
    ("python_docs_guides", ["whatsnew", "howto", "reference", "tutorial"], 30_000, 1_200_000),
]
FINETUNE_DOCS = ("python_docs_titles", ["faq", "c-api", "extending"], 15_000, 600_000)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_deb(workdir: str) -> str:
    """Download the pinned python3.11-doc package with apt-get into ``workdir``."""
    subprocess.run(["apt-get", "download", f"{DEB_NAME}={DEB_VERSION}"], cwd=workdir, check=True)
    debs = glob.glob(os.path.join(workdir, f"{DEB_NAME}_*.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"expected one {DEB_NAME} package in {workdir}, found {debs}")
    return debs[0]


def extract_deb(deb: str, workdir: str) -> str:
    digest = _sha256(deb)
    if digest != DEB_SHA256:
        print(f"warning: {deb} has sha256 {digest}, expected {DEB_SHA256}; "
              "the sample will differ from the committed one", file=sys.stderr)
    root = os.path.join(workdir, "deb")
    subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
    return os.path.join(root, SOURCES_DIR)


def _title(rst: str) -> str:
    """First reST section title of a page (the line above an underline of = * - or #)."""
    lines = rst.splitlines()
    for i in range(1, len(lines)):
        under = lines[i].strip()
        above = lines[i - 1].strip()
        if above and len(under) >= 3 and len(set(under)) == 1 and under[0] in "=*-#" \
                and not set(above) <= set("=*-#"):
            return above
    return ""


def _pages(sources: str, subdirs, min_bytes: int, budget: int):
    """Pages of the given sub-directories, sorted by path, at least ``min_bytes`` each,
    until ``budget`` bytes are collected."""
    paths = []
    for sub in subdirs:
        paths += sorted(glob.glob(os.path.join(sources, sub, "*.rst.txt")))
    total = 0
    for path in paths:
        size = os.path.getsize(path)
        if size < min_bytes or total + size > budget:
            continue
        total += size
        rel = os.path.relpath(path, sources)[: -len(".txt")]
        with open(path, encoding="utf-8") as f:
            yield rel, f.read()


def _doc_meta(rel: str) -> dict:
    page = rel[: -len(".rst")]
    return {
        "source": f"Python 3.11 documentation, Doc/{rel}",
        "url": f"https://docs.python.org/3.11/{page}.html",
        "license": PSF,
        "copyright": "Copyright (c) 2001-2023 Python Software Foundation",
        "package": f"Debian {DEB_NAME} {DEB_VERSION}",
    }


def _write_jsonl_zst(path: str, records) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.BytesIO()
    for rec in records:
        buf.write(json.dumps(rec, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        buf.write(b"\n")
    data = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(buf.getvalue())
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(buf.getvalue())


def build_records(sources: str):
    """Return {relative file path: list of records}."""
    out = {}
    for name, subdirs, min_bytes, budget in PRETRAIN_DOCS:
        out[f"pretrain/{name}.jsonl.zst"] = [
            {"text": text, "meta": _doc_meta(rel)} for rel, text in _pages(sources, subdirs, min_bytes, budget)
        ]
    lic = []
    for path in sorted(glob.glob(os.path.join(LICENSES_DIR, "*"))):
        if os.path.islink(path):
            continue  # GPL -> GPL-3 etc.: keep each text once
        with open(path, encoding="utf-8") as f:
            text = f.read()
        lic.append({"text": text, "metadata": {
            "source": f"{path} (Debian base-files)",
            "license": "verbatim copying and distribution of this licence document is permitted",
            "name": os.path.basename(path),
        }})
    out["pretrain/licenses.jsonl.zst"] = lic
    name, subdirs, min_bytes, budget = FINETUNE_DOCS
    ft = []
    for rel, text in _pages(sources, subdirs, min_bytes, budget):
        title = _title(text)
        if not title:
            continue
        body = text.replace(title, "", 1)
        prompt = ("Below is a page of the Python documentation with its title removed.\n\n"
                  f"{body}\n\nWhat is the title of this page?\n")
        completion = title + "\n"
        ft.append({"prompt": prompt, "completion": completion, "text": prompt + completion,
                   "meta": _doc_meta(rel)})
    out[f"fine-tune/{name}.jsonl.zst"] = ft
    return out


def train_tokenizer(texts, out_dir: str) -> None:
    """Byte-level BPE (vocab VOCAB_SIZE) saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                 model_max_length=1 << 20)
    from megatron_ham.publish import publish_dir, temp_dir_for

    tmp = temp_dir_for(out_dir)
    try:
        hf.save_pretrained(tmp)
        # an earlier tokenizer dir is replaced; only the files save_pretrained writes are deleted
        publish_dir(tmp, out_dir, os.listdir(tmp), overwrite=True, what="tokenizer dir")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build(out_dir: str, deb: str | None) -> dict:
    with tempfile.TemporaryDirectory() as work:
        deb = deb or fetch_deb(work)
        sources = extract_deb(deb, work)
        files = build_records(sources)
        sizes = {}
        for rel, recs in files.items():
            sizes[rel] = _write_jsonl_zst(os.path.join(out_dir, rel), recs)
        texts = [r["text"] for rel in sorted(files) for r in files[rel]]
        train_tokenizer(texts, os.path.join(out_dir, "tokenizer"))
    summary = {rel: {"documents": len(recs), "bytes_uncompressed": sizes[rel],
                     "bytes_zst": os.path.getsize(os.path.join(out_dir, rel))}
               for rel, recs in files.items()}
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: data_prep/sample)")
    p.add_argument("--deb", help=f"local {DEB_NAME}_{DEB_VERSION}_all.deb (default: apt-get download)")
    p.add_argument("--check", action="store_true",
                   help="rebuild into a temporary directory and compare with --out byte for byte")
    args = p.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            summary = build(tmp, args.deb)
            bad = []
            for path in sorted(glob.glob(os.path.join(tmp, "**", "*"), recursive=True)):
                if os.path.isfile(path):
                    rel = os.path.relpath(path, tmp)
                    ref = os.path.join(args.out, rel)
                    if not os.path.exists(ref) or _sha256(ref) != _sha256(path):
                        bad.append(rel)
            print(json.dumps(summary, indent=1))
            if bad:
                print("differs: " + ", ".join(bad), file=sys.stderr)
                return 1
            print("sample reproduced byte for byte")
            return 0
    summary = build(args.out, args.deb)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
