"""Training / validation batches with an exactly resumable sample order.

Sample order. The train dataset is a map-style sequence of fixed-length samples (Megatron's
GPTDataset is already a deterministic, seeded shuffle over documents and epochs). Step `n`
(0-based) consumes the global batch of samples [n*G, (n+1)*G) where G = global_batch_size;
inside it, micro-batch m of data-parallel rank r holds samples
    n*G + m*(mbs*dp) + r*mbs + [0, mbs)
so the order depends only on `consumed_samples`, which the checkpoint stores: a run resumed
at step k reads exactly what the uninterrupted run read at step k (independent of timing).

Batches are dicts of tensors on the training device:
    tokens [b, s] int64, labels [b, s] int64, loss_mask [b, s] float32, position_ids [b, s] int64
(b = micro_batch_size, s = model.seq_length). Validation uses the first eval_iters global
batches of the validation split, the same ones every time.

Backends (recipe `data.backend`):
  megatron   GPTDataset over the IndexedDataset prefixes/weights of a ham-prep-data blend file,
             built by BlendedMegatronDatasetBuilder (train/valid/test split by documents).
  webdataset token shards written by ham-prep-data --wds-out (see WebDatasetTokens).
  synthetic  seeded random tokens: sample i is a function of (seed, i) only (benchmarks).

Untrusted files (docs/security.md): megatron-core reads its index cache with
numpy.load(allow_pickle=True), so every `.npy` in the cache dir is checked to be a plain array
(`check_index_cache`) before the builder runs; the cache lives outside the checkpoint dir by
default (`default_cache_dir`). `pipe:` URLs (shell commands) in data.urls are refused unless the
recipe sets data.allow_pipe_urls. `check_data_paths` names a missing blend / prefix / tokenizer
/ shard (slurm/submit.sh runs it at submit time through megatron_ham.training.submit_check).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml

from .config import ConfigError, RunConfig


# ----------------------------------------------------------------------------- blend / tokenizer
def read_blend(path: str, key: str = "prefix") -> Tuple[List[str], List[float], dict]:
    """A ham-prep-data blend file -> (prefixes, weights, extra info {eod_id, vocab_size, ...}).
    key "loss_mask": each entry's loss-mask IndexedDataset instead of its tokens (data.loss_mask
    blend; `relative_loss_mask` resolves against the file's directory like `relative_prefix`)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"key 'data.blend': blend file {path!r} not found (run ham-prep-data first)") from None
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"key 'data.blend': {path}: cannot read the blend file ({e})") from None
    entries = raw["blend"] if isinstance(raw, dict) else raw
    info = {k: v for k, v in raw.items() if k != "blend"} if isinstance(raw, dict) else {}
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: expected a non-empty list of {{prefix, weight}} entries")
    base = os.path.dirname(os.path.abspath(path))
    prefixes, weights = [], []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or key not in e or "weight" not in e:
            raise ConfigError(f"{path}: blend[{i}] needs '{key}' and 'weight', got {e!r}"
                              + (" (data.loss_mask blend: write the data with a loss mask, e.g. "
                                 "recall_mixture --loss-mask)" if key != "prefix" else ""))
        p = e[key] if os.path.isabs(e[key]) else os.path.join(base, e[key])
        if not os.path.exists(p + ".idx") and f"relative_{key}" in e:
            p = os.path.join(base, e[f"relative_{key}"])
        if not (os.path.isfile(p + ".idx") and os.path.isfile(p + ".bin")):
            raise ConfigError(f"{path}: blend[{i}]: no IndexedDataset at {p}(.idx/.bin)")
        prefixes.append(p)
        weights.append(float(e["weight"]))
    return prefixes, weights, info


def tokenizer_json(path: str) -> str:
    """The tokenizer.json of `data.tokenizer` (a HF tokenizer dir or the file itself); ConfigError
    naming the key and the path when there is none."""
    tj = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(tj):
        what = "has no tokenizer.json" if os.path.isdir(path) else "no such file or directory"
        raise ConfigError(f"key 'data.tokenizer': {path}: {what} (a Hugging Face tokenizer directory "
                          "or its tokenizer.json)")
    return tj


