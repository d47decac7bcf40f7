"""data_prep.recall_mixture: recall documents from ham-eval's generators + filler, written as
IndexedDatasets with EOD after each document, deterministic per seed, held-out split disjoint."""
import filecmp
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_prep import recall_mixture as rm
from megatron_ham.eval.recall import TokenSpace, generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--vocab-size", "500", "--eod-id", "0", "--train-tokens", "20000", "--heldout-tokens", "4000",
        "--lengths", "128,256", "--num-pairs", "4,8", "--num-needles", "2", "--no-progress"]


def _build(out, *extra):
    return rm.run(rm.build_parser().parse_args(["--out", str(out), *ARGS, *extra]))


def test_mixture_documents_determinism_and_heldout(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    m = _build(tmp_path / "a")
    tr, ho = m["splits"]["train"], m["splits"]["heldout"]
    assert tr["tokens"] >= 20000 and ho["tokens"] >= 4000
    assert set(tr["by_kind"]) == set(rm.KINDS)  # every kind of the default mix occurs
    assert tr["by_kind"]["mqar"]["answer_tokens"] > 0
    ds = IndexedDataset(str(tmp_path / "a" / "train"))
    assert len(ds) == tr["documents"]
    space = TokenSpace(500, exclude=(0,))
    spec = rm.MixtureSpec(500, 0, rm._mix("mqar=0.4,niah_single=0.1,niah_multikey=0.15,niah_multivalue=0.1,filler=0.25"),
                          (128, 256), (4, 8), (2,), 2, 3, "random", ())
    checked = 0
    for i in range(len(ds)):
        doc = np.asarray(ds[i], dtype=np.int64)
        assert doc[-1] == 0 and (doc[:-1] != 0).all()  # one EOD, at the end
        plan = rm.plan_document(spec, 1, i)
        assert doc.size == plan.length + 1
        if plan.kind != "filler" and checked < 5:  # the generator's example, token for token
            ex = generate(plan.kind, plan.length, plan.seed, space, **dict(plan.params))
            assert (doc[:-1] == ex.tokens).all()
            checked += 1
    assert checked == 5
    # held-out documents come from other example seeds than any training document or ham-eval's
    lo, hi = tr["example_seeds"]
    hlo, hhi = ho["example_seeds"]
    assert hi < hlo or hhi < lo
    assert min(lo, hlo) > 1000 * 1_000_003 + 10 ** 6  # above every ham-eval seed of eval seeds < 1000
    # deterministic: same settings (1 or 2 workers) -> identical bytes; another seed -> others
    _build(tmp_path / "b", "--workers", "2")
    for name in ("train.bin", "train.idx", "heldout.bin", "heldout.idx"):
        assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False), name
    _build(tmp_path / "c", "--seed", "5", "--heldout-seed", "6")
    assert not filecmp.cmp(tmp_path / "a" / "train.bin", tmp_path / "c" / "train.bin", shallow=False)
    # the blend is the format ham-train reads
    from megatron_ham.training.data import read_blend

    prefixes, weights, info = read_blend(str(tmp_path / "a" / "blend.json"))
    assert prefixes == [str(tmp_path / "a" / "train")] and weights == [1.0]
    assert info["vocab_size"] == 500 and info["eod_id"] == 0
    # a second run with the same settings does nothing
    before = os.path.getmtime(tmp_path / "a" / "train.bin")
    assert _build(tmp_path / "a") == json.load(open(tmp_path / "a" / "recall_mixture.json"))
    assert os.path.getmtime(tmp_path / "a" / "train.bin") == before


@pytest.mark.parametrize("extra,msg", [
    (["--heldout-seed", "1"], "--heldout-seed must differ from --seed"),
    (["--eod-id", "600"], "--eod-id 600 is outside the vocabulary"),
    (["--haystack", "text"], "--haystack text needs --text"),
    (["--num-pairs", "200"], "--lengths: mqar"),
    (["--text", "/nonexistent/prefix"], "neither a blend file nor an IndexedDataset prefix"),
])
def test_mixture_bad_arguments_exit_2(tmp_path, extra, msg):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "data_prep.recall_mixture", "--out", str(tmp_path / "x"), *ARGS, *extra],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and msg in p.stderr, p.stderr[-2000:]
    assert not os.path.exists(tmp_path / "x" / "recall_mixture.json")
