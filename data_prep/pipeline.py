"""Tokenize manifest components into Megatron IndexedDatasets, resumably and deterministically.

Output directory layout::

    <out>/<component>.bin, <component>.idx   one IndexedDataset per component (GPTDataset-ready)
    <out>/blend.json                          {"blend": [{"prefix", "weight", ...}], ...}
    <out>/stats.json                          documents / tokens / length histogram / problems
    <out>/.work/state.json                    per-file progress (resumption)
    <out>/.work/<component>/<i>.bin/.idx      per-file parts, merged into <component> then removed

Safety: every file is written under a temporary name and renamed with ``os.replace``; for an
IndexedDataset the ``.bin`` is renamed first and the ``.idx`` last, so a killed run never leaves
a complete-looking ``.idx`` next to a partial ``.bin``. A file counts as finished only once
its part is renamed and recorded in ``state.json`` (itself replaced atomically); a re-run skips
finished files and redoes the rest.

Determinism: files are read in sorted order as blocks of whole lines whose boundaries depend
only on ``batch_bytes``; blocks are tokenized by a process pool but written in input order, so
the bytes written are identical for any number of workers.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List

import numpy as np

from .manifest import Component, Manifest
from .sources import (DEFAULT_MAX_RECORD_BYTES, EMPTY, DataError, Problem, file_problem, init_worker,
                      iter_blocks, process_block)
from .tokenizer import TokenizerInfo

log = logging.getLogger("data_prep")

STATE_VERSION = 1
HIST_EDGES = [0] + [2 ** k for k in range(7, 18)]  # 0,128,...,131072 (+ overflow bin)
THRESHOLDS = [2048, 4096, 8192, 16384, 32768, 65536, 131072]
MAX_EXAMPLES = 20


@dataclass
class Options:
    out: str
    workers: int = 1
    on_error: str = "fail"          # fail | skip
    batch_bytes: int = 1 << 20
    progress: bool = True
    overwrite: bool = False
    keep_parts: bool = False
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES


def _atomic_write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def new_stats() -> dict:
    return {"files": 0, "records": 0, "documents": 0, "tokens": 0, "text_tokens": 0,
            "max_length": 0, "histogram": [0] * (len(HIST_EDGES)), "problems": {}, "examples": []}


def _add_lengths(st: dict, text_lengths: np.ndarray) -> None:
    if text_lengths.size == 0:
        return
    idx = np.searchsorted(np.asarray(HIST_EDGES[1:]), text_lengths, side="right")
    counts = np.bincount(idx, minlength=len(HIST_EDGES))
    st["histogram"] = [a + int(b) for a, b in zip(st["histogram"], counts)]
    st["max_length"] = max(st["max_length"], int(text_lengths.max()))


def merge_stats(dst: dict, src: dict) -> dict:
    for k in ("files", "records", "documents", "tokens", "text_tokens"):
        dst[k] += src[k]
    dst["max_length"] = max(dst["max_length"], src["max_length"])
    dst["histogram"] = [a + b for a, b in zip(dst["histogram"], src["histogram"])]
    for k, v in src["problems"].items():
        dst["problems"][k] = dst["problems"].get(k, 0) + v
    dst["examples"] = (dst["examples"] + src["examples"])[:MAX_EXAMPLES]
    return dst


def describe_stats(st: dict) -> dict:
    """Stats as written to stats.json (histogram with bin edges, threshold counts)."""
    bins = []
    for i, n in enumerate(st["histogram"]):
        lo = HIST_EDGES[i]
        hi = HIST_EDGES[i + 1] if i + 1 < len(HIST_EDGES) else None
        bins.append({"min_tokens": lo, "max_tokens_exclusive": hi, "documents": n})
    at_least = {}
    for t in THRESHOLDS:
        # thresholds are bin edges: count documents in bins starting at >= t
        at_least[str(t)] = sum(n for i, n in enumerate(st["histogram"]) if HIST_EDGES[i] >= t)
    docs = st["documents"]
    return {
        "files": st["files"], "records": st["records"], "documents": docs,
        "tokens": st["tokens"], "text_tokens": st["text_tokens"],
        "mean_length": (st["text_tokens"] / docs) if docs else 0.0, "max_length": st["max_length"],
        "documents_at_least": at_least, "length_histogram": bins,
        "problems": dict(sorted(st["problems"].items())), "problem_examples": st["examples"],
    }


class _Ordered:
    """Run ``process_block`` over blocks on a pool (or inline), yielding results in input
    order with at most ``2 * workers`` blocks in flight (bounded memory)."""

    def __init__(self, tok: TokenizerInfo, comp: Component, workers: int,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES):
        self.workers = workers
        args = (tok.json, tok.eod, tok.bos, tok.dtype, comp.text_field, comp.required_fields, max_record_bytes)
        if workers <= 1:
            init_worker(*args, die_with_parent=False)
            self.pool = None
        else:
            self.pool = mp.get_context("fork").Pool(workers, initializer=init_worker, initargs=args)

    def map(self, items: Iterable, skip=lambda item: False):
        """Yield (item, result) in input order; ``item`` is (tag, Block); items for which
        ``skip(item)`` is true pass through in order with result None."""
        if self.pool is None:
            for it in items:
                yield it, (None if skip(it) else process_block(it[1]))
            return
        pending = collections.deque()
        busy = 0
        for it in items:
            if skip(it):
                pending.append((it, None))
                continue
            pending.append((it, self.pool.apply_async(process_block, (it[1],))))
            busy += 1
            while busy >= 2 * self.workers:
                it0, r = pending.popleft()
                if r is not None:
                    busy -= 1
                    r = r.get()
                yield it0, r
        while pending:
            it0, r = pending.popleft()
            yield it0, (r.get() if r is not None else None)

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def _record_problems(st: dict, path: str, problems: List[Problem], on_error: str) -> None:
    for p in problems:
        st["problems"][p.kind] = st["problems"].get(p.kind, 0) + 1
        if len(st["examples"]) < MAX_EXAMPLES:
            st["examples"].append({"file": path, "line": p.line, "kind": p.kind, "message": p.message})
        where = f"{path}:{p.line}" if p.line else path  # line 0: the whole file
        if p.kind == EMPTY:
            log.debug("%s: %s (skipped)", where, p.message)
            continue
        if on_error == "fail":
            raise DataError(f"{where}: {p.kind}: {p.message}\n"
                            "(use --on-error skip to skip and count bad records)")
        n = st["problems"][p.kind]
        if n <= 5:
            log.warning("%s: %s: %s (skipped)", where, p.kind, p.message)
        elif n == 6:
            log.warning("%s: more %s problems; see stats.json for counts", path, p.kind)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                dynamic_ncols=True, leave=True, mininterval=0.5)


class _FileWriter:
    """One input file's part: an IndexedDatasetBuilder on temporary names, made final (.bin
    first, .idx last) by ``finish``; ``abort`` removes the temporary files."""

    def __init__(self, path: str, prefix: str, tok: TokenizerInfo, t0: float):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.path, self.prefix = path, prefix
        self.bin_tmp, self.idx_tmp = prefix + ".bin.tmp", prefix + ".idx.tmp"
        self.builder = IndexedDatasetBuilder(self.bin_tmp, dtype=np.dtype(tok.dtype).type)
        self.extra = 1 + (tok.bos is not None)
        self.st = new_stats()
        self.st["files"] = 1
        self.t0 = t0  # when the previous file of the stream finished (the stream is shared)

    def add(self, tokens: np.ndarray, lengths: np.ndarray, n_records: int) -> None:
        st = self.st
        st["records"] += n_records
        # one sequence per document (document_indices = 0..n), as GPTDataset expects. Same
        # effect as IndexedDatasetBuilder.add_document(doc, [len(doc)]) per document, done for
        # the whole block at once (one write, two list extends)
        b = self.builder
        if tokens.dtype != np.dtype(b.dtype):
            raise ValueError(f"{self.path}: token dtype {tokens.dtype} != {np.dtype(b.dtype)}")
        b.data_file.write(memoryview(np.ascontiguousarray(tokens)).cast("B"))
        start = len(b.sequence_lengths)
        b.sequence_lengths.extend(lengths.tolist())
        b.document_indices.extend(range(start + 1, start + 1 + int(lengths.size)))
        st["documents"] += int(lengths.size)
        st["tokens"] += int(tokens.size)
        st["text_tokens"] += int(tokens.size - self.extra * lengths.size)
        _add_lengths(st, lengths - self.extra)

    def finish(self) -> dict:
        self.builder.finalize(self.idx_tmp)
        os.replace(self.bin_tmp, self.prefix + ".bin")
        os.replace(self.idx_tmp, self.prefix + ".idx")   # .idx last: its presence marks a complete part
        st = self.st
        dt = time.perf_counter() - self.t0
        st["seconds"] = dt
        log.info("%s: %d documents, %d tokens in %.1fs (%.1f docs/s, %.0f tok/s)%s", self.path, st["documents"],
                 st["tokens"], dt, st["documents"] / max(dt, 1e-9), st["tokens"] / max(dt, 1e-9),
                 "".join(f", {v} {k}" for k, v in sorted(st["problems"].items())))
        return st

    def abort(self) -> None:
        try:
            self.builder.data_file.close()
        finally:
            for p in (self.bin_tmp, self.idx_tmp):
                if os.path.exists(p):
                    os.remove(p)


def tokenize_files(todo, comp: Component, tok: TokenizerInfo, runner: _Ordered, opts: Options,
                   on_file_done) -> None:
    """Tokenize ``todo`` = [(path, part_prefix, key)] into one IndexedDataset part per file.

    All files' blocks go through one ordered stream, so the workers keep busy across file
    boundaries (the next file is read while the last blocks of the previous one finish).
    ``on_file_done(key, stats)`` runs after each part is final, in file order.
    """
    reader_problems: Dict[str, List[Problem]] = {}
    END = object()

    def stream():
        for path, _prefix, key in todo:
            probs = reader_problems.setdefault(key, [])
            for b in iter_blocks(path, opts.batch_bytes, probs, comp.text_field, opts.max_record_bytes):
                yield key, b
            yield key, END

    total_bytes = sum(os.path.getsize(p) for p, _, _ in todo)
    bar = _progress(total_bytes, comp.name, opts.progress)
    done_bytes = 0
    paths = {key: (path, prefix) for path, prefix, key in todo}
    writers: Dict[str, _FileWriter] = {}
    t0 = last_done = time.perf_counter()
    docs = toks = 0
    try:
        for (key, block), res in runner.map(stream(), skip=lambda item: item[1] is END):
            path, prefix = paths[key]
            w = writers.get(key)
            if w is None:
                w = writers[key] = _FileWriter(path, prefix, tok, last_done)
            if block is END:
                _record_problems(w.st, path, reader_problems.pop(key), opts.on_error)
                st = w.finish()
                last_done = time.perf_counter()
                del writers[key]
                done_bytes += os.path.getsize(path)
                on_file_done(key, st)
                continue
            tokens, lengths, _lines, problems, n_records = res
            _record_problems(w.st, path, block.problems + problems, opts.on_error)
            w.add(tokens, lengths, n_records)
            docs += int(lengths.size)
            toks += int(tokens.size)
            if bar is not None:
                bar.update(done_bytes + block.pos - bar.n)
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{docs / dt:.1f} docs/s, {toks / dt / 1e3:.1f}k tok/s", refresh=False)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if bar is not None:
            bar.close()


def _file_id(path: str) -> dict:
    s = os.stat(path)
    return {"path": path, "size": s.st_size, "mtime_ns": s.st_mtime_ns}


def _settings_fingerprint(tok: TokenizerInfo, comp: Component, opts: Options) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([STATE_VERSION, tok.fingerprint, comp.text_field, comp.required_fields,
                         opts.on_error, opts.batch_bytes, opts.max_record_bytes]).encode())
    return h.hexdigest()[:16]


OUTPUT_EXTS = (".idx", ".bin", ".idx.tmp", ".bin.tmp")
PART_RE = re.compile(r"^\d{5}\.(bin|idx)(\.tmp)?$")


def _remove_prefix(prefix: str) -> None:
    """Remove this tool's IndexedDataset files at ``prefix`` (callers make sure they are ours)."""
    for ext in OUTPUT_EXTS:
        if os.path.exists(prefix + ext):
            os.remove(prefix + ext)