def resolve_eod_id(cfg: RunConfig, info: Optional[dict] = None) -> int:
    """EOD id: data.eod_id, else the tokenizer's EOS, else the blend file's eod_id, else 0."""
    d = cfg.data
    if d.eod_id is not None:
        return d.eod_id
    if d.tokenizer:
        from tokenizers import Tokenizer

        tj = tokenizer_json(d.tokenizer)
        try:
            tok = Tokenizer.from_file(tj)
        except Exception as e:  # noqa: BLE001 - the Rust loader raises plain Exception
            raise ConfigError(f"key 'data.tokenizer': {tj}: not a tokenizers JSON file ({e})") from None
        for name in ("<|endoftext|>", "</s>", "<eos>", "<|eos|>"):
            i = tok.token_to_id(name)
            if i is not None:
                return int(i)
    if info and info.get("eod_id") is not None:
        return int(info["eod_id"])
    return 0


class _TokenizerInfo:
    """What GPTDataset needs of a tokenizer: ids only (the data is already tokenized)."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size = vocab_size
        self.eod = eod
        self.pad = -1  # never a real token: nothing is treated as padding
        # GPTDataset hashes the config (tokenizer included) into its index-cache file names
        self.unique_identifiers = {"class": "_TokenizerInfo", "vocab_size": vocab_size, "eod": eod}


# ----------------------------------------------------------------------------- datasets
class SyntheticTokens:
    """Seeded random samples of seq_length+1 tokens; sample i depends only on (seed, i)."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int, eod_id: int):
        self.n, self.s, self.v, self.seed, self.eod = num_samples, seq_length, vocab_size, seed, eod_id

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        text = torch.randint(0, self.v, (self.s + 1,), generator=g)
        return {"tokens": text[:-1], "labels": text[1:], "loss_mask": torch.ones(self.s)}


class WebDatasetTokens:
    """Packed token sequences from ham-prep-data's webdataset shards, as a map-style dataset.

    Each sample of the shards holds one packed sequence of seq_length+1 token ids ("tokens.npy",
    as data_prep/webdataset_io.py writes them); `data.urls` are shard paths, brace patterns or
    the --wds-out directory. The shards are read in sorted URL order once, indexed, and
    sample i is the i-th sequence (wrapping around), so resumption by consumed_samples is exact.
    Held in memory: meant for moderate shard sets; use the megatron backend for 50B tokens.
    """

    def __init__(self, urls: Sequence[str], seq_length: int, num_samples: int, allow_pipe_urls: bool = False):
        import webdataset as wds

        expanded = expand_shard_urls(urls, allow_pipe_urls)
        seqs = []
        # every rank indexes every shard (identity splitters): the sample order is global
        ds = wds.WebDataset(expanded, shardshuffle=False, empty_check=False,
                            nodesplitter=lambda s: s, workersplitter=lambda s: s)
        for sample in ds:
            arr = None
            for key, value in sorted(sample.items()):
                if key.endswith("npy") or key.endswith("tokens"):
                    try:  # never unpickle: a shard from elsewhere is data, not code
                        arr = np.load(__import__("io").BytesIO(value), allow_pickle=False) if key.endswith("npy") \
                            else np.frombuffer(value, dtype=np.int32)
                    except ValueError as e:
                        raise ConfigError(f"data.urls: {sample.get('__url__')}: sample {sample.get('__key__')!r}, "
                                          f"{key}: not a plain array ({e})") from None
                    break
            if arr is None:
                continue
            arr = np.asarray(arr, dtype=np.int64).reshape(-1)
            if arr.size < seq_length + 1:
                continue
            seqs.append(arr[: seq_length + 1])
        if not seqs:
            raise ConfigError(f"data.urls: no sequences of >= {seq_length + 1} tokens in {expanded}")
        self.seqs = seqs
        self.n = num_samples
        self.s = seq_length

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        text = torch.from_numpy(self.seqs[int(i) % len(self.seqs)].copy())
        return {"tokens": text[:-1], "labels": text[1:], "loss_mask": torch.ones(self.s)}


def _url_scheme(url: str) -> str:
    from urllib.parse import urlparse

    return urlparse(url).scheme  # what webdataset's gopen dispatches on (lower-cased)


def expand_shard_urls(urls: Sequence[str], allow_pipe_urls: bool = False) -> List[str]:
    """`data.urls` -> the shard list (a --wds-out directory -> its *.tar as absolute paths; brace
    patterns expanded). A `pipe:` URL is a shell command webdataset runs on every rank: refused
    (ConfigError naming the entry) unless the recipe sets data.allow_pipe_urls: true."""
    import glob

    import webdataset as wds

    expanded: List[str] = []
    for i, u in enumerate(urls):
        if os.path.isdir(u):  # a ham-prep-data --wds-out directory (absolute: no scheme to misread)
            expanded.extend(sorted(os.path.abspath(p) for p in glob.glob(os.path.join(u, "*.tar"))))
            continue
        for x in [u] + sorted(wds.shardlists.expand_urls(u)):
            if _url_scheme(x) == "pipe" and not allow_pipe_urls:
                raise ConfigError(
                    f"key 'data.urls[{i}]': {u!r} is a pipe: URL, i.e. a shell command that webdataset runs "
                    "on every rank; refused unless the recipe sets `data.allow_pipe_urls: true` (only for "
                    "recipes you trust; or list the shard files instead)")
        expanded.extend(sorted(wds.shardlists.expand_urls(u)))
    if not expanded:
        raise ConfigError(f"key 'data.urls': no shards match {list(urls)}")
    return expanded


