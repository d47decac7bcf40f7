"""A recall training mixture as Megatron IndexedDatasets: MQAR and needle-in-a-haystack
documents (megatron_ham.eval.recall's generators, the ones ham-eval scores) interleaved with
filler documents, one EOD after each document, packed into fixed-length samples by ham-train
exactly as pretraining text is.

    python -m data_prep.recall_mixture --out runs/data/recall --vocab-size 8000 --eod-id 0 \\
        --train-tokens 20M --heldout-tokens 1M --seed 1 --heldout-seed 2

Outputs (in --out; every file written under a temporary name and renamed when complete, the
manifest last, so a killed job leaves nothing that looks finished):
  train.bin/.idx      documents from --seed           (what ham-train reads: blend.json)
  heldout.bin/.idx    documents from --heldout-seed   (held-out loss: ham-eval --data OUT/heldout)
  blend.json          the training blend, in ham-prep-data's format (prefix, weight, vocab_size,
                      eod_id, tokenizer): `data.blend` of a recipe
  heldout.json        the same for the held-out split
  recall_mixture.json the settings, per-split counts (documents, tokens, answer tokens per task)
                      and the example-seed ranges
A second run with the same settings finds the manifest and does nothing.

Determinism and held-out guarantee: document i of a split is a function of (split seed, i)
only: its kind, length and sizes come from numpy's PCG64 seeded with (split seed, i), and a
recall document is generate(task, length, 2^41 + split_seed * 2^32 + i, ...). ham-eval's
examples use seeds eval_seed * 1000003 + j < 2^41 for any eval seed < 2.19M, so no evaluation
example is ever a training (or held-out) document, and train and held-out documents differ
because their split seeds do.

Token ids follow ham-eval's TokenSpace(vocab_size, exclude=(eod_id,)): the markers QUERY,
NEEDLE, SEP are the three highest ids, so --vocab-size must be the model's vocab_size.
Filler: random content ids, or real text from an IndexedDataset (--text, e.g. the sample
corpus prepared by ham-prep-data), with the EOD and the markers dropped.
Exit codes: 0 ok (or already complete), 2 bad arguments. See docs/data.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

SEED_BASE = 1 << 41  # example seeds of the mixture: SEED_BASE + split_seed * 2^32 + i
MAX_SPLIT_SEED = (1 << 20) - 1
KINDS = ("mqar", "niah_single", "niah_multikey", "niah_multivalue", "filler")
MASK_SUFFIX = "_loss_mask"  # --loss-mask: OUT/train_loss_mask.bin/.idx (uint8, 1 = answer token)
PAD = "pad"  # --seq-length: random (or text) ids + EOD filling the end of a row
SCHEMA = "megatron-ham-recall-mixture/1"


@dataclass(frozen=True)
class MixtureSpec:
    """What a mixture is made of (everything a document depends on besides its seed)."""

    vocab_size: int
    eod_id: int
    mix: Tuple[Tuple[str, float], ...]  # (kind, weight)
    lengths: Tuple[int, ...]  # document lengths (EOD excluded), drawn uniformly
    num_pairs: Tuple[int, ...]  # mqar pairs, drawn uniformly
    num_needles: Tuple[int, ...]  # niah_multikey / multivalue needles, drawn uniformly
    key_len: int
    value_len: int
    haystack: str  # "random" | "text" | "mix" (half of the recall documents each)
    text: Tuple[str, ...]  # IndexedDataset prefixes of real text
    seq_length: int = 0  # > 0: documents packed whole into rows of exactly this many tokens
    loss_mask: bool = False  # also write a per-token answer mask (uint8) next to each split

    def kinds_and_weights(self) -> Tuple[List[str], np.ndarray]:
        names = [k for k, _ in self.mix]
        w = np.array([w for _, w in self.mix], dtype=np.float64)
        return names, w / w.sum()


@dataclass(frozen=True)
class DocPlan:
    """Document i of a split: its kind, length, sizes, haystack source and generator seed."""

    index: int
    kind: str
    length: int
    params: Tuple[Tuple[str, int], ...]
    text: int  # index into spec.text, or -1 for random tokens
    seed: int


def example_seed(split_seed: int, i: int) -> int:
    return SEED_BASE + split_seed * (1 << 32) + i


def plan_document(spec: MixtureSpec, split_seed: int, i: int) -> DocPlan:
    """The plan of document i (a function of (spec, split_seed, i) only)."""
    from megatron_ham.eval.recall import min_length

    rng = np.random.default_rng(np.random.SeedSequence([split_seed, i, 0x4D495854]))
    names, w = spec.kinds_and_weights()
    kind = names[int(rng.choice(len(names), p=w))]
    length = int(spec.lengths[int(rng.integers(len(spec.lengths)))])
    params: Dict[str, int] = {}
    if kind == "mqar":
        params["num_pairs"] = int(spec.num_pairs[int(rng.integers(len(spec.num_pairs)))])
    elif kind in ("niah_multikey", "niah_multivalue"):
        params["num_needles"] = int(spec.num_needles[int(rng.integers(len(spec.num_needles)))])
    if kind.startswith("niah"):
        params.update(key_len=spec.key_len, value_len=spec.value_len)
    if kind != "filler":
        length = max(length, min_length(kind, **params))
    use_text = {"random": False, "text": True, "mix": bool(rng.integers(2))}[spec.haystack]
    if kind == "filler":
        use_text = bool(spec.text)
    text = int(rng.integers(len(spec.text))) if use_text and spec.text else -1
    return DocPlan(i, kind, length, tuple(sorted(params.items())), text, example_seed(split_seed, i))


# ----------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _init_worker(spec: MixtureSpec) -> None:
    from megatron_ham.eval.recall import TextHaystack, TokenSpace

    _WORKER["spec"] = spec
    _WORKER["space"] = TokenSpace(spec.vocab_size, exclude=(spec.eod_id,))
    _WORKER["text"] = [TextHaystack(p) for p in spec.text]


def make_document(plan: DocPlan) -> Tuple[np.ndarray, np.ndarray]:
    """(tokens int64 [length + 1] ending with the EOD, answer mask bool [length + 1]) of a
    planned document."""
    from megatron_ham.eval.recall import generate

    spec, space = _WORKER["spec"], _WORKER["space"]
    hay = _WORKER["text"][plan.text] if plan.text >= 0 else None
    if plan.kind in ("filler", PAD):
        salt = 0x46494C4C if plan.kind == "filler" else 0x50414444
        rng = np.random.default_rng(np.random.SeedSequence([plan.seed, salt]))
        if plan.length == 0:
            tokens = np.zeros(0, dtype=np.int64)
        elif hay is not None:
            forbidden = np.array(sorted(set(space.markers.values()) | {spec.eod_id}), dtype=np.int64)
            tokens = hay.take(plan.length, rng, forbidden)
        else:
            tokens = rng.choice(space.content, size=plan.length, replace=True)
        answers = np.zeros(plan.length, dtype=bool)
    else:
        ex = generate(plan.kind, plan.length, plan.seed, space, haystack=hay, **dict(plan.params))
        tokens, answers = ex.tokens, ex.answer_mask
    return np.concatenate([np.asarray(tokens, dtype=np.int64), [spec.eod_id]]), np.append(answers, False)


def _make_chunk(rows: Sequence[Sequence[DocPlan]]):
    """[(row tokens, row answer mask, [(kind, tokens, answer tokens) per document])] of rows."""
    out = []
    for row in rows:
        docs = [(p.kind, *make_document(p)) for p in row]
        out.append((np.concatenate([d[1] for d in docs]), np.concatenate([d[2] for d in docs]),
                    [(k, d.size, int(a.sum())) for k, d, a in docs]))
    return out


# ----------------------------------------------------------------------------- writing
def plan_split(spec: MixtureSpec, split_seed: int, tokens: int) -> List[List[DocPlan]]:
    """The split's rows (one IndexedDataset sequence each), planned until `tokens` tokens (EODs
    included). Without spec.seq_length a row is one document. With it, documents 0, 1, ... are
    packed whole into rows of exactly seq_length tokens; where the next document does not fit,
    the row ends with a PAD document (random ids, or text with --text, and its EOD).

    Why: ham-train's GPTDataset cuts the concatenated sequences into samples of seq_length + 1
    tokens at a stride of seq_length, so a document that crosses a sample boundary is cut in
    two, and the model sees each part alone (each sample starts afresh): an MQAR document cut
    after its pairs keeps queries nothing in the sample answers. With rows of exactly
    seq_length tokens every sample is one row plus the next row's first token as its last label."""
    S = spec.seq_length
    rows: List[List[DocPlan]] = []
    row: List[DocPlan] = []
    total = used = i = 0

    def pad(seed_of: DocPlan, n: int) -> DocPlan:  # n tokens: n - 1 ids and the EOD
        return DocPlan(seed_of.index, PAD, n - 1, (), 0 if spec.text else -1, seed_of.seed)

    while total < tokens:
        p = plan_document(spec, split_seed, i)
        i += 1
        if S <= 0:
            rows.append([p])
            total += p.length + 1
            continue
        if used + p.length + 1 > S:
            rows.append(row + ([pad(p, S - used)] if used < S else []))
            total += S
            row, used = [], 0
        row.append(p)
        used += p.length + 1
    if row:
        rows.append(row + ([pad(row[-1], S - used)] if used < S else []))
    return rows