def _remove_parts(pdir: str) -> None:
    """Remove the per-file parts (``NNNNN.bin/.idx``, also ``.tmp``) from ``pdir`` (a component's
    work dir), then the dir itself if nothing else is left: nothing this tool did not create
    is deleted."""
    for name in os.listdir(pdir):
        if PART_RE.match(name):
            os.remove(os.path.join(pdir, name))
    try:
        os.rmdir(pdir)
    except OSError:
        log.warning("%s: not removed (it holds files ham-prep-data did not write)", pdir)


def _check_not_foreign(out: str, names: List[str], state: dict) -> None:
    """Refuse to write over files in ``out`` that this tool did not write: an output name
    (``<name>.bin/.idx``, ``blend.json``, ``stats.json``) that exists while ``.work/state.json``
    has no record of it. Other files in ``out`` are left alone."""
    known = set(state["components"])
    clash = [os.path.join(out, n + ext) for n in names if n not in known for ext in OUTPUT_EXTS
             if os.path.lexists(os.path.join(out, n + ext))]
    if not known:
        clash += [os.path.join(out, n) for n in ("blend.json", "stats.json") if os.path.lexists(os.path.join(out, n))]
    if clash:
        raise ValueError(f"--out {out}: {', '.join(clash)} exist(s) but were not written by ham-prep-data "
                         "here (no record in .work/state.json); move them away or choose another --out")