def check_data_paths(cfg: RunConfig) -> None:
    """Every data path the run will open exists (blend file and its IndexedDatasets, prefixes,
    tokenizer, local webdataset shards) and data.urls holds no refused pipe: URL; ConfigError
    naming the key and the path otherwise. Cheap: reads the blend file only."""
    d = cfg.data
    if d.tokenizer:
        tokenizer_json(d.tokenizer)
    if d.backend == "megatron":
        if d.blend:
            read_blend(d.blend)
        for i, p in enumerate(d.prefixes):
            if not (os.path.isfile(p + ".idx") and os.path.isfile(p + ".bin")):
                raise ConfigError(f"key 'data.prefixes[{i}]': no IndexedDataset at {p}(.idx/.bin)")
        if d.cache_dir and os.path.exists(d.cache_dir) and not os.path.isdir(d.cache_dir):
            raise ConfigError(f"key 'data.cache_dir': {d.cache_dir}: exists and is not a directory")
    elif d.backend == "webdataset":
        missing = [u for u in expand_shard_urls(d.urls, d.allow_pipe_urls) if not _url_scheme(u)
                   and not os.path.isfile(u)]
        if missing:
            raise ConfigError(f"key 'data.urls': shard file(s) not found: {missing[:5]}")


# ----------------------------------------------------------------------------- index cache
def default_cache_dir(cfg: RunConfig) -> str:
    """GPTDataset's index cache: data.cache_dir, else `data_cache` in the run's output root (the
    parent of checkpoint.dir, next to the default tensorboard / metrics.jsonl), so that a
    checkpoint dir from elsewhere never brings index files with it."""
    if cfg.data.cache_dir:
        return cfg.data.cache_dir
    return os.path.join(os.path.dirname(os.path.abspath(cfg.checkpoint.dir)), "data_cache")


def _npy_problem(path: str) -> Optional[str]:
    """Why numpy.load(path, allow_pickle=True) could run code or fail (None for a plain array)."""
    from numpy.lib import format as npy

    try:
        with open(path, "rb") as f:
            version = npy.read_magic(f)
            if version == (1, 0):
                shape, _fortran, dtype = npy.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _fortran, dtype = npy.read_array_header_2_0(f)
            else:
                return f"NumPy format version {version} (megatron-core writes 1.0)"
            data_start = f.tell()
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError) as e:
        return f"not a NumPy .npy file ({e})"
    if dtype.hasobject:
        return f"dtype {dtype} holds Python objects (would be unpickled)"
    need = data_start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < need:
        return f"truncated: {size} bytes, the header needs {need}"
    return None


def check_index_cache(cache_dir: str) -> None:
    """Refuse to start when a `.npy` in `cache_dir` is not a plain array: megatron-core loads its
    index cache with numpy.load(allow_pickle=True), which unpickles (runs) a file without the
    NumPy magic or with an object dtype. ConfigError naming the file; nothing is loaded."""
    if not os.path.isdir(cache_dir):
        return
    for name in sorted(os.listdir(cache_dir)):
        path = os.path.join(cache_dir, name)
        if not name.endswith(".npy"):
            continue
        why = _npy_problem(path)
        if why:
            raise ConfigError(
                f"{path}: dataset index cache file refused: {why}. megatron-core would load it with "
                "numpy.load(allow_pickle=True); delete it if you did not put it there (the cache is "
                "rebuilt), or point data.cache_dir elsewhere")


#: the most index entries (epochs x documents) one split may need: megatron-core builds the
#: document index in memory, and loops forever for a split without tokens
MAX_INDEX_ENTRIES = 1 << 31


