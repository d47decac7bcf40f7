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
import stat
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import numpy as np
import zstandard

READ_CHUNK = 1 << 18
# compressed bytes per decompress call: a zstd block of >= 4 bytes inflates to <= 128 KiB, so
# one call returns <= 32 MiB whatever the file holds (a "zstd bomb" stays bounded)
ZSTD_PIECE = 1 << 10
# longest record (jsonl line / parquet text, bytes) tokenized; a longer one is `record_too_large`.
# Tokenizing costs up to ~225 bytes of memory per input byte (measured: 1-char pre-tokens, the
# worst case; ~140 for English prose), so 8 MiB keeps a worker's peak at about 2 GB
DEFAULT_MAX_RECORD_BYTES = 8 << 20
ENCODE_GROUP_BYTES = 1 << 20  # texts handed to the tokenizer per call (bounds its working memory)

# Problems a record can have. "structural" ones fail the run under --on-error fail.
STRUCTURAL = ("malformed_json", "missing_field", "invalid_utf8", "truncated_zstd", "not_an_object",
              "bad_field_type", "unreadable_file", "record_too_large")
EMPTY = "empty_document"
TOO_LARGE = "record_too_large"


class DataError(Exception):
    """Bad input under --on-error fail; the message names file and line."""


@dataclass
class Problem:
    kind: str
    line: int                # 1-based line / parquet row; 0 for the whole file
    message: str


@dataclass
class Block:
    first_line: int          # 1-based line (or parquet row) number of the first record
    data: object             # bytes (jsonl: lines joined by b"\n") or list of str/None (parquet)
    pos: int                 # bytes of the *input file* consumed so far (for progress / sampling)
    decoded: int = 0         # decompressed bytes read so far (>= the bytes handed out in blocks)
    problems: List[Problem] = field(default_factory=list)  # reader problems before first_line