def _load_state(state_path: str) -> dict:
    state = {"version": STATE_VERSION, "components": {}}
    if not os.path.exists(state_path):
        return state
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{state_path}: unreadable resume state ({e}); remove the output directory "
                         "or use a new --out") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION \
            or not isinstance(state.get("components"), dict):
        version = state.get("version") if isinstance(state, dict) else None
        raise ValueError(f"{state_path}: state version {version} != {STATE_VERSION}; "
                         "remove the output directory or use a new --out")
    return state


def _readable_files(comp: Component, on_error: str, st: dict) -> List[str]:
    """``comp.files`` minus those that cannot be read (a directory, a dangling link, no
    permission...): ``unreadable_file`` problems, fatal under --on-error fail."""
    ok = []
    for path in comp.files:
        why = file_problem(path)
        if why is None:
            ok.append(path)
        else:
            _record_problems(st, path, [Problem("unreadable_file", 0, why)], on_error)
    return ok


def _append_part(builder, part: str) -> None:
    """What ``IndexedDatasetBuilder.add_index`` does, minus its ``gc.collect()`` per part (0.4 s
    each in a process with torch/transformers loaded): extend the builder's index lists with the
    part's (read through megatron's IndexedDataset) and append the part's .bin."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(part, mmap=False)
    if ds.index.dtype != builder.dtype:
        raise ValueError(f"{part}: token dtype {ds.index.dtype} != {builder.dtype}")
    offset = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(ds.sequence_lengths.tolist())
    builder.document_indices.extend((ds.document_indices[1:] + offset).tolist())
    del ds
    with open(part + ".bin", "rb") as f:
        shutil.copyfileobj(f, builder.data_file, 1 << 22)


def merge_parts(parts: List[str], prefix: str, dtype: str, move_single: bool = True) -> None:
    """Concatenate per-file IndexedDatasets into ``prefix`` with IndexedDatasetBuilder.add_index."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    _remove_prefix(prefix)
    if len(parts) == 1 and move_single:
        os.replace(parts[0] + ".bin", prefix + ".bin")
        os.replace(parts[0] + ".idx", prefix + ".idx")
        return
    builder = IndexedDatasetBuilder(prefix + ".bin.tmp", dtype=np.dtype(dtype).type)
    for p in parts:
        _append_part(builder, p)
    builder.finalize(prefix + ".idx.tmp")
    os.replace(prefix + ".bin.tmp", prefix + ".bin")
    os.replace(prefix + ".idx.tmp", prefix + ".idx")


