"""The data layer without processes: global-batch partition and the webdataset backend."""
from __future__ import annotations

import os

import numpy as np
import pytest

from megatron_ham.training.data import BatchPlan, WebDatasetTokens

from test_training_helpers import write_learnable_dataset


@pytest.mark.parametrize("G, mbs, dp", [(8, 2, 2), (12, 1, 3), (4, 4, 1)])
def test_global_batch_is_partitioned_exactly_once(G, mbs, dp):
    seen = []
    for r in range(dp):
        plan = BatchPlan(G, mbs, dp, r)
        idx = plan.indices(5 * G)
        assert len(idx) == plan.num_microbatches == G // (mbs * dp)
        assert all(len(m) == mbs for m in idx)
        seen += [i for m in idx for i in m]
    assert sorted(seen) == list(range(5 * G, 6 * G))


def test_webdataset_backend_reads_ham_prep_data_shards(tmp_path):
    wio = pytest.importorskip("data_prep.webdataset_io")
    blend = write_learnable_dataset(str(tmp_path / "data"), n_docs=60)
    out = str(tmp_path / "wds")
    info = wio.export_webdataset(blend, out, seq_len=32)
    ds = WebDatasetTokens([out], seq_length=32, num_samples=10)
    assert len(ds.seqs) == info["num_samples"]
    x = ds[3]
    assert x["tokens"].shape == (32,) and x["labels"].shape == (32,)
    assert np.array_equal(x["tokens"][1:].numpy(), x["labels"][:-1].numpy())
    # deterministic: a second reader sees the same samples in the same order
    again = WebDatasetTokens([os.path.join(out, "*.tar").replace("*.tar", n) for n in sorted(os.listdir(out)) if n.endswith(".tar")], 32, 10)
    assert all(np.array_equal(a, b) for a, b in zip(ds.seqs, again.seqs))


# ------------------------------------------------------------------ files from elsewhere
class _Payload:
    """Unpickling it creates `marker` (what a planted pickle would do, minus the harm)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _cfg(tmp_path, *overrides):
    from test_training_helpers import RECIPE, base_overrides

    from megatron_ham.training.config import load_config

    blend = write_learnable_dataset(str(tmp_path / "data"), n_docs=60)
    ov = [o for o in base_overrides(blend, str(tmp_path / "run")) if not o.startswith("data.cache_dir=")]
    return load_config(RECIPE, ov + ["train.train_steps=4", "train.eval_interval=0", *overrides])


def test_index_cache_is_outside_the_checkpoint_dir_and_never_unpickled(tmp_path):
    import pickle

    from megatron_ham.training.config import ConfigError
    from megatron_ham.training.data import build_datasets, default_cache_dir

    cfg = _cfg(tmp_path)
    ck = os.path.abspath(cfg.checkpoint.dir)
    assert default_cache_dir(cfg) == os.path.join(os.path.dirname(ck), "data_cache")
    # the old default location inside the checkpoint dir: build a real cache there, then plant
    old = os.path.join(ck, "data_cache")
    cfg.data.cache_dir = old
    build_datasets(cfg, vocab_size=128)
    names = sorted(n for n in os.listdir(old) if n.endswith(".npy"))
    assert names, os.listdir(old)
    marker = tmp_path / "PWNED"
    with open(os.path.join(old, names[0]), "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    # default location: the planted file is not even looked at
    cfg.data.cache_dir = None
    train, _, _ = build_datasets(cfg, vocab_size=128)
    train[0]
    assert not marker.exists()
    # pointing data.cache_dir at it: refused before megatron-core opens anything, file named
    cfg.data.cache_dir = old
    with pytest.raises(ConfigError, match=f"{names[0]}: dataset index cache file refused: not a NumPy"):
        build_datasets(cfg, vocab_size=128)
    assert not marker.exists()
    # an object-dtype .npy (valid magic, pickled payload) and a truncated one: refused too
    np.save(os.path.join(old, names[0]), np.array([_Payload(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="holds Python objects"):
        build_datasets(cfg, vocab_size=128)
    np.save(os.path.join(old, names[0]), np.arange(1000))
    with open(os.path.join(old, names[0]), "r+b") as f:
        f.truncate(500)
    with pytest.raises(ConfigError, match="truncated"):
        build_datasets(cfg, vocab_size=128)
    assert not marker.exists()


def test_pipe_urls_run_nothing_unless_the_recipe_allows_them(tmp_path):
    wio = pytest.importorskip("data_prep.webdataset_io")
    from megatron_ham.training.config import ConfigError
    from megatron_ham.training.data import build_datasets

    blend = write_learnable_dataset(str(tmp_path / "data"), n_docs=60)
    out = str(tmp_path / "wds")
    wio.export_webdataset(blend, out, seq_len=32)
    shard = os.path.join(out, sorted(n for n in os.listdir(out) if n.endswith(".tar"))[0])
    marker = tmp_path / "PWNED"
    url = f"pipe:touch {marker}; cat {shard}"
    ov = ["data.backend=webdataset", "data.urls=[" + repr(url) + "]", "model.seq_length=32"]
    cfg = _cfg(tmp_path, *ov)
    with pytest.raises(ConfigError, match=r"data.urls\[0\].*data.allow_pipe_urls: true"):
        build_datasets(cfg, vocab_size=128)
    assert not marker.exists()
    cfg.data.allow_pipe_urls = True  # the recipe author says so: it runs
    train, _, _ = build_datasets(cfg, vocab_size=128)
    assert marker.exists() and train[0]["tokens"].shape == (32,)


def test_missing_tokenizer_is_named(tmp_path):
    from megatron_ham.training.config import ConfigError
    from megatron_ham.training.data import build_datasets, check_data_paths

    cfg = _cfg(tmp_path, f"data.tokenizer={tmp_path}/no-such-tokenizer", "data.eod_id=null")
    for f in (check_data_paths, lambda c: build_datasets(c, vocab_size=128)):
        with pytest.raises(ConfigError, match=f"data.tokenizer': {tmp_path}/no-such-tokenizer: no such file"):
            f(cfg)


def test_a_split_without_tokens_is_refused_not_looped_on(tmp_path):
    """GPTDataset loops forever building a split that holds no tokens (a small share of few
    documents rounds to none), even when nothing is sampled from it: ham-train must say which."""
    from megatron_ham.training.config import ConfigError
    from megatron_ham.training.data import build_datasets

    for i, extra in enumerate((["train.eval_interval=2"], [])):  # validation on, then off
        cfg = _cfg(tmp_path / str(i), "data.split=99.5,0.5,0", *extra)  # 0.5% of 60 documents
        with pytest.raises(ConfigError, match=r"key 'data.split' \('99.5,0.5,0'\): the valid split of "
                                              r".*arith holds 0 of its 60 documents and no tokens"):
            build_datasets(cfg, vocab_size=128)
    cfg = _cfg(tmp_path / "b", "data.split=100,0,0")  # a 0 share: no dataset, nothing to refuse
    train, valid, _ = build_datasets(cfg, vocab_size=128)
    assert valid is None and len(train) >= 4 * cfg.train.global_batch_size


def test_a_damaged_index_is_named(tmp_path):
    from megatron_ham.training.config import ConfigError
    from megatron_ham.training.data import check_split_sizes

    (tmp_path / "x.idx").write_bytes(b"MMIDIDX\x00\x00" + bytes(range(91)))  # right magic, garbage after
    (tmp_path / "x.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match=r"x\.idx: not a readable IndexedDataset index"):
        check_split_sizes([str(tmp_path / "x")], [1.0], "98,2,0", 128, [8, 0, 0])
