"""Synthetic recall tasks, generated on the fly from a seed (no downloads).

    ex = generate("niah_single", 4096, seed=0, vocab=TokenSpace(32000, exclude=(2,)))
    ex.tokens       int64 [length]   the whole example (context, needles, query, answers)
    ex.answer_mask  bool  [length]   True at the answer tokens: the model must predict
                                     tokens[i] from tokens[:i] (teacher forcing)
    ex.info         dict             task, length, seed, key/value ids, spans (see below)

The same call with the same arguments gives the same example (numpy PCG64 seeded with
(seed, task, length)). Examples serve both evaluation (ham-eval scores argmax(logits[i-1]) ==
tokens[i] on answer_mask) and training (write `tokens` + EOD as a document; `answer_mask` is a
ready loss mask for recall-only supervision).

Token-id conventions (TokenSpace; all ids < vocab_size):
  - `exclude`: ids never emitted: the EOD (an EOD inside an example would restart the model's
    state), padding, BOS.
  - markers: the 3 highest non-excluded ids, QUERY = the highest, then NEEDLE, then SEP.
  - content ids: every other id. The key and value tokens of one example are distinct content
    ids (drawn without replacement), so every answer is unambiguous; the haystack never contains
    a marker or any of the example's key/value ids (random haystack: drawn from the remaining
    content ids; text haystack: those ids are dropped from the text).

Layouts (K = key_len, V = value_len tokens):
  mqar             k1 v1 k2 v2 ... kP vP | haystack | QUERY kq1 vq1 kq2 vq2 ...     (K = V = 1)
                   num_pairs P pairs at the start, num_queries of them asked in random order at
                   the end; answers = the v after each queried k.
  niah_single      haystack with one needle  NEEDLE k.. SEP v..  at a random depth (or `depth`),
                   then  QUERY k.. SEP  and the answer  v..  as the last tokens.
  niah_multikey    num_needles needles with distinct keys; one of them is asked.
  niah_multivalue  num_needles needles with the SAME key and distinct values; the answer is
                   every value, in the order the needles appear.
info: "keys"/"values" (lists of id lists), "needles" (list of [start, end) spans; for mqar the
pairs), "query" ([start, end) of the query block), "asked" (indices into `values` whose
values are answers), "answers" (answer ids in order), "depths" (needle positions as fractions of the haystack).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

TASKS = ("mqar", "niah_single", "niah_multikey", "niah_multivalue")
#: default sizes per task (num_pairs / num_queries for mqar, num_needles, key_len, value_len)
DEFAULTS: Dict[str, Dict[str, int]] = {
    "mqar": {"num_pairs": 16, "num_queries": 16, "key_len": 1, "value_len": 1},
    "niah_single": {"num_needles": 1, "key_len": 2, "value_len": 3},
    "niah_multikey": {"num_needles": 4, "key_len": 2, "value_len": 3},
    "niah_multivalue": {"num_needles": 4, "key_len": 2, "value_len": 3},
}
NUM_MARKERS = 3


@dataclass(frozen=True)
class TokenSpace:
    """The ids a recall example may use: [0, vocab_size) minus `exclude` (see module docstring)."""

    vocab_size: int
    exclude: Tuple[int, ...] = ()
    _allowed: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, (int, np.integer)):
            raise ValueError(f"vocab_size must be an int, got {self.vocab_size!r}")
        ex = tuple(sorted({int(i) for i in self.exclude if i is not None}))
        object.__setattr__(self, "exclude", ex)
        keep = np.ones(int(self.vocab_size), dtype=bool)
        keep[[i for i in ex if 0 <= i < self.vocab_size]] = False
        allowed = np.nonzero(keep)[0].astype(np.int64)
        if allowed.size < NUM_MARKERS + 8:
            raise ValueError(f"vocab_size {self.vocab_size} minus {len(ex)} excluded ids leaves "
                             f"{allowed.size} ids; recall tasks need at least {NUM_MARKERS + 8}")
        object.__setattr__(self, "_allowed", allowed)

    @property
    def query(self) -> int:
        return int(self._allowed[-1])

    @property
    def needle(self) -> int:
        return int(self._allowed[-2])

    @property
    def sep(self) -> int:
        return int(self._allowed[-3])

    @property
    def markers(self) -> Dict[str, int]:
        return {"query": self.query, "needle": self.needle, "sep": self.sep}

    @property
    def content(self) -> np.ndarray:
        """int64 [n] content ids (sorted)."""
        return self._allowed[:-NUM_MARKERS]


class RecallExample(NamedTuple):
    tokens: np.ndarray  # int64 [length]
    answer_mask: np.ndarray  # bool [length]
    info: dict


class TextHaystack:
    """Haystack of real text: the token stream of an IndexedDataset (documents back to back,
    EOD and other forbidden ids dropped), read from a seeded random document and offset.

    Memory: reads only the documents it needs (the .bin is memory-mapped)."""

    def __init__(self, prefix: str):
        import os

        for ext in (".idx", ".bin"):
            if not os.path.isfile(prefix + ext):
                raise ValueError(f"haystack {prefix!r}: no IndexedDataset ({prefix}{ext} missing)")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = prefix
        self.ds = IndexedDataset(prefix)
        self.lengths = np.asarray(self.ds.sequence_lengths, dtype=np.int64)
        if len(self.ds) == 0 or int(self.lengths.sum()) == 0:
            raise ValueError(f"haystack {prefix!r}: the dataset is empty")

    def take(self, n: int, rng: np.random.Generator, forbidden: np.ndarray) -> np.ndarray:
        """int64 [n] tokens of the stream without `forbidden` ids, from a random position."""
        total = int(self.lengths.sum())
        doc = int(rng.integers(len(self.ds)))
        off = int(rng.integers(max(1, int(self.lengths[doc]))))
        out: List[np.ndarray] = []
        have, read = 0, 0
        while have < n:
            if read > total and have == 0:
                raise ValueError(f"haystack {self.prefix!r}: no usable tokens (all are excluded ids)")
            if read > 2 * total + n:  # pragma: no cover - bounded: the stream repeats
                raise ValueError(f"haystack {self.prefix!r}: too few usable tokens for {n}")
            length = int(self.lengths[doc]) - off
            if length > 0:
                chunk = np.asarray(self.ds.get(doc, offset=off, length=min(length, n - have + 4096)),
                                   dtype=np.int64)
                read += chunk.size
                chunk = chunk[~np.isin(chunk, forbidden)]
                out.append(chunk)
                have += chunk.size
            doc, off = (doc + 1) % len(self.ds), 0
        return np.concatenate(out)[:n]


def _rng(task: str, length: int, seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(task.encode()), int(length)]))


def _params(task: str, overrides: dict) -> Dict[str, int]:
    p = dict(DEFAULTS[task])
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in p:
            raise ValueError(f"{task}: unknown parameter {k!r} (valid: {', '.join(sorted(p))})")
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{task}: {k} must be a positive int, got {v!r}")
        p[k] = int(v)
    if task == "mqar":
        if p["key_len"] != 1 or p["value_len"] != 1:
            raise ValueError("mqar: keys and values are single tokens (key_len = value_len = 1)")
        if "num_queries" not in overrides or overrides.get("num_queries") is None:
            p["num_queries"] = p["num_pairs"]
        if p["num_queries"] > p["num_pairs"]:
            raise ValueError(f"mqar: num_queries {p['num_queries']} > num_pairs {p['num_pairs']} "
                             "(each pair is asked at most once)")
    if task == "niah_single":
        p["num_needles"] = 1
    elif task != "mqar" and p["num_needles"] < 2 and "num_needles" in overrides:
        raise ValueError(f"{task}: num_needles must be >= 2, got {p['num_needles']}")
    return p


def min_length(task: str, **params) -> int:
    """Smallest example length for `task` with these parameters (no haystack)."""
    if task not in TASKS:
        raise ValueError(f"unknown recall task {task!r} (valid: {', '.join(TASKS)})")
    p = _params(task, params)
    if task == "mqar":
        return 2 * p["num_pairs"] + 1 + 2 * p["num_queries"]
    n, k, v = p["num_needles"], p["key_len"], p["value_len"]
    needle = 2 + k + v
    if task == "niah_multivalue":
        return n * needle + 2 + k + n * v
    return n * needle + 2 + k + v


def _draw_ids(rng, space: TokenSpace, n: int, task: str, length: int) -> np.ndarray:
    content = space.content
    if n > content.size // 2:
        raise ValueError(f"{task} at length {length}: needs {n} distinct key/value ids but the "
                         f"vocabulary has {content.size} content ids (keep them under half)")
    return rng.choice(content, size=n, replace=False).astype(np.int64)


def _haystack(rng, space: TokenSpace, n: int, used: np.ndarray, haystack) -> np.ndarray:
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    forbidden = np.concatenate([used, np.array(sorted(space.markers.values()), dtype=np.int64),
                                np.array(space.exclude, dtype=np.int64)])
    if haystack is None:
        pool = space.content[~np.isin(space.content, used)]
        return rng.choice(pool, size=n, replace=True).astype(np.int64)
    hay = haystack.take(n, rng, forbidden)
    if int(hay.max()) >= space.vocab_size:
        raise ValueError(f"haystack {haystack.prefix!r}: token id {int(hay.max())} is outside the "
                         f"vocabulary [0, {space.vocab_size}): the text was tokenized for another model")
    return hay


def _insert(hay: np.ndarray, pieces: List[np.ndarray], at: Sequence[int]) -> Tuple[np.ndarray, List[List[int]]]:
    """hay with pieces[i] inserted before hay[at[i]] (at sorted); returns (tokens, spans)."""
    parts, spans, prev, pos = [], [], 0, 0
    for piece, a in zip(pieces, at):
        parts.append(hay[prev:a])
        pos += a - prev
        spans.append([pos, pos + piece.size])
        parts.append(piece)
        pos += piece.size
        prev = a
    parts.append(hay[prev:])
    return np.concatenate(parts), spans


def generate(task: str, length: int, seed: int, vocab: Union[int, TokenSpace], *,
             num_pairs: Optional[int] = None, num_queries: Optional[int] = None,
             num_needles: Optional[int] = None, key_len: Optional[int] = None,
             value_len: Optional[int] = None, haystack: Optional[TextHaystack] = None,
             depth: Optional[float] = None) -> RecallExample:
    """One example of `task` with exactly `length` tokens (see the module docstring).

    vocab: a TokenSpace, or the vocabulary size (then no id is excluded: pass a TokenSpace with
        the EOD excluded for models that reset at EOD).
    haystack: None = random content ids; a TextHaystack = real text.
    depth: niah_single only: the needle's position as a fraction of the haystack in [0, 1]
        (default: random).
    Raises ValueError naming the parameter when the example cannot be built.
    """
    if task not in TASKS:
        raise ValueError(f"unknown recall task {task!r} (valid: {', '.join(TASKS)})")
    space = vocab if isinstance(vocab, TokenSpace) else TokenSpace(int(vocab))
    p = _params(task, {"num_pairs": num_pairs, "num_queries": num_queries, "num_needles": num_needles,
                       "key_len": key_len, "value_len": value_len})
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)):
        raise ValueError(f"length must be an int, got {length!r}")
    need = min_length(task, **{k: v for k, v in p.items()})
    if length < need:
        raise ValueError(f"{task}: length {length} is too short for {p} (needs >= {need} tokens)")
    if depth is not None and (task != "niah_single" or not 0.0 <= float(depth) <= 1.0):
        raise ValueError(f"depth applies to niah_single only and must be in [0, 1], got {depth!r}")
    rng = _rng(task, int(length), seed)
    build = _mqar if task == "mqar" else _niah
    tokens, answer_mask, info = build(task, int(length), rng, space, p, haystack, depth)
    assert tokens.size == length and answer_mask.size == length
    info.update({"task": task, "length": int(length), "seed": int(seed), "params": p,
                 "markers": space.markers})
    return RecallExample(tokens.astype(np.int64), answer_mask, info)


def _mqar(task, length, rng, space, p, haystack, depth):
    P, Q = p["num_pairs"], p["num_queries"]
    ids = _draw_ids(rng, space, 2 * P, task, length)
    keys, values = ids[:P], ids[P:]
    pairs = np.stack([keys, values], 1).reshape(-1)  # k1 v1 k2 v2 ...
    asked = rng.permutation(P)[:Q]
    query = np.concatenate([[space.query], np.stack([keys[asked], values[asked]], 1).reshape(-1)])
    hay = _haystack(rng, space, length - pairs.size - query.size, ids, haystack)
    tokens = np.concatenate([pairs, hay, query])
    q0 = length - query.size
    mask = np.zeros(length, dtype=bool)
    mask[q0 + 2::2] = True  # the value after each queried key
    info = {"keys": [[int(k)] for k in keys], "values": [[int(v)] for v in values],
            "needles": [[2 * i, 2 * i + 2] for i in range(P)], "query": [q0, length],
            "asked": [int(i) for i in asked], "answers": [int(v) for v in values[asked]],
            "depths": [0.0]}
    return tokens, mask, info


def _niah(task, length, rng, space, p, haystack, depth):
    n, K, V = p["num_needles"], p["key_len"], p["value_len"]
    n_keys = 1 if task == "niah_multivalue" else n
    ids = _draw_ids(rng, space, n_keys * K + n * V, task, length)
    keys = ids[: n_keys * K].reshape(n_keys, K)
    values = ids[n_keys * K:].reshape(n, V)
    key_of = [0] * n if task == "niah_multivalue" else list(range(n))
    needles = [np.concatenate([[space.needle], keys[key_of[i]], [space.sep], values[i]]) for i in range(n)]
    asked = 0 if task == "niah_multivalue" else int(rng.integers(n))
    answer = values.reshape(-1) if task == "niah_multivalue" else values[asked]
    query = np.concatenate([[space.query], keys[key_of[asked]], [space.sep], answer])
    n_hay = length - sum(x.size for x in needles) - query.size
    hay = _haystack(rng, space, n_hay, ids, haystack)
    if depth is not None:
        at = [int(round(float(depth) * n_hay))]
    else:
        at = sorted(int(a) for a in rng.integers(0, n_hay + 1, size=n))
    context, spans = _insert(hay, needles, at)
    tokens = np.concatenate([context, query])
    mask = np.zeros(length, dtype=bool)
    mask[length - answer.size:] = True
    info = {"keys": keys.tolist(), "values": values.tolist(), "needles": spans,
            "query": [int(context.size), length], "asked": list(range(n)) if task == "niah_multivalue" else [asked], "answers": answer.tolist(),
            "depths": [a / max(1, n_hay) for a in at]}
    return tokens, mask, info


__all__ = ["TASKS", "DEFAULTS", "TokenSpace", "RecallExample", "TextHaystack", "generate", "min_length"]