def run(manifest: Manifest, tok: TokenizerInfo, opts: Options) -> dict:
    """Build every component; returns the stats dict also written to <out>/stats.json.

    A component whose inputs hold no document gets no .bin/.idx and no blend entry: an error
    (DataError) under --on-error fail, a warning under skip; no document at all is an error.
    """
    out = os.path.abspath(opts.out)
    work = os.path.join(out, ".work")
    os.makedirs(work, exist_ok=True)
    state_path = os.path.join(work, "state.json")
    state = _load_state(state_path)
    _check_not_foreign(out, [c.name for c in manifest.components if c.files], state)
    t_start = time.perf_counter()
    comp_stats: Dict[str, dict] = {}
    for comp in manifest.components:
        if not comp.files:
            continue
        fp = _settings_fingerprint(tok, comp, opts)
        cstate = state["components"].get(comp.name)
        if cstate and cstate.get("settings") != fp:
            if not opts.overwrite:
                raise ValueError(f"{out}: component {comp.name!r} was built with different settings "
                                 "(tokenizer, fields, --on-error, --batch-bytes or --max-record-bytes); "
                                 "pass --overwrite to rebuild it")
            log.warning("component %s: settings changed, rebuilding (--overwrite)", comp.name)
            cstate = None
        unreadable = new_stats()
        files = _readable_files(comp, opts.on_error, unreadable)
        file_ids = [_file_id(p) for p in files]
        prefix = os.path.join(out, comp.name)
        if (cstate and cstate.get("done") and cstate.get("inputs") == file_ids
                and (cstate.get("empty") or (os.path.exists(prefix + ".idx") and os.path.exists(prefix + ".bin")))):
            log.info("component %s: up to date (%s.bin/.idx), skipped", comp.name, prefix)
            comp_stats[comp.name] = cstate["stats"]
            continue
        if cstate is None:
            cstate = {"settings": fp, "files": {}}
        cstate["done"] = False
        cstate["inputs"] = file_ids
        state["components"][comp.name] = cstate
        _atomic_write_json(state_path, state)  # <out>/<name>.* are ours from here on
        pdir = os.path.join(work, comp.name)
        os.makedirs(pdir, exist_ok=True)
        parts = []
        todo = []
        total = merge_stats(new_stats(), unreadable)
        for i, (path, fid) in enumerate(zip(files, file_ids)):
            part = os.path.join(pdir, f"{i:05d}")
            parts.append(part)
            key = str(i)
            fs = cstate["files"].get(key)
            if (fs and fs.get("input") == fid and os.path.exists(part + ".idx")
                    and os.path.exists(part + ".bin")):
                log.info("%s: finished in an earlier run, skipped", path)
                merge_stats(total, fs["stats"])
                continue
            _remove_prefix(part)
            todo.append((path, part, key))

        def on_file_done(key, st):
            cstate["files"][key] = {"input": file_ids[int(key)], "stats": st}
            _atomic_write_json(state_path, state)
            merge_stats(total, st)

        if todo:
            runner = _Ordered(tok, comp, opts.workers, opts.max_record_bytes)
            try:
                tokenize_files(todo, comp, tok, runner, opts, on_file_done)
            finally:
                runner.close()
        empty = total["documents"] == 0
        if empty:
            _no_documents(comp, total, opts.on_error)
            _remove_prefix(prefix)  # an earlier build of this component (ours: it is in the state)
        else:
            merge_parts(parts, prefix, tok.dtype, move_single=not opts.keep_parts)
        cstate["done"] = True
        cstate["empty"] = empty
        cstate["stats"] = total
        cstate["files"] = {}  # parts are merged (and removed below); the component is the unit now
        _atomic_write_json(state_path, state)
        if not opts.keep_parts or empty:
            _remove_parts(pdir)
        comp_stats[comp.name] = total
        if not empty:
            log.info("component %s: %d documents, %d tokens -> %s.bin/.idx", comp.name, total["documents"],
                     total["tokens"], prefix)

    weights = manifest.normalized_weights()
    result = {
        "manifest": manifest.path or manifest.name, "revision": manifest.revision,
        "tokenizer": tok.name, "vocab_size": tok.vocab_size, "eod_id": tok.eod, "bos_id": tok.bos,
        "dtype": tok.dtype, "length_unit": "tokens of the document text, EOD/BOS excluded",
        "components": {}, "total": None, "seconds": time.perf_counter() - t_start,
    }
    grand = new_stats()
    for comp in manifest.components:
        if comp.name not in comp_stats:
            continue
        d = describe_stats(comp_stats[comp.name])
        d["weight"] = weights.get(comp.name, 0.0)
        d["prefix"] = os.path.join(out, comp.name) if d["documents"] else None
        d["inputs"] = comp.files
        result["components"][comp.name] = d
        merge_stats(grand, comp_stats[comp.name])
    result["total"] = describe_stats(grand)
    _atomic_write_json(os.path.join(out, "stats.json"), result)
    if not any(c["documents"] and c["weight"] > 0 for c in result["components"].values()):
        raise DataError(f"no component with a blend weight > 0 produced a document (see "
                        f"{os.path.join(out, 'stats.json')}); blend.json not written")
    write_blend(os.path.join(out, "blend.json"), result, manifest)
    return result