def write_split(spec: MixtureSpec, rows: List[List[DocPlan]], prefix: str, workers: int, desc: str,
                progress: bool = True) -> dict:
    """Generate the planned rows (in order, `workers` processes) into the IndexedDataset
    `prefix`, one sequence per row (.bin/.idx renamed into place when complete). Returns the
    split's counts."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    dtype = np.uint16 if spec.vocab_size < 65500 else np.int32
    tmp, mtmp = prefix + ".tmp", prefix + MASK_SUFFIX + ".tmp"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    mask_builder = IndexedDatasetBuilder(mtmp + ".bin", dtype=np.uint8) if spec.loss_mask else None
    counts = {k: {"documents": 0, "tokens": 0, "answer_tokens": 0} for k in (*KINDS, PAD)}
    chunks = [rows[i:i + 64] for i in range(0, len(rows), 64)]
    total = sum(p.length + 1 for row in rows for p in row)
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True)
    try:
        if workers > 1:
            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(spec,))
            results = pool.imap(_make_chunk, chunks)
        else:
            pool = None
            _init_worker(spec)
            results = map(_make_chunk, chunks)
        for chunk in results:
            for tokens, mask, docs in chunk:
                builder.add_document(tokens.astype(dtype), [tokens.size])
                if mask_builder is not None:
                    mask_builder.add_document(mask.astype(np.uint8), [mask.size])
                for kind, size, answers in docs:
                    c = counts[kind]
                    c["documents"] += 1
                    c["tokens"] += int(size)
                    c["answer_tokens"] += answers
                bar.update(tokens.size)
        if pool is not None:
            pool.close()
            pool.join()
        builder.finalize(tmp + ".idx")
        if mask_builder is not None:
            mask_builder.finalize(mtmp + ".idx")
    except BaseException:
        for t in (tmp, mtmp):
            for ext in (".bin", ".idx"):
                if os.path.exists(t + ext):
                    os.remove(t + ext)
        raise
    finally:
        bar.close()
    if mask_builder is not None:
        os.replace(mtmp + ".bin", prefix + MASK_SUFFIX + ".bin")
        os.replace(mtmp + ".idx", prefix + MASK_SUFFIX + ".idx")
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
    return {"documents": sum(len(r) for r in rows), "sequences": len(rows), "tokens": total,
            "by_kind": {k: v for k, v in counts.items() if v["documents"]}}


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _blend(out: str, name: str, counts: dict, spec: MixtureSpec, tokenizer: Optional[str]) -> dict:
    entry = {"prefix": os.path.abspath(os.path.join(out, name)), "weight": 1.0,
             "relative_prefix": name, "name": f"recall_{name}",
             "documents": counts["sequences"], "tokens": counts["tokens"]}
    if spec.loss_mask:  # what a recipe's `data.loss_mask: blend` reads
        entry.update(loss_mask=entry["prefix"] + MASK_SUFFIX, relative_loss_mask=name + MASK_SUFFIX)
    return {"blend": [entry],
            "tokenizer": tokenizer, "vocab_size": spec.vocab_size, "eod_id": spec.eod_id,
            "dtype": "uint16" if spec.vocab_size < 65500 else "int32"}


def build(out: str, spec: MixtureSpec, *, seed: int, heldout_seed: int, train_tokens: int,
          heldout_tokens: int, workers: int = 1, tokenizer: Optional[str] = None,
          progress: bool = True) -> dict:
    """Write the mixture into `out` (see the module docstring); returns the manifest. Does
    nothing when `out` already holds a complete mixture with exactly these settings."""
    settings = {"spec": asdict(spec), "seed": seed, "heldout_seed": heldout_seed,
                "train_tokens": train_tokens, "heldout_tokens": heldout_tokens, "tokenizer": tokenizer}
    mpath = os.path.join(out, "recall_mixture.json")
    if os.path.isfile(mpath):
        try:
            old = json.load(open(mpath, encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("settings") == json.loads(json.dumps(settings)):
            return old
        os.remove(mpath)  # other settings: rebuilt below (the manifest goes last)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    splits = {}
    for name, s, n in (("train", seed, train_tokens), ("heldout", heldout_seed, heldout_tokens)):
        rows = plan_split(spec, s, n)
        counts = write_split(spec, rows, os.path.join(out, name), workers, name, progress)
        counts["example_seeds"] = [example_seed(s, 0), rows[-1][-1].seed]
        splits[name] = counts
    _atomic_json(os.path.join(out, "blend.json"), _blend(out, "train", splits["train"], spec, tokenizer))
    _atomic_json(os.path.join(out, "heldout.json"), _blend(out, "heldout", splits["heldout"], spec, tokenizer))
    manifest = {"schema": SCHEMA, "settings": settings, "splits": splits,
                "elapsed_s": round(time.time() - t0, 2),
                "note": "example seeds are >= 2^41: disjoint from ham-eval's (eval_seed * 1000003 + j)"}
    _atomic_json(mpath, manifest)
    return json.loads(json.dumps(manifest))


# ----------------------------------------------------------------------------- CLI
def _count(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9}
    try:
        v = float(t[:-1]) * mult[t[-1]] if t and t[-1] in mult else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count like 20M or 500000, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"a token count must be >= 1, got {text!r}")
    return int(v)


def _ints(text: str) -> Tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return vals


def _mix(text: str) -> Tuple[Tuple[str, float], ...]:
    out = []
    for part in text.split(","):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"--mix: expected KIND=WEIGHT, got {part!r}")
        k, w = part.split("=", 1)
        k = k.strip()
        if k not in KINDS:
            raise argparse.ArgumentTypeError(f"--mix: unknown kind {k!r} (valid: {', '.join(KINDS)})")
        try:
            wv = float(w)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--mix: weight of {k} is not a number: {w!r}") from None
        if wv < 0:
            raise argparse.ArgumentTypeError(f"--mix: weight of {k} must be >= 0")
        if wv > 0:
            out.append((k, wv))
    if not out:
        raise argparse.ArgumentTypeError("--mix: no kind with a positive weight")
    return tuple(out)


def _text_prefixes(values: Sequence[str]) -> Tuple[str, ...]:
    """IndexedDataset prefixes from --text values (prefixes or ham-prep-data blend files)."""
    out: List[str] = []
    for v in values:
        if v.endswith(".json") and os.path.isfile(v):
            from megatron_ham.training.data import read_blend

            out += read_blend(v)[0]
        elif os.path.isfile(v + ".idx") and os.path.isfile(v + ".bin"):
            out.append(os.path.abspath(v))
        else:
            raise ValueError(f"--text {v}: neither a blend file nor an IndexedDataset prefix ({v}.idx/.bin)")
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.recall_mixture",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 2)[2].split("Exit codes")[0],
        epilog="examples:\n"
               "  # random-token filler, the sample tokenizer's vocabulary (8000, EOD 0)\n"
               "  python -m data_prep.recall_mixture --out runs/data/recall --vocab-size 8000 --eod-id 0\n"
               "  # real-text haystacks and filler from the sample corpus (ham-prep-data --manifest sample first)\n"
               "  python -m data_prep.recall_mixture --out runs/data/recall-text --vocab-size 8000 --eod-id 0 \\\n"
               "      --text runs/data/sample/blend.json --haystack mix --train-tokens 20M --workers 8\n"
               "Exit codes: 0 ok (or already complete), 2 bad arguments.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab-size", type=int, required=True, help="the model's vocab_size (markers are its top ids)")
    p.add_argument("--eod-id", type=int, required=True, help="the EOD id (never inside a document)")
    p.add_argument("--tokenizer", help="recorded in the blend files (e.g. data_prep/sample/tokenizer)")
    p.add_argument("--train-tokens", type=_count, default=_count("20M"), help="training tokens (20M)")
    p.add_argument("--heldout-tokens", type=_count, default=_count("1M"), help="held-out tokens (1M)")
    p.add_argument("--seed", type=int, default=1, help="training split seed (1)")
    p.add_argument("--heldout-seed", type=int, default=2, help="held-out split seed (2; != --seed)")
    p.add_argument("--mix", type=_mix, default=_mix("mqar=0.4,niah_single=0.1,niah_multikey=0.15,"
                                                  "niah_multivalue=0.1,filler=0.25"),
                   help="document kinds and weights (default mqar=0.4,niah_single=0.1,"
                        "niah_multikey=0.15,niah_multivalue=0.1,filler=0.25)")
    p.add_argument("--lengths", type=_ints, default=(512, 1024, 2048, 4096),
                   help="document lengths, drawn uniformly (512,1024,2048,4096)")
    p.add_argument("--num-pairs", type=_ints, default=(8, 16, 32, 64), help="mqar pairs (8,16,32,64)")
    p.add_argument("--num-needles", type=_ints, default=(2, 4, 8), help="multikey/multivalue needles (2,4,8)")
    p.add_argument("--key-len", type=int, default=2, help="needle key tokens (2, as ham-eval)")
    p.add_argument("--value-len", type=int, default=3, help="needle value tokens (3, as ham-eval)")
    p.add_argument("--haystack", choices=("random", "text", "mix"), default="random",
                   help="haystack of recall documents: random ids, --text, or half each (random)")
    p.add_argument("--text", action="append", default=[], metavar="PREFIX_OR_BLEND",
                   help="real text for haystacks and filler (IndexedDataset prefix or blend.json; repeatable)")
    p.add_argument("--seq-length", type=int, default=0, metavar="S",
                   help="the recipe's model.seq_length: pack whole documents into rows of exactly S "
                        "tokens (the rest of a row: random/text ids + EOD), so that ham-train's "
                        "samples never cut a document (a cut MQAR document keeps queries without "
                        "their pairs). Every --lengths value must be < S. Default 0: one document "
                        "per sequence, cut wherever ham-train's samples cross it (not recommended)")
    p.add_argument("--loss-mask", action="store_true",
                   help="also write OUT/{train,heldout}_loss_mask (uint8 IndexedDatasets, 1 at the "
                        "answer tokens) and name them in the blend files: a recipe with "
                        "`data.loss_mask: blend` then trains on the answers only")
    p.add_argument("--workers", type=int, default=1, help="generator processes (1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args) -> dict:
    """Build the mixture for parsed arguments (build_parser); returns the manifest. Raises
    ValueError naming the argument for bad input."""
    if not 0 <= args.seed <= MAX_SPLIT_SEED or not 0 <= args.heldout_seed <= MAX_SPLIT_SEED:
        raise ValueError(f"--seed / --heldout-seed must be in [0, {MAX_SPLIT_SEED}]")
    if args.seed == args.heldout_seed:
        raise ValueError(f"--heldout-seed must differ from --seed ({args.seed}): held-out documents "
                         "would repeat training ones")
    if args.workers < 1 or args.key_len < 1 or args.value_len < 1:
        raise ValueError("--workers, --key-len and --value-len must be >= 1")
    if args.seq_length < 0 or 0 < args.seq_length <= max(args.lengths):
        raise ValueError(f"--seq-length {args.seq_length}: a row must hold the longest document "
                         f"({max(args.lengths)} tokens of --lengths) and its EOD: needs >= "
                         f"{max(args.lengths) + 1} (or 0: no packing)")
    if not 0 <= args.eod_id < args.vocab_size:
        raise ValueError(f"--eod-id {args.eod_id} is outside the vocabulary [0, {args.vocab_size})")
    text = _text_prefixes(args.text)
    if args.haystack != "random" and not text:
        raise ValueError(f"--haystack {args.haystack} needs --text")
    spec = MixtureSpec(args.vocab_size, args.eod_id, args.mix, args.lengths, args.num_pairs,
                       args.num_needles, args.key_len, args.value_len, args.haystack, text,
                       args.seq_length, args.loss_mask)
    from megatron_ham.eval.recall import TokenSpace, min_length

    TokenSpace(spec.vocab_size, exclude=(spec.eod_id,))
    for k, _ in spec.mix:  # the largest sizes must fit the longest length
        if k == "filler":
            continue
        big = {"mqar": {"num_pairs": max(spec.num_pairs)}}.get(
            k, {"key_len": spec.key_len, "value_len": spec.value_len,
                **({} if k == "niah_single" else {"num_needles": max(spec.num_needles)})})
        need = min_length(k, **big)
        if need > max(spec.lengths):
            raise ValueError(f"--lengths: {k} with {big} needs {need} tokens, above the longest "
                             f"length {max(spec.lengths)}")
    return build(args.out, spec, seed=args.seed, heldout_seed=args.heldout_seed,
                 train_tokens=args.train_tokens, heldout_tokens=args.heldout_tokens,
                 workers=args.workers, tokenizer=args.tokenizer, progress=not args.no_progress)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    try:
        manifest = run(args)
    except ValueError as e:
        print(f"recall_mixture: error: {e}", file=sys.stderr)
        return 2
    for name, c in manifest["splits"].items():
        kinds = ", ".join(f"{k} {v['documents']}" for k, v in c["by_kind"].items())
        print(f"{name}: {c['documents']} documents, {c['tokens']} tokens ({kinds})")
    print(f"wrote {os.path.join(args.out, 'blend.json')} (train) and heldout.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
