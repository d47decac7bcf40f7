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
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import ConfigError, RunConfig


# ----------------------------------------------------------------------------- blend / tokenizer
def read_blend(path: str) -> Tuple[List[str], List[float], dict]:
    """A ham-prep-data blend file -> (prefixes, weights, extra info {eod_id, vocab_size, ...})."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f) if path.endswith(".json") else __import__("yaml").safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"data.blend: blend file {path!r} not found (run ham-prep-data first)") from None
    entries = raw["blend"] if isinstance(raw, dict) else raw
    info = {k: v for k, v in raw.items() if k != "blend"} if isinstance(raw, dict) else {}
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: expected a non-empty list of {{prefix, weight}} entries")
    base = os.path.dirname(os.path.abspath(path))
    prefixes, weights = [], []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "prefix" not in e or "weight" not in e:
            raise ConfigError(f"{path}: blend[{i}] needs 'prefix' and 'weight', got {e!r}")
        p = e["prefix"] if os.path.isabs(e["prefix"]) else os.path.join(base, e["prefix"])
        if not os.path.exists(p + ".idx") and "relative_prefix" in e:
            p = os.path.join(base, e["relative_prefix"])
        if not os.path.exists(p + ".idx"):
            raise ConfigError(f"{path}: blend[{i}]: no IndexedDataset at {p}(.idx/.bin)")
        prefixes.append(p)
        weights.append(float(e["weight"]))
    return prefixes, weights, info


def resolve_eod_id(cfg: RunConfig, info: Optional[dict] = None) -> int:
    """EOD id: data.eod_id, else the tokenizer's EOS, else the blend file's eod_id, else 0."""
    d = cfg.data
    if d.eod_id is not None:
        return d.eod_id
    if d.tokenizer:
        from tokenizers import Tokenizer

        tj = os.path.join(d.tokenizer, "tokenizer.json") if os.path.isdir(d.tokenizer) else d.tokenizer
        tok = Tokenizer.from_file(tj)
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

    def __init__(self, urls: Sequence[str], seq_length: int, num_samples: int):
        import webdataset as wds

        expanded: List[str] = []
        for u in urls:
            if os.path.isdir(u):  # a ham-prep-data --wds-out directory
                import glob

                expanded.extend(sorted(glob.glob(os.path.join(u, "*.tar"))))
            else:
                expanded.extend(sorted(wds.shardlists.expand_urls(u)))
        if not expanded:
            raise ConfigError(f"data.urls: no shards match {list(urls)}")
        seqs = []
        # every rank indexes every shard (identity splitters): the sample order is global
        ds = wds.WebDataset(expanded, shardshuffle=False, empty_check=False,
                            nodesplitter=lambda s: s, workersplitter=lambda s: s)
        for sample in ds:
            arr = None
            for key, value in sorted(sample.items()):
                if key.endswith("npy") or key.endswith("tokens"):
                    arr = np.load(__import__("io").BytesIO(value)) if key.endswith("npy") else \
                        np.frombuffer(value, dtype=np.int32)
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
        train = WebDatasetTokens(d.urls, s, n_train)
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
    cache = d.cache_dir or os.path.join(cfg.checkpoint.dir, "data_cache")
    gcfg = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=s,
        blend=(prefixes, weights) if len(prefixes) > 1 else (prefixes, None),
        split=d.split,
        path_to_cache=cache,
        tokenizer=_TokenizerInfo(vocab_size, eod),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [n_train, n_valid, 0], lambda: True, gcfg
    ).build()
    return train, (valid if n_valid else None), eod


# ----------------------------------------------------------------------------- batching
def _collate(samples: List[Dict[str, torch.Tensor]], device) -> Dict[str, torch.Tensor]:
    tokens = torch.stack([x["tokens"] for x in samples]).long()
    labels = torch.stack([x["labels"] for x in samples]).long()
    loss_mask = torch.stack([x["loss_mask"] for x in samples]).float()
    b, s = tokens.shape
    pos = torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s)
    out = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": pos}
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}


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


def global_batch(dataset, plan: BatchPlan, start: int, device) -> List[Dict[str, torch.Tensor]]:
    """This rank's micro-batches (a list of batch dicts) of the global batch starting at `start`."""
    n = len(dataset)
    return [_collate([dataset[i % n] for i in idx], device) for idx in plan.indices(start)]
