"""Packed-sequence webdataset export and the IterableDataset that reads it back.

Export (``export_webdataset``): from the IndexedDatasets of a blend.json, each component's
token stream (documents + EOD, in file order) is cut into windows of ``seq_len + 1`` tokens
with stride ``seq_len`` (as Megatron's GPTDataset does: the last token of a window is the first
of the next). The blend draws ``round(S * w_c)`` windows from component c (cycling over its
windows in a seeded shuffled order when it needs more than one epoch), interleaved in a seeded
order, and writes them with ``webdataset.ShardWriter``::

    <wds_out>/shard-000000.tar ...     samples: "<key>.tokens.npy" (1-D, seq_len+1, uint16/int32)
                                                "<key>.component.txt" (component name)
    <wds_out>/index.json              {"seq_len", "sample_tokens", "dtype", "num_shards",
                                       "samples_per_shard", "num_samples", "shards", "blend", ...}

Every shard holds exactly ``samples_per_shard`` samples and the shard count is a multiple of
``shard_multiple`` (nodes x GPUs x loader workers), so shards split evenly; the remainder
windows are dropped and counted in index.json. The directory is written under a temporary
name and renamed when complete.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
from typing import Iterator, List, Optional

import numpy as np
import torch

from megatron_ham.publish import publish_dir, temp_dir_for
from megatron_ham.safe_names import check_name

log = logging.getLogger("data_prep")
INDEX_FORMAT = "ham-packed-sequences-v1"


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _own_index(out_dir: str) -> Optional[dict]:
    """index.json of an earlier export into ``out_dir`` (None when there is none)."""
    try:
        with open(os.path.join(out_dir, "index.json"), encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) and index.get("format") == INDEX_FORMAT else None


def export_webdataset(blend_path: str, out_dir: str, seq_len: int, shard_multiple: int = 1,
                      samples_per_shard: int = 2048, num_sequences: Optional[int] = None, seed: int = 1234,
                      overwrite: bool = False) -> dict:
    """Write packed sequences of the blend as tar shards; returns the index.json content."""
    import webdataset as wds
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from .pipeline import _atomic_write_json, load_blend

    if seq_len < 1 or shard_multiple < 1 or samples_per_shard < 1:
        raise ValueError(f"--wds-seq-len, --wds-shard-multiple, --wds-samples-per-shard must be >= 1, got "
                         f"{seq_len}, {shard_multiple}, {samples_per_shard}")
    out_dir = os.path.abspath(out_dir)
    old_index = _own_index(out_dir)
    if old_index is not None and not overwrite:
        log.info("webdataset %s exists (index.json); skipped (use --overwrite to rebuild)", out_dir)
        return old_index
    if old_index is None and os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"--wds-out {out_dir}: exists and is not a webdataset export of ham-prep-data "
                         "(no index.json of format ham-packed-sequences-v1); choose a new or empty directory")
    with open(blend_path, encoding="utf-8") as f:
        meta = json.load(f)
    prefixes, weights = load_blend(blend_path)
    names = [e.get("name", os.path.basename(p)) for e, p in zip(meta["blend"], prefixes)]
    streams, windows = [], []
    for p in prefixes:
        ds = IndexedDataset(p)  # validates .idx/.bin; tokens are contiguous in .bin
        n_tok = int(ds.sequence_lengths.astype(np.int64).sum())
        arr = np.memmap(p + ".bin", dtype=ds.index.dtype, mode="r", shape=(n_tok,))
        streams.append(arr)
        windows.append(max(0, (n_tok - 1) // seq_len))
    live = [i for i, n in enumerate(windows) if n > 0 and weights[i] > 0]
    if not live:
        raise ValueError(f"{blend_path}: no component has more than seq_len={seq_len} tokens")
    wsum = sum(weights[i] for i in live)
    w = {i: weights[i] / wsum for i in live}
    if num_sequences is None:
        num_sequences = int(min(windows[i] / w[i] for i in live))
    counts = {i: int(math.floor(num_sequences * w[i])) for i in live}
    short = num_sequences - sum(counts.values())
    for i in sorted(live, key=lambda i: -w[i])[:short]:
        counts[i] += 1
    total = sum(counts.values())
    n_shards = max(1, math.ceil(total / samples_per_shard))
    n_shards = math.ceil(n_shards / shard_multiple) * shard_multiple
    per_shard = total // n_shards
    if per_shard < 1:
        raise ValueError(f"only {total} sequences of {seq_len + 1} tokens: too few for {n_shards} shards "
                         f"(--wds-shard-multiple {shard_multiple}); use a smaller --wds-seq-len or multiple")
    used = per_shard * n_shards
    rng = np.random.default_rng(seed)
    order = np.concatenate([np.full(counts[i], i, dtype=np.int64) for i in live])
    rng.shuffle(order)
    order = order[:used]
    perms = {i: rng.permutation(windows[i]) for i in live}
    taken = {i: 0 for i in live}
    tmp = temp_dir_for(out_dir)  # a fresh dir of ours: removed (whole) if the export fails
    try:
        used_per = {i: 0 for i in live}
        with wds.ShardWriter(os.path.join(tmp, "shard-%06d.tar"), maxcount=per_shard, maxsize=1 << 40,
                             verbose=0) as sink:
            for k, c in enumerate(order.tolist()):
                j = taken[c]
                taken[c] += 1
                epoch, pos = divmod(j, windows[c])
                if pos == 0 and epoch > 0:
                    perms[c] = rng.permutation(windows[c])
                start = int(perms[c][pos]) * seq_len
                tokens = np.array(streams[c][start:start + seq_len + 1])
                sink.write({"__key__": f"{k:09d}", "tokens.npy": _npy_bytes(tokens), "component.txt": names[c]})
                used_per[c] += 1
        shards = sorted(x for x in os.listdir(tmp) if x.endswith(".tar"))
        assert len(shards) == n_shards, (len(shards), n_shards)
        index = {
            "format": INDEX_FORMAT, "seq_len": seq_len, "sample_tokens": seq_len + 1,
            "dtype": str(streams[live[0]].dtype), "num_shards": n_shards, "samples_per_shard": per_shard,
            "num_samples": used, "dropped_samples": total - used, "shard_multiple": shard_multiple,
            "seed": seed, "shards": shards, "eod_id": meta.get("eod_id"), "vocab_size": meta.get("vocab_size"),
            "tokenizer": meta.get("tokenizer"), "source_blend": os.path.abspath(blend_path),
            "blend": [{"name": names[i], "weight": w[i], "sequences": used_per[i], "windows": windows[i],
                       "epochs": used_per[i] / windows[i]} for i in live],
        }
        _atomic_write_json(os.path.join(tmp, "index.json"), index)
        own = None if old_index is None else ["index.json"] + list(old_index.get("shards") or [])
        publish_dir(tmp, out_dir, own, overwrite, "--wds-out")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("webdataset: %d samples of %d tokens in %d shards (%d per shard, %d dropped) -> %s", used,
             seq_len + 1, n_shards, per_shard, total - used, out_dir)
    return index


class PackedSequenceDataset(torch.utils.data.IterableDataset):
    """Reads the packed-sequence shards written by ``export_webdataset``.

    Args:
        path: the export directory (with index.json), or an explicit list of shard paths/URLs
            (anything webdataset opens, e.g. ``pipe:`` or ``https://``).
        rank, world_size: data-parallel rank and size; default 0 / 1.
        return_labels: False -> ``{"tokens": LongTensor[seq_len+1]}``;
            True -> ``{"tokens": LongTensor[seq_len], "labels": LongTensor[seq_len]}``
            (labels = tokens shifted left by one, as GPTDataset's tokens/labels).
        shuffle_shards: shuffle the shard order with ``seed + epoch`` (same order on every rank,
            then split); call ``set_epoch(e)`` once per epoch.
        allow_uneven: by default the shard count must be divisible by world_size x num_workers
            (so every rank/worker reads the same number of samples); True lifts the check.

    Splitting: with W = world_size x num_workers (DataLoader workers, from
    ``torch.utils.data.get_worker_info()``), consumer g = rank x num_workers + worker_id reads
    shards ``g, g + W, g + 2W, ...`` in order, sample by sample. A rank sees
    ``samples_per_rank(num_workers)`` samples per epoch. Batching is left to the DataLoader
    (default collation stacks to ``[b, seq_len+1]`` LongTensors).
    """

    def __init__(self, path, rank: int = 0, world_size: int = 1, return_labels: bool = False,
                 shuffle_shards: bool = False, seed: int = 0, allow_uneven: bool = False):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.index = None
        if isinstance(path, (list, tuple)):
            self.shards = list(path)
        else:
            where = os.path.join(path, "index.json")
            with open(where, encoding="utf-8") as f:
                self.index = json.load(f)
            # shard names are entries of `path` (an index.json from elsewhere must not point outside)
            self.shards = [os.path.join(path, check_name(s, f"{where}: shards[{i}]"))
                           for i, s in enumerate(self.index["shards"])]
        if not self.shards:
            raise ValueError(f"{path}: no shards")
        self.rank, self.world_size = rank, world_size
        self.return_labels, self.shuffle_shards, self.seed = return_labels, shuffle_shards, seed
        self.allow_uneven = allow_uneven
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def samples_per_rank(self, num_workers: int = 1) -> Optional[int]:
        if self.index is None:
            return None
        consumers = self.world_size * max(1, num_workers)
        return (self.index["num_shards"] // consumers) * max(1, num_workers) * self.index["samples_per_shard"]

    def shards_for(self, worker_id: int = 0, num_workers: int = 1) -> List[str]:
        shards = list(self.shards)
        if self.shuffle_shards:
            perm = np.random.default_rng(self.seed + self.epoch).permutation(len(shards))
            shards = [shards[i] for i in perm]
        consumers = self.world_size * num_workers
        if len(shards) % consumers and not self.allow_uneven:
            raise ValueError(f"{len(shards)} shards do not split evenly over world_size={self.world_size} x "
                             f"num_workers={num_workers}; export with --wds-shard-multiple {consumers} "
                             "(or pass allow_uneven=True)")
        return shards[self.rank * num_workers + worker_id::consumers]

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.shards_for(wid, nw)
        if not mine:
            return
        pipeline = wds.DataPipeline(wds.SimpleShardList(mine), wds.tarfile_to_samples())
        for sample in pipeline:
            arr = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
            t = torch.from_numpy(arr.astype(np.int64))
            if self.return_labels:
                yield {"tokens": t[:-1], "labels": t[1:]}
            else:
                yield {"tokens": t}
