"""Streaming readers for jsonl / jsonl.zst / parquet and the per-block parse+tokenize worker.

The main process reads a file as a stream of *blocks* (whole lines, about ``batch_bytes`` of
decompressed text each, numbered by their first line). Blocks are independent of the number of
workers, so the output order and bytes are the same for any ``--workers``. A worker turns a
block into one array of tokens (each document followed by EOD), the per-document lengths and a
list of problems (kind, line, message).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import numpy as np
import zstandard

READ_CHUNK = 1 << 18

# Problems a record can have. "structural" ones fail the run under --on-error fail.
STRUCTURAL = ("malformed_json", "missing_field", "invalid_utf8", "truncated_zstd", "not_an_object",
              "bad_field_type", "unreadable_file")
EMPTY = "empty_document"


class DataError(Exception):
    """Bad input under --on-error fail; the message names file and line."""


@dataclass
class Block:
    first_line: int          # 1-based line (or parquet row) number of the first record
    data: object             # bytes (jsonl: lines joined by b"\n") or list of str/None (parquet)
    pos: int                 # bytes of the *input file* consumed so far (for progress / sampling)
    decoded: int = 0         # decompressed bytes read so far (>= the bytes handed out in blocks)


@dataclass
class Problem:
    kind: str
    line: int
    message: str


def _raw_chunks(path: str) -> Iterator[Tuple[bytes, int]]:
    with open(path, "rb") as f:
        pos = 0
        while True:
            chunk = f.read(READ_CHUNK)
            if not chunk:
                return
            pos += len(chunk)
            yield chunk, pos


def _decompressed_chunks(path: str, problems: List[Problem], line_of) -> Iterator[Tuple[bytes, int]]:
    """Stream-decode a (possibly multi-frame) zstd file; a stream that ends inside a frame
    appends a ``truncated_zstd`` problem instead of silently returning short data."""
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    in_frame = False
    pos = 0
    for chunk, pos in _raw_chunks(path):
        while chunk:
            try:
                out = dobj.decompress(chunk)
            except zstandard.ZstdError as e:
                problems.append(Problem("truncated_zstd", line_of(), f"corrupt zstd data: {e}"))
                return
            in_frame = not dobj.eof
            if out:
                yield out, pos
            if dobj.eof:
                chunk = dobj.unused_data
                dobj = dctx.decompressobj()
                in_frame = bool(chunk)
            else:
                chunk = b""
    if in_frame:
        problems.append(Problem("truncated_zstd", line_of(),
                                "zstd stream ends inside a frame (truncated file?); "
                                "the incomplete last line is dropped"))


def iter_blocks(path: str, batch_bytes: int, problems: List[Problem],
                text_field: str = "text") -> Iterator[Block]:
    """Blocks of whole records from ``path``; reader-level problems go to ``problems``."""
    if path.endswith(".parquet"):
        yield from _parquet_blocks(path, batch_bytes, problems, text_field)
        return
    buf = bytearray()
    first = 1
    if path.endswith(".zst"):
        chunks = _decompressed_chunks(path, problems, lambda: first + buf.count(b"\n"))
    else:
        chunks = _raw_chunks(path)
    pos = decoded = 0
    for data, pos in chunks:
        buf += data
        decoded += len(data)
        # cut blocks of whole lines at the first newline at/after batch_bytes: the boundaries
        # depend on the content and batch_bytes only (not on read sizes or worker counts)
        while len(buf) >= batch_bytes:
            cut = buf.find(b"\n", batch_bytes - 1)
            if cut < 0:
                break
            block = bytes(buf[: cut + 1])
            del buf[: cut + 1]
            yield Block(first, block, pos, decoded)
            first += block.count(b"\n")
    if any(p.kind == "truncated_zstd" for p in problems):
        last_nl = buf.rfind(b"\n")
        del buf[last_nl + 1:]  # drop the incomplete last line
    if buf:
        if not buf.endswith(b"\n"):
            buf += b"\n"
        yield Block(first, bytes(buf), os.path.getsize(path), decoded)


def _parquet_blocks(path, batch_bytes, problems, text_field):
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types
        problems.append(Problem("unreadable_file", 1, f"cannot open parquet file: {e}"))
        return
    if text_field not in pf.schema_arrow.names:
        problems.append(Problem("missing_field", 1, f"parquet column {text_field!r} not found; "
                                f"columns: {pf.schema_arrow.names}"))
        return
    size = os.path.getsize(path)
    row = 1
    pending, nbytes, first = [], 0, 1
    for rg in range(pf.num_row_groups):
        for batch in pf.iter_batches(batch_size=1024, row_groups=[rg], columns=[text_field]):
            col = batch.column(0).to_pylist()
            pending += col
            nbytes += sum(len(x) for x in col if isinstance(x, str))
            row += len(col)
            if nbytes >= batch_bytes:
                yield Block(first, pending, int(size * (rg + 1) / max(1, pf.num_row_groups)))
                pending, nbytes, first = [], 0, row
    if pending:
        yield Block(first, pending, size)


# --------------------------------------------------------------------------- worker side
_W = {}


def init_worker(tokenizer_json: str, eod: int, bos: Optional[int], dtype: str, text_field: str,
                required: List[str], die_with_parent: bool = True) -> None:
    """Pool initializer: single-threaded tokenizer per process (one process per core)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    if die_with_parent:
        try:  # a SIGKILLed parent must not leave workers behind
            import ctypes
            import signal
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:  # noqa: BLE001 - non-Linux
            pass
    from tokenizers import Tokenizer
    _W.update(tok=Tokenizer.from_str(tokenizer_json), eod=eod, bos=bos, dtype=np.dtype(dtype),
              text_field=text_field, required=required)


