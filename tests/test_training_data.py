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