def file_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be read as a data file (None when it can): a dangling symbolic link,
    a directory, a FIFO / device (reading one could block or never end), no read permission."""
    try:
        st = os.stat(path)
    except OSError as e:
        if os.path.islink(path):
            return f"dangling symbolic link (-> {os.readlink(path)}): {e.strerror}"
        return f"cannot be opened: {e.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a data file"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file (FIFO, socket or device)"
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    return None


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
    """Stream-decode a (possibly multi-frame) zstd file into chunks of about READ_CHUNK bytes and
    at most READ_CHUNK + 32 MiB (ZSTD_PIECE bounds what one decompress call returns); a stream
    that ends inside a frame appends a ``truncated_zstd`` problem instead of silently returning
    short data."""
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    in_frame = False
    outs, n_out = [], 0
    for chunk, end in _raw_chunks(path):
        start = end - len(chunk)
        for i in range(0, len(chunk), ZSTD_PIECE):
            piece = chunk[i:i + ZSTD_PIECE]
            while piece:
                try:
                    out = dobj.decompress(piece)
                except zstandard.ZstdError as e:
                    if outs:
                        yield b"".join(outs), start + i
                    problems.append(Problem("truncated_zstd", line_of(), f"corrupt zstd data: {e}"))
                    return
                in_frame = not dobj.eof
                if out:
                    outs.append(out)
                    n_out += len(out)
                if dobj.eof:
                    piece = dobj.unused_data
                    dobj = dctx.decompressobj()
                    in_frame = bool(piece)
                else:
                    piece = b""
            if n_out >= READ_CHUNK:
                yield b"".join(outs), min(start + i + ZSTD_PIECE, end)
                outs, n_out = [], 0
    if outs:
        yield b"".join(outs), end
    if in_frame:
        problems.append(Problem("truncated_zstd", line_of(),
                                "zstd stream ends inside a frame (truncated file?); "
                                "the incomplete last line is dropped"))


def _too_large(line: int, size: int, limit: int) -> Problem:
    what = f"{size} bytes" if size else f"more than {limit} bytes"
    return Problem(TOO_LARGE, line, f"record of {what} is longer than --max-record-bytes {limit}")


def iter_blocks(path: str, batch_bytes: int, problems: List[Problem], text_field: str = "text",
                max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[Block]:
    """Blocks of whole records from ``path``; reader-level problems go to ``problems``.

    Memory stays bounded whatever the file holds: decompression returns at most 32 MiB per
    call, and a line that grows past ``max_record_bytes`` before its newline is dropped while
    it is read (an empty Block carrying its ``record_too_large`` problem is yielded at once,
    so ``--on-error fail`` stops early); the rest of the line is read and discarded. Complete
    lines up to ``max_record_bytes`` + one read chunk long can reach a block; ``process_block``
    refuses those longer than the limit. Block boundaries depend on the content, ``batch_bytes``
    and, around over-long lines, the fixed read sizes; the tokens written do not depend on them.
    """
    if path.endswith(".parquet"):
        yield from _parquet_blocks(path, batch_bytes, problems, text_field, max_record_bytes)
        return
    buf = bytearray()
    first = 1            # line number of buf[0]
    start = 0            # where the last (incomplete) line of buf starts
    skip = 0             # line number of an over-long line being discarded (0: none)
    if path.endswith(".zst"):
        chunks = _decompressed_chunks(path, problems, lambda: skip or first + buf.count(b"\n"))
    else:
        chunks = _raw_chunks(path)
    pos = decoded = 0
    try:
        for data, pos in chunks:
            decoded += len(data)
            if skip:
                nl = data.find(b"\n")
                if nl < 0:
                    continue
                first, skip = skip + 1, 0
                data = data[nl + 1:]
            nl = data.rfind(b"\n")
            if nl >= 0:
                start = len(buf) + nl + 1
            buf += data
            # cut blocks of whole lines at the first newline at/after batch_bytes: the boundaries
            # depend on the content and batch_bytes only (not on read sizes or worker counts)
            while len(buf) >= batch_bytes:
                cut = buf.find(b"\n", batch_bytes - 1)
                if cut < 0:
                    break
                block = bytes(buf[: cut + 1])
                del buf[: cut + 1]
                start -= cut + 1
                yield Block(first, block, pos, decoded)
                first += block.count(b"\n")
            if len(buf) - start > max_record_bytes:
                if start:  # the complete lines before it, so that line numbers stay contiguous
                    block = bytes(buf[:start])
                    yield Block(first, block, pos, decoded)
                    first += block.count(b"\n")
                skip, start = first, 0
                buf.clear()
                yield Block(skip, b"", pos, decoded, [_too_large(skip, 0, max_record_bytes)])
    except OSError as e:  # e.g. an I/O error or a file removed while it is read
        problems.append(Problem("unreadable_file", skip or first + buf.count(b"\n"), f"read error: {e}"))
        return
    if any(p.kind == "truncated_zstd" for p in problems):
        del buf[start:]  # drop the incomplete last line
    if buf:
        if not buf.endswith(b"\n"):
            buf += b"\n"
        yield Block(first, bytes(buf), os.path.getsize(path), decoded)


def _text_too_large(t: str, limit: int) -> bool:
    """UTF-8 length of ``t`` > limit, without encoding short strings (<= 4 bytes per char)."""
    return len(t) > limit or (len(t) * 4 > limit and len(t.encode("utf-8", "surrogatepass")) > limit)


def _parquet_blocks(path, batch_bytes, problems, text_field, max_record_bytes):
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types
        problems.append(Problem("unreadable_file", 0, f"cannot open parquet file: {e}"))
        return
    if text_field not in pf.schema_arrow.names:
        problems.append(Problem("missing_field", 1, f"parquet column {text_field!r} not found; "
                                f"columns: {pf.schema_arrow.names}"))
        return
    col_idx = pf.schema_arrow.names.index(text_field)
    size = os.path.getsize(path)
    row = 1
    pending, nbytes, first = [], 0, 1
    for rg in range(pf.num_row_groups):
        # rows per decoded batch from the column's uncompressed size: about batch_bytes of text
        meta = pf.metadata.row_group(rg)
        per_row = meta.column(col_idx).total_uncompressed_size / max(1, meta.num_rows) if \
            col_idx < meta.num_columns else 1
        rows = int(min(1024, max(1, batch_bytes // max(1.0, per_row))))
        for batch in pf.iter_batches(batch_size=rows, row_groups=[rg], columns=[text_field]):
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
                required: List[str], max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                die_with_parent: bool = True) -> None:
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
              text_field=text_field, required=required, max_record=max_record_bytes)


def _encode(texts: List[str]) -> List[List[int]]:
    tok = _W["tok"]
    fast = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: ~2x faster
    return [e.ids for e in fast(texts, add_special_tokens=False)]


def _encode_docs(texts: List[str], lines: List[int], problems: List[Problem]):
    """Token ids of each text (arrays of the output dtype) and the lines kept, tokenizing at most
    ENCODE_GROUP_BYTES of text (or one longer text) per call so the tokenizer's working memory
    (~100-225 bytes per input byte) stays bounded; texts the tokenizer refuses (lone surrogates
    from "\\ud800" escapes) become ``invalid_utf8`` problems."""
    dtype = _W["dtype"]
    ids: List[np.ndarray] = []
    kept: List[int] = []
    i = 0
    while i < len(texts):
        j, size = i + 1, len(texts[i])
        while j < len(texts) and size + len(texts[j]) <= ENCODE_GROUP_BYTES:
            size += len(texts[j])
            j += 1
        try:
            ids += [np.asarray(x, dtype=dtype) for x in _encode(texts[i:j])]
            kept += lines[i:j]
        except Exception:  # noqa: BLE001 - retry one by one to find the text at fault
            for t, ln in zip(texts[i:j], lines[i:j]):
                try:
                    ids.append(np.asarray(_encode([t])[0], dtype=dtype))
                    kept.append(ln)
                except Exception as e:  # noqa: BLE001
                    problems.append(Problem("invalid_utf8", ln, f"text cannot be encoded as UTF-8: {e}"))
        i = j
    return ids, kept


def _parse_line(raw: bytes, ln: int, field: str, required: List[str], problems: List[Problem]):
    """The text of one jsonl record, or None after appending its problem."""
    if len(raw) > _W["max_record"]:
        problems.append(_too_large(ln, len(raw), _W["max_record"]))
        return None
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append(Problem("invalid_utf8", ln, f"invalid UTF-8 at byte {e.start}: {e.reason}"))
        return None
    if not s.strip():
        problems.append(Problem(EMPTY, ln, "blank line"))
        return None
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        problems.append(Problem("malformed_json", ln, f"malformed JSON at column {e.colno}: {e.msg}"))
        return None
    if not isinstance(obj, dict):
        problems.append(Problem("not_an_object", ln, f"expected a JSON object, got {type(obj).__name__}"))
        return None
    miss = [k for k in required if k not in obj]
    if miss:
        problems.append(Problem("missing_field", ln, f"missing field(s) {miss}; record has {sorted(obj)[:10]}"))
        return None
    return _check_text(obj[field], ln, field, problems)


def _check_text(t, ln: int, field: str, problems: List[Problem]):
    """``t`` when it is a non-empty string within the record limit, else None (problem appended)."""
    if t is None:
        problems.append(Problem("missing_field", ln, f"field {field!r} is null"))
    elif not isinstance(t, str):
        problems.append(Problem("bad_field_type", ln, f"field {field!r} is {type(t).__name__}, expected a string"))
    elif not t.strip():
        problems.append(Problem(EMPTY, ln, "empty document"))
    elif _text_too_large(t, _W["max_record"]):
        problems.append(_too_large(ln, len(t.encode("utf-8", "surrogatepass")), _W["max_record"]))
    else:
        return t
    return None


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
        records = [(block.first_line + i, _check_text(t, block.first_line + i, field, problems))
                   for i, t in enumerate(block.data)]
    else:
        raw_lines = block.data.split(b"\n")
        if raw_lines and raw_lines[-1] == b"":
            raw_lines.pop()
        records = [(block.first_line + i, _parse_line(raw, block.first_line + i, field, required, problems))
                   for i, raw in enumerate(raw_lines)]
        del raw_lines
    n_records = len(records)
    for ln, t in records:
        if t is not None:
            texts.append(t)
            lines.append(ln)
    del records
    ids, lines = _encode_docs(texts, lines, problems)
    del texts
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