def open_index(prefix: str):
    """megatron-core's IndexedDataset at `prefix` (mmap); a damaged or foreign .idx is a
    ConfigError naming the file, not a traceback."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        ds = IndexedDataset(prefix, mmap=True)
        ds.document_indices, ds.sequence_lengths  # noqa: B018 - read here, where errors are named
    except Exception as e:  # noqa: BLE001 - megatron-core raises AssertionError / ValueError / OSError
        raise ConfigError(f"{prefix}.idx: not a readable IndexedDataset index "
                          f"({type(e).__name__}: {e})") from None
    return ds


def check_split_sizes(prefixes: List[str], weights: List[float], split: str, seq_length: int,
                      sizes: List[int]) -> None:
    """Every split the run samples from holds tokens in every blended dataset, few enough epochs
    to index: ConfigError naming the prefix, the split and the numbers otherwise. GPTDataset
    would loop forever on a split without tokens 
    and build an index of unbounded size for a nearly empty one (a small share of few documents
    rounds to none: `data.split=99.5,0.5,0` of 60 documents). Reads each `.idx` (mmap)."""
    import math

    parts = [float(x) for x in split.split(",")]
    bounds = [sum(parts[:i]) / sum(parts) for i in range(len(parts) + 1)]
    total_w = sum(weights)
    for prefix, w in zip(prefixes, weights):
        ds = open_index(prefix)
        docs, lengths = ds.document_indices, ds.sequence_lengths
        n_docs = docs.shape[0] - 1
        for i, (name, n) in enumerate(zip(("train", "valid", "test"), sizes)):
            if parts[i] == 0:  # a 0 share: megatron-core builds no dataset for it
                continue
            beg, end = (int(round(b * float(n_docs))) for b in bounds[i:i + 2])
            tokens = int(lengths[docs[beg]:docs[end]].sum(dtype="int64")) if end > beg else 0
            if tokens == 0:  # built even when nothing is sampled from it (then: 0 samples)
                fix = ("turn validation off (train.eval_interval=0) and give it a 0 share, or give "
                       "it a larger one" if name == "valid" and n else "give it a 0 share or a larger one")
                raise ConfigError(f"key 'data.split' ({split!r}): the {name} split of {prefix} holds "
                                  f"{end - beg} of its {n_docs} documents and no tokens (megatron-core "
                                  f"would loop forever building it): {fix}")
            need = math.ceil(n * w / total_w * 1.005) * seq_length + 1  # the builder's surplus
            epochs = math.ceil(need / tokens)
            if w and epochs * (end - beg) > MAX_INDEX_ENTRIES:
                raise ConfigError(f"key 'data.split' ({split!r}): the {name} split of {prefix} holds "
                                  f"{tokens} tokens; {n} sequences of {seq_length} would repeat it "
                                  f"{epochs} times (an index too large to build): give it a larger "
                                  "share or add data")


def _sizes(cfg: RunConfig) -> List[int]:
    G = cfg.train.global_batch_size
    n_valid = cfg.train.eval_iters * G if cfg.train.eval_interval > 0 else 0
    return [cfg.train.train_steps * G, n_valid, 0]


def build_datasets(cfg: RunConfig, *, vocab_size: int) -> Tuple[object, Optional[object], int]:
    """(train dataset, valid dataset or None, eod_id). Collective: call on every rank."""
    d = cfg.data
    s = cfg.model.seq_length
    n_train, n_valid, _ = _sizes(cfg)
    if d.backend == "synthetic":
        eod = resolve_eod_id(cfg)
        train = SyntheticTokens(n_train, s, cfg.model.vocab_size, cfg.train.seed, eod)
        valid = SyntheticTokens(n_valid, s, cfg.model.vocab_size, cfg.train.seed + 1, eod) if n_valid else None
        return train, valid, eod
    if d.backend == "webdataset":
        eod = resolve_eod_id(cfg)
        train = WebDatasetTokens(d.urls, s, n_train, allow_pipe_urls=d.allow_pipe_urls)
        return train, None, eod

    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    info: dict = {}
    prefixes, weights = list(d.prefixes), list(d.weights)
    if d.blend:
        bp, bw, info = read_blend(d.blend)
        prefixes, weights = prefixes + bp, weights + bw
    if not weights:
        weights = [1.0] * len(prefixes)
    eod = resolve_eod_id(cfg, info)
    if info.get("vocab_size") and int(info["vocab_size"]) > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's "
                          f"tokenizer vocabulary ({info['vocab_size']}, from {d.blend})")
    cache = default_cache_dir(cfg)
    os.makedirs(cache, exist_ok=True)
    check_index_cache(cache)
    import torch.distributed as dist

    if dist.is_initialized():  # every rank checked the cache before rank 0 starts writing to it
        dist.barrier()
    check_split_sizes(prefixes, weights, d.split, s, [n_train, n_valid, 0])
    def splits(paths: List[str]):  # (train, valid) GPTDatasets over `paths`
        gcfg = GPTDatasetConfig(
            random_seed=cfg.train.seed,
            sequence_length=s,
            blend=(paths, weights) if len(paths) > 1 else (paths, None),
            split=d.split,
            path_to_cache=cache,
            tokenizer=_TokenizerInfo(vocab_size, eod),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
        )
        return BlendedMegatronDatasetBuilder(GPTDataset, [n_train, n_valid, 0], lambda: True, gcfg).build()[:2]

    train, valid = splits(prefixes)
    if d.loss_mask == "blend":
        masks = read_blend(d.blend, "loss_mask")[0]
        check_loss_masks(prefixes, masks)
        mtrain, mvalid = splits(masks)
        train, valid = MaskedSamples(train, mtrain), (MaskedSamples(valid, mvalid) if n_valid else None)
    return train, (valid if n_valid else None), eod


def check_loss_masks(prefixes: List[str], masks: List[str]) -> None:
    """Every loss-mask IndexedDataset has its token dataset's sequence lengths (so GPTDataset,
    given the same seed, split and sizes, cuts both into the same samples)."""
    for p, m in zip(prefixes, masks):
        da, db = open_index(p), open_index(m)  # kept alive: the lengths view their mmap
        a, b = np.array(da.sequence_lengths), np.array(db.sequence_lengths)
        if len(a) != len(b) or (a != b).any():
            raise ConfigError(f"key 'data.loss_mask': {m}(.idx) does not match the sequences of {p} "
                              f"({len(b)} vs {len(a)} sequences, or other lengths)")


class MaskedSamples(torch.utils.data.Dataset):
    """GPTDataset samples whose loss_mask [s] is the parallel mask dataset's labels: the 0/1
    weight of each predicted token (data.loss_mask blend). Both datasets come from one
    GPTDatasetConfig (seed, split, sizes) over sequences of equal lengths: equal sample indices."""

    def __init__(self, tokens, masks):
        if len(tokens) != len(masks):  # pragma: no cover - check_loss_masks makes them equal
            raise ConfigError(f"key 'data.loss_mask': {len(masks)} mask samples for {len(tokens)} samples")
        self.tokens, self.masks = tokens, masks

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        x = dict(self.tokens[i])
        x["loss_mask"] = torch.as_tensor(self.masks[i]["labels"]).float()  # [s]
        return x


# ----------------------------------------------------------------------------- batching
def _collate(samples: List[Dict[str, torch.Tensor]], pin: bool) -> Dict[str, torch.Tensor]:
    tokens = torch.stack([x["tokens"] for x in samples]).long()
    labels = torch.stack([x["labels"] for x in samples]).long()
    loss_mask = torch.stack([x["loss_mask"] for x in samples]).float()
    b, s = tokens.shape
    pos = torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s).contiguous()  # pinning needs its own memory
    out = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": pos}
    return {k: v.pin_memory() if pin else v for k, v in out.items()}


def batch_to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    """A host micro-batch on `device`; from pinned memory the copies do not make the host wait."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class BatchPlan:
    """How a global batch splits: G = mbs * dp * num_microbatches."""

    global_batch_size: int
    micro_batch_size: int
    dp_size: int
    dp_rank: int

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def indices(self, start: int) -> List[List[int]]:
        """Sample indices of this rank's micro-batches for the global batch starting at `start`."""
        mbs, dp = self.micro_batch_size, self.dp_size
        return [
            [start + m * mbs * dp + self.dp_rank * mbs + j for j in range(mbs)]
            for m in range(self.num_microbatches)
        ]


def check_batch_plan(cfg: RunConfig, dp_size: int) -> None:
    G, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if G % (mbs * dp_size):
        raise ConfigError(
            f"key 'train.global_batch_size': {G} is not divisible by micro_batch_size x "
            f"data-parallel size = {mbs} x {dp_size}"
        )


def global_batch(dataset, plan: BatchPlan, start: int, pin: bool = False) -> List[Dict[str, torch.Tensor]]:
    """This rank's micro-batches (a list of batch dicts) of the global batch starting at `start`,
    on the host: in pinned memory when `pin` (for a CUDA device; batch_to_device then copies each
    without waiting, when its forward starts, and the document boundaries are read from the
    host tokens without a copy back)."""
    n = len(dataset)
    return [_collate([dataset[i % n] for i in idx], pin) for idx in plan.indices(start)]
