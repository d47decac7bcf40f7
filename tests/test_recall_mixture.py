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


def _mqar_queries_answered(sample: np.ndarray, eod: int, space: TokenSpace):
    """(queries, queries whose key-value pair precedes them in the same document) of a training
    sample: documents split at the EOD, as the model restarts there (data.documents)."""
    asked = answered = 0
    ends = np.nonzero(sample == eod)[0]
    for doc in np.split(sample, ends + 1):
        hits = np.nonzero(doc == space.query)[0]
        if not hits.size:
            continue
        q = int(hits[0])
        for j in range(q + 1, doc.size - 1, 2):  # QUERY k v k v ...
            asked += 1
            ctx = doc[:q]
            answered += int(any(ctx[i + 1] == doc[j + 1] for i in np.nonzero(ctx[:-1] == doc[j])[0]))
    return asked, answered


def test_seq_length_packs_whole_documents_into_training_samples(tmp_path):
    """Through ham-train's data path (GPTDataset, samples of seq_length + 1 at stride seq_length):
    without --seq-length most MQAR queries lose their pairs to a sample boundary; with it every
    row is exactly seq_length tokens of whole documents and every query keeps its pairs."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ham.training.config import load_config
    from megatron_ham.training.data import build_datasets

    S, space = 128, TokenSpace(500, exclude=(0,))
    common = ["--mix", "mqar=0.8,filler=0.2", "--lengths", "40,127", "--num-pairs", "4,8"]
    cut = _build(tmp_path / "cut", *common)
    packed = _build(tmp_path / "packed", *common, "--seq-length", str(S))
    tr = packed["splits"]["train"]
    assert tr["sequences"] < tr["documents"] and tr["by_kind"]["pad"]["documents"] > 0
    ds = IndexedDataset(str(tmp_path / "packed" / "train"))
    assert len(ds) == tr["sequences"] and set(ds.sequence_lengths.tolist()) == {S}
    for i in range(len(ds)):
        assert np.asarray(ds[i])[-1] == 0  # a row ends with a document's EOD
    found = {}
    for name in ("cut", "packed"):
        cfg = load_config(os.path.join(REPO, "recipes", "evidence", "cpu_small", "transformer.yaml"),
                          [f"data.blend={tmp_path / name / 'blend.json'}", f"model.seq_length={S}",
                           "train.train_steps=20", "train.warmup_steps=2", "train.global_batch_size=8", "train.micro_batch_size=8",
                           "model.vocab_size=500", "data.loss_mask=all", f"data.cache_dir={tmp_path / name / 'cache'}"])
        train, _, eod = build_datasets(cfg, vocab_size=500)
        asked = answered = 0
        for i in range(160):
            x = train[i]
            a, b = _mqar_queries_answered(np.concatenate([x["tokens"].numpy(), x["labels"].numpy()[-1:]]), eod, space)
            asked, answered = asked + a, answered + b
        found[name] = (asked, answered)
    assert found["packed"][0] > 200 and found["packed"][1] == found["packed"][0], found
    assert found["cut"][1] < 0.8 * found["cut"][0], found  # the failure --seq-length prevents


def test_seq_length_must_hold_the_longest_document(tmp_path):
    with pytest.raises(ValueError, match="--seq-length 256: a row must hold the longest document"):
        _build(tmp_path / "x", "--seq-length", "256")


def test_loss_mask_marks_the_answers_of_training_samples(tmp_path):
    """--loss-mask + data.loss_mask=blend: ham-train's samples carry loss_mask 1 exactly where the
    label is an MQAR answer (the value after a queried key), 0 elsewhere; a blend without masks
    is refused naming the key."""
    from megatron_ham.training.config import ConfigError, load_config
    from megatron_ham.training.data import build_datasets

    S, space = 128, TokenSpace(500, exclude=(0,))
    common = ["--mix", "mqar=0.8,filler=0.2", "--lengths", "40,127", "--num-pairs", "4,8", "--seq-length", str(S)]
    m = _build(tmp_path / "m", *common, "--loss-mask")
    _build(tmp_path / "plain", *common)

    def cfg(name):
        return load_config(os.path.join(REPO, "recipes", "evidence", "cpu_small", "transformer.yaml"),
                           [f"data.blend={tmp_path / name / 'blend.json'}", f"model.seq_length={S}",
                            "train.train_steps=20", "train.warmup_steps=2", "train.global_batch_size=8",
                            "train.micro_batch_size=8", "model.vocab_size=500", "data.loss_mask=blend",
                            "train.eval_interval=10", "train.eval_iters=1", f"data.cache_dir={tmp_path / name / 'c'}"])

    train, valid, eod = build_datasets(cfg("m"), vocab_size=500)
    assert valid is not None and len(valid) == 8
    marked = 0
    for i in range(160):
        x = train[i]
        full = np.concatenate([x["tokens"].numpy(), x["labels"].numpy()[-1:]])
        want = np.zeros(S, dtype=bool)  # want[j]: label j (= full[j + 1]) is an answer
        for s0, doc in zip(np.concatenate([[0], np.nonzero(full == eod)[0] + 1]), np.split(full, np.nonzero(full == eod)[0] + 1)):
            q = np.nonzero(doc == space.query)[0]
            if q.size:
                want[s0 + np.arange(q[0] + 2, doc.size, 2) - 1] = True
        assert (x["loss_mask"].numpy() == want).all(), i
        marked += int(want.sum())
    assert marked > 300 and m["splits"]["train"]["by_kind"]["mqar"]["answer_tokens"] > 0
    with pytest.raises(ConfigError, match="needs 'loss_mask'"):
        build_datasets(cfg("plain"), vocab_size=500)