def _no_documents(comp: Component, st: dict, on_error: str) -> None:
    """A component whose inputs gave no document: DataError under fail, else a warning."""
    probs = ", ".join(f"{n} {k}" for k, n in sorted(st["problems"].items())) or "no records"
    msg = (f"component {comp.name!r} produced no documents ({st['records']} records, {probs}) from "
           f"{', '.join(comp.files)}")
    if on_error == "fail":
        raise DataError(msg + "\n(with --on-error skip it is left out of the blend)")
    log.warning("%s: left out of the blend (no .bin/.idx written)", msg)


def write_blend(path: str, stats: dict, manifest: Manifest) -> None:
    """blend.json: ``{"blend": [{"prefix", "weight", "relative_prefix", "documents", "tokens"}],
    "tokenizer", "vocab_size", "eod_id", "dtype"}``; weights are normalised to sum to 1."""
    base = os.path.dirname(os.path.abspath(path))
    blend = []
    for name, c in stats["components"].items():
        if c["weight"] <= 0 or c["documents"] == 0:
            continue
        blend.append({"prefix": c["prefix"], "weight": c["weight"],
                      "relative_prefix": os.path.relpath(c["prefix"], base),
                      "name": name, "documents": c["documents"], "tokens": c["tokens"]})
    total = sum(b["weight"] for b in blend)
    for b in blend:
        b["weight"] = b["weight"] / total if total else 0.0
    _atomic_write_json(path, {"blend": blend, "tokenizer": stats["tokenizer"], "vocab_size": stats["vocab_size"],
                              "eod_id": stats["eod_id"], "dtype": stats["dtype"],
                              "manifest": stats["manifest"], "revision": stats["revision"]})


def load_blend(path: str):
    """Read blend.json -> (prefixes, weights) for ``GPTDatasetConfig(blend=(prefixes, weights))``.
    ``prefix`` is used when its .idx exists, else ``relative_prefix`` (relative to the blend file)."""
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    entries = raw["blend"] if isinstance(raw, dict) else raw
    base = os.path.dirname(os.path.abspath(path))
    prefixes, weights = [], []
    for i, e in enumerate(entries):
        if "prefix" not in e or "weight" not in e:
            raise ValueError(f"{path}: blend[{i}] needs 'prefix' and 'weight', got {sorted(e)}")
        p = e["prefix"]
        if not os.path.isabs(p):
            p = os.path.join(base, p)
        if not os.path.exists(p + ".idx") and "relative_prefix" in e:
            p = os.path.join(base, e["relative_prefix"])
        prefixes.append(p)
        weights.append(float(e["weight"]))
    return prefixes, weights
