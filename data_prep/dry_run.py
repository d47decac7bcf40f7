"""--dry-run: estimate tokens, documents, epochs and disk per component from a sample.

For every file the first ``sample_bytes`` of the *compressed* file are decoded and tokenized;
tokens and documents per compressed byte are extrapolated to the file's size (exact when the
whole file fits in the sample). With a token budget B and normalised blend weights w_c, the
blend draws B*w_c tokens from component c, i.e. B*w_c / tokens_c epochs of it.

Caveat: the head of a file may not be representative of the whole (files sorted by source or
length), so treat the numbers as estimates; the JSON says which were exact.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

from .manifest import Manifest
from .pipeline import _Ordered
from .sources import DEFAULT_MAX_RECORD_BYTES, file_problem, iter_blocks
from .tokenizer import TokenizerInfo

log = logging.getLogger("data_prep")
IDX_BYTES_PER_DOC = 4 + 8 + 8   # sequence length (int32) + pointer (int64) + document index (int64)


def estimate(manifest: Manifest, tok: TokenizerInfo, sample_bytes: int, budget: Optional[int] = None,
             workers: int = 1, batch_bytes: int = 1 << 20, seq_len: Optional[int] = None,
             progress: bool = True, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> dict:
    itemsize = 2 if tok.dtype == "uint16" else 4
    weights = manifest.normalized_weights()
    comps = {}
    t0 = time.perf_counter()
    for comp in manifest.components:
        if not comp.files:
            continue
        runner = _Ordered(tok, comp, workers, max_record_bytes)
        est_tokens = est_docs = 0.0
        exact = True
        bytes_total = 0
        long_docs = docs_seen = 0
        unreadable = {}
        try:
            for path in comp.files:
                why = file_problem(path)
                if why is not None:
                    log.warning("dry run %s: unreadable_file: %s (left out of the estimate)", path, why)
                    unreadable[path] = why
                    continue
                size = os.path.getsize(path)
                bytes_total += size
                problems = []
                tokens = docs = 0
                seen = {"stopped": False, "last": None, "text_bytes": 0}

                def limited():
                    for b in iter_blocks(path, batch_bytes, problems, comp.text_field, max_record_bytes):
                        yield b
                        seen["last"] = b
                        if b.pos >= sample_bytes and b.pos < size:
                            seen["stopped"] = True
                            return
                for (_, block), (toks, lengths, _lines, _probs, _n) in runner.map((None, b) for b in limited()):
                    tokens += int(toks.size)
                    docs += int(lengths.size)
                    long_docs += int((lengths >= 16384).sum())
                    seen["text_bytes"] += len(block.data) if isinstance(block.data, bytes) else \
                        sum(len(x) for x in block.data if isinstance(x, str))
                docs_seen += docs
                last = seen["last"]
                consumed = last.pos if last is not None else 0
                if not seen["stopped"]:
                    est_tokens += tokens
                    est_docs += docs
                else:
                    exact = False
                    if isinstance(last.data, bytes) and last.decoded:
                        # decoded bytes per compressed byte so far -> decoded size of the whole file
                        scale = (size * last.decoded / max(last.pos, 1)) / max(seen["text_bytes"], 1)
                    else:
                        scale = size / max(consumed, 1)
                    est_tokens += tokens * scale
                    est_docs += docs * scale
                log.info("dry run %s: %d documents, %d tokens in the first %.1f MiB of %.1f MiB",
                         path, docs, tokens, consumed / 2 ** 20, size / 2 ** 20)
        finally:
            runner.close()
        c = {"files": comp.files, "input_bytes": bytes_total, "exact": exact,
             "estimated_documents": int(est_docs), "estimated_tokens": int(est_tokens),
             "fraction_documents_at_least_16384": (long_docs / docs_seen) if docs_seen else 0.0,
             "estimated_disk_bytes": int(est_tokens * itemsize + est_docs * IDX_BYTES_PER_DOC),
             "weight": weights.get(comp.name, 0.0), "unreadable_files": unreadable}
        if budget:
            need = budget * c["weight"]
            c["budget_tokens"] = int(need)
            c["epochs"] = need / c["estimated_tokens"] if c["estimated_tokens"] else float("inf")
        comps[comp.name] = c
    res = {"tokenizer": tok.name, "dtype": tok.dtype, "sample_bytes_per_file": sample_bytes,
           "budget_tokens": budget, "components": comps,
           "total_estimated_tokens": int(sum(c["estimated_tokens"] for c in comps.values())),
           "total_estimated_disk_bytes": int(sum(c["estimated_disk_bytes"] for c in comps.values())),
           "seconds": time.perf_counter() - t0}
    if budget and seq_len:
        n_seq = budget // seq_len
        res["webdataset_sequences"] = int(n_seq)
        res["webdataset_disk_bytes"] = int(n_seq * ((seq_len + 1) * itemsize + 128 + 3 * 512))
    _print_table(res, budget)
    return res


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _print_table(res: dict, budget: Optional[int]) -> None:
    head = f"{'component':<24}{'weight':>8}{'docs':>10}{'tokens':>10}{'>=16k':>8}{'disk':>10}"
    if budget:
        head += f"{'budget':>10}{'epochs':>8}"
    lines = [head]
    for name, c in res["components"].items():
        row = (f"{name:<24}{c['weight']:>8.3f}{_fmt(c['estimated_documents']):>10}{_fmt(c['estimated_tokens']):>10}"
               f"{100 * c['fraction_documents_at_least_16384']:>7.1f}%{_fmt(c['estimated_disk_bytes']) + 'B':>10}")
        if budget:
            row += f"{_fmt(c['budget_tokens']):>10}{c['epochs']:>8.2f}"
        if not c["exact"]:
            row += "  (estimated)"
        lines.append(row)
    lines.append(f"total tokens ~{_fmt(res['total_estimated_tokens'])}, disk ~{_fmt(res['total_estimated_disk_bytes'])}B"
                 + (f"; webdataset for the budget ~{_fmt(res['webdataset_disk_bytes'])}B" if "webdataset_disk_bytes" in res else ""))
    print("\n".join(lines))