def _encode(texts: List[str]) -> List[List[int]]:
    tok = _W["tok"]
    fast = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: ~2x faster
    return [e.ids for e in fast(texts, add_special_tokens=False)]


def process_block(block: Block):
    """Parse and tokenize one block. Returns (tokens, lengths, lines, problems, n_records).

    tokens: 1-D array (dtype of the output) of every kept document followed by EOD;
    lengths: int64 [n_docs] tokens per document *including* EOD (and BOS when enabled);
    lines: int64 [n_docs] line number of each kept document.
    """
    field, required = _W["text_field"], _W["required"]
    problems: List[Problem] = []
    texts: List[str] = []
    lines: List[int] = []
    if isinstance(block.data, list):  # parquet rows
        records = enumerate(block.data)
        for i, t in records:
            ln = block.first_line + i
            if t is None:
                problems.append(Problem("missing_field", ln, f"field {field!r} is null"))
            elif not isinstance(t, str):
                problems.append(Problem("bad_field_type", ln, f"column {field!r} is {type(t).__name__}, expected a string"))
            elif not t.strip():
                problems.append(Problem(EMPTY, ln, "empty document"))
            else:
                texts.append(t)
                lines.append(ln)
        n_records = len(block.data)
    else:
        raw_lines = block.data.split(b"\n")
        if raw_lines and raw_lines[-1] == b"":
            raw_lines.pop()
        n_records = len(raw_lines)
        for i, raw in enumerate(raw_lines):
            ln = block.first_line + i
            try:
                s = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(Problem("invalid_utf8", ln, f"invalid UTF-8 at byte {e.start}: {e.reason}"))
                continue
            if not s.strip():
                problems.append(Problem(EMPTY, ln, "blank line"))
                continue
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                problems.append(Problem("malformed_json", ln, f"malformed JSON at column {e.colno}: {e.msg}"))
                continue
            if not isinstance(obj, dict):
                problems.append(Problem("not_an_object", ln, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            miss = [k for k in required if k not in obj]
            if miss:
                problems.append(Problem("missing_field", ln, f"missing field(s) {miss}; record has {sorted(obj)[:10]}"))
                continue
            t = obj[field]
            if not isinstance(t, str):
                problems.append(Problem("bad_field_type", ln, f"field {field!r} is {type(t).__name__}, expected a string"))
                continue
            if not t.strip():
                problems.append(Problem(EMPTY, ln, "empty document"))
                continue
            texts.append(t)
            lines.append(ln)
    try:
        ids = _encode(texts)
    except Exception:  # noqa: BLE001 - e.g. lone surrogates from "\ud800" escapes
        ids, keep_t, keep_l = [], [], []
        for t, ln in zip(texts, lines):
            try:
                ids.append(_encode([t])[0])
                keep_t.append(t)
                keep_l.append(ln)
            except Exception as e:  # noqa: BLE001
                problems.append(Problem("invalid_utf8", ln, f"text cannot be encoded as UTF-8: {e}"))
        lines = keep_l
    eod, bos, dtype = _W["eod"], _W["bos"], _W["dtype"]
    extra = 1 + (bos is not None)
    lengths = np.fromiter((len(x) + extra for x in ids), dtype=np.int64, count=len(ids))
    out = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for x in ids:
        if bos is not None:
            out[pos] = bos
            pos += 1
        n = len(x)
        out[pos:pos + n] = x
        out[pos + n] = eod
        pos += n + 1
    problems.sort(key=lambda p: p.line)
    return out, lengths, np.asarray(lines, dtype=np.int64), problems, n_records
