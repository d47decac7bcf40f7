"""ham-eval end to end on a real tiny checkpoint (ham-train, 1 CPU rank) and its HF export.

- perplexity of the checkpoint on the run's validation split == the loop's validation loss;
- the checkpoint and its export (ham-convert-hf) give the same report (perplexity by position,
  recall accuracy and answer NLL, routing fractions, quantiles and the per-position trace), and
  calibrate --kv-fraction to the same taus;
- the held-out splits are the documents ham-train assigns to them; the real-text haystack is the
  dataset's token stream;
- bad input: exit 2 with a message naming what is wrong.
ham-eval runs in this process (`main(argv)`), like the console script.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from eval_helpers import EOD, SPLIT, trained_run, write_blend, write_indexed

pytestmark = pytest.mark.slow
COMMON = ["--lengths", "80,160", "--samples", "3", "--num-pairs", "8", "--buckets", "0,32,64",
          "--no-progress", "--batch-size", "4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_run(tmp_path_factory)


def _eval(argv, capsys):
    from megatron_ham.eval.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def reports(trained, tmp_path_factory):
    """ham-eval on the checkpoint and on its export, same arguments (real-text haystack)."""
    import contextlib
    import io

    from megatron_ham.eval.cli import main

    out = {}
    for name, src in (("ckpt", ["--checkpoint", trained["checkpoint"]]), ("hf", ["--hf", trained["hf"]])):
        path = str(tmp_path_factory.mktemp(f"report_{name}") / "report.json")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(src + ["--data", trained["blend"], "--haystack", trained["prefix"], "--out", path] + COMMON)
        assert rc == 0
        with open(path) as f:
            out[name] = (json.load(f), buf.getvalue(), path)
    return out


def test_perplexity_equals_the_loops_validation_loss(trained, reports):
    rep, table, path = reports["ckpt"]
    p = rep["perplexity"]
    assert p["split"] == "valid" and p["split_spec"] == SPLIT
    assert p["samples"] == 8 and p["seq_length"] == 128 and p["tokens"] == 8 * 128  # eval_iters x batch
    assert abs(p["loss"] - trained["valid_loss"]) < 2e-5, (p["loss"], trained["valid_loss"])
    b = p["by_position"]
    assert [x["label"] for x in b] == ["0-32", "32-64", "64+"] and p["position_basis"] == "document"
    assert sum(x["tokens"] for x in b) == p["tokens"]
    assert abs(sum(x["loss"] * x["tokens"] for x in b) / p["tokens"] - p["loss"]) < 1e-9
    # the report's other parts, the table, the warning for a length above the trained context
    assert rep["schema"] == "megatron-ham-eval/1" and rep["model"]["source"] == "megatron"
    assert rep["model"]["pattern"] == "HH" and rep["model"]["seq_length"] == 128
    assert rep["routing_setup"]["mode"] == "checkpoint" and set(rep["routing_setup"]["taus"]) == {"0", "1"}
    cells = {(r["task"], r["length"]) for r in rep["recall"]["results"]}
    assert cells == {(t, L) for t in ("mqar", "niah_single", "niah_multikey", "niah_multivalue") for L in (80, 160)}
    assert any("160" in w and "trained context 128" in w for w in rep["warnings"])
    assert "perplexity (valid split of blend.json" in table and "niah_multivalue" in table and "L0" in table
    for kind in ("accuracy", "loss_by_position", "routing_trace"):
        png = os.path.join(os.path.dirname(path), rep["plots"][kind])
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", kind
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tmp_")]


def test_checkpoint_and_export_give_the_same_numbers(reports):
    a, b = reports["ckpt"][0], reports["hf"][0]
    assert b["model"]["source"] == "hf" and b["model"]["run_config_path"]  # found via the export record
    pa, pb = a["perplexity"], b["perplexity"]
    assert abs(pa["loss"] - pb["loss"]) < 1e-5
    for x, y in zip(pa["by_position"], pb["by_position"]):
        assert x["tokens"] == y["tokens"] and abs(x["loss"] - y["loss"]) < 1e-5
    for x, y in zip(a["recall"]["results"], b["recall"]["results"]):
        assert (x["task"], x["length"], x["answer_tokens"]) == (y["task"], y["length"], y["answer_tokens"])
        assert x["accuracy"] == y["accuracy"] and x["exact_match"] == y["exact_match"]
        assert abs(x["answer_nll"] - y["answer_nll"]) < 1e-4, (x, y)
    for layer in ("0", "1"):
        la, lb = a["routing"]["layers"][layer], b["routing"]["layers"][layer]
        assert la["tokens"] == lb["tokens"] and abs(la["fraction"] - lb["fraction"]) < 1e-9
        assert 0.2 < la["fraction"] < 0.8  # the trained controller's tau routes part of the tokens
        assert set(la["by_source"]) == {"ppl", "mqar", "niah_single", "niah_multikey", "niah_multivalue"}
        for q, v in la["quantiles"].items():
            assert abs(v - lb["quantiles"][q]) < 1e-5
        ta, tb = a["routing"]["trace"]["layers"][layer], b["routing"]["trace"]["layers"][layer]
        assert ta["routed"] == tb["routed"] and np.allclose(ta["scores"], tb["scores"], atol=1e-4)
    tr = a["routing"]["trace"]
    assert tr["task"] == "niah_single" and tr["length"] == 80 and len(tr["tokens"]) == 80
    assert tr["marks"]["answers"] == [[77, 80]] and len(tr["marks"]["needles"]) == 1


def test_kv_fraction_calibrates_both_sources_alike(trained, tmp_path, capsys):
    """--kv-fraction 0.25 on held-out text of a bare prefix (split all): the taus of the
    checkpoint and of the export agree, and exactly 25 % of the calibration tokens are routed."""
    reps = {}
    for name, src in (("ckpt", ["--checkpoint", trained["checkpoint"]]), ("hf", ["--hf", trained["hf"]])):
        out = str(tmp_path / f"{name}.json")
        rc, _, err = _eval(src + ["--data", trained["prefix"], "--tasks", "ppl,routing", "--kv-fraction", "0.25",
                                  "--ppl-samples", "4", "--calib-samples", "4", "--no-plots", "--out", out]
                           + COMMON, capsys)
        assert rc == 0, err
        reps[name] = json.load(open(out))
    a, b = reps["ckpt"], reps["hf"]
    assert a["perplexity"]["split"] == "all" and a["perplexity"]["kind"] == "prefix"
    assert a["routing_setup"]["mode"] == "kv_fraction" and a["routing_setup"]["calibration"]["tokens"] == 4 * 128
    assert a["recall"] is None and a["plots"] == {}
    for layer in ("0", "1"):
        ta, tb = a["routing_setup"]["taus"][layer], b["routing_setup"]["taus"][layer]
        assert abs(ta - tb) <= 1e-5 * abs(ta), (ta, tb)
        assert a["routing"]["layers"][layer]["fraction"] == 0.25 == b["routing"]["layers"][layer]["fraction"]
    # --tau sets the threshold directly: -inf routes every token
    out = str(tmp_path / "tau.json")
    rc, _, err = _eval(["--checkpoint", trained["checkpoint"], "--tasks", "mqar,routing", "--tau=-inf",
                        "--samples", "1", "--lengths", "80", "--num-pairs", "8", "--no-plots", "--no-progress",
                        "--out", out], capsys)
    assert rc == 0, err
    r = json.load(open(out))
    assert r["routing_setup"]["taus"] == {"0": "-inf", "1": "-inf"}
    assert all(v["fraction"] == 1.0 for v in r["routing"]["layers"].values())


def _split_docs(n_docs: int, split: str):
    """Document index ranges [a, b) of train / valid / test, as Megatron's builder computes them."""
    from megatron.core.datasets.blended_megatron_dataset_config import convert_split_vector_to_split_matrix
    from megatron.core.datasets.utils import normalize

    m = convert_split_vector_to_split_matrix(normalize([float(x) for x in split.split(",")]))
    return [None if r is None else (int(round(r[0] * n_docs)), int(round(r[1] * n_docs))) for r in m]


def _pieces_from(samples, docs, allowed):
    """Every EOD-free run of >= 12 tokens of every sample occurs in an allowed document and in
    no other document."""
    checked = 0
    for s in samples:
        toks = np.concatenate([np.asarray(s["tokens"]), np.asarray(s["labels"])[-1:]])
        for piece in np.split(toks, np.nonzero(toks == EOD)[0]):
            piece = piece[piece != EOD]
            if piece.size < 12:
                continue
            where = [i for i, d in enumerate(docs) if _contains(np.asarray(d), piece)]
            assert where and set(where) <= set(allowed), (where, allowed)
            checked += 1
    return checked


def _contains(hay: np.ndarray, needle: np.ndarray) -> bool:
    w = np.lib.stride_tricks.sliding_window_view(hay, needle.size)
    return bool((w == needle).all(1).any())


def test_heldout_splits_are_the_runs_documents(trained):
    from megatron_ham.eval.heldout import heldout
    from megatron_ham.eval.model_io import describe
    from eval_helpers import sample_documents

    docs = sample_documents()
    info = describe(checkpoint=trained["checkpoint"])
    ranges = _split_docs(len(docs), SPLIT)
    for split, rng in (("valid", ranges[1]), ("test", ranges[2])):
        ho = heldout(trained["blend"], info.run_config, split=split, num_samples=6, seq_length=128,
                     model_vocab=8000, eod_id=EOD)
        try:
            samples = [ho.dataset[i] for i in range(6)]
        finally:
            ho.close()
        assert _pieces_from(samples, docs, range(*rng)) >= 6, split
    from megatron_ham.eval.errors import EvalError

    with pytest.raises(EvalError, match="the run's data.split '98,2,0' has no test part"):
        cfg = info.run_config
        cfg.data.split = "98,2,0"
        heldout(trained["blend"], cfg, split="test", num_samples=2, seq_length=128, model_vocab=8000, eod_id=EOD)


def test_text_haystack_is_the_datasets_token_stream(trained):
    from megatron_ham.eval.recall import TextHaystack, TokenSpace, generate
    from eval_helpers import sample_documents

    space = TokenSpace(8000, exclude=(EOD,))
    hay = TextHaystack(trained["prefix"])
    stream = np.concatenate([np.asarray(d) for d in sample_documents()])
    for seed in range(3):
        ex = generate("niah_multikey", 600, seed, space, haystack=hay)
        inside = np.zeros(600, dtype=bool)
        for a, b in ex.info["needles"] + [ex.info["query"]]:
            inside[a:b] = True
        text = ex.tokens[~inside]
        forbidden = np.array([EOD] + list(space.markers.values())
                             + [x for g in ex.info["keys"] + ex.info["values"] for x in g])
        s = stream[~np.isin(stream, forbidden)]
        assert _contains(np.concatenate([s, s]), text), seed  # a contiguous stretch of real text
    with pytest.raises(ValueError, match="no IndexedDataset"):
        TextHaystack(trained["prefix"] + "_nope")


def test_bad_input_exits_2_naming_the_problem(trained, tmp_path, capsys):
    ck, hf = ["--checkpoint", trained["checkpoint"]], ["--hf", trained["hf"]]
    out = ["--out", str(tmp_path / "r.json"), "--no-progress"]
    other = write_blend(str(tmp_path / "other_vocab.json"), trained["prefix"], vocab_size=4000)
    larger = write_blend(str(tmp_path / "larger_vocab.json"), trained["prefix"], vocab_size=16000)
    os.symlink(trained["prefix"] + ".bin", str(tmp_path / "licenses.bin"))
    os.symlink(trained["prefix"] + ".idx", str(tmp_path / "licenses.idx"))
    gone = tmp_path / "gone.json"
    gone.write_text(json.dumps({"blend": [{"prefix": "missing_prefix", "weight": 1.0}]}))
    not_export = tmp_path / "llama"
    not_export.mkdir()
    (not_export / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    empty = tmp_path / "empty"
    empty.mkdir()
    wide = str(tmp_path / "wide")
    write_indexed(wide, [list(range(7990, 8010)) * 10 + [EOD]] * 4)
    cases = [
        (ck + ["--data", other, "--tasks", "ppl"], "tokenizer has vocab_size 4000 but the model was trained on data with vocab_size 8000"),
        (hf + ["--data", larger, "--tasks", "ppl"], "vocab_size 16000, larger than the model's vocabulary 8000"),
        (hf + ["--data", str(tmp_path / "nope"), "--tasks", "ppl"],
         "nope: no blend file and no IndexedDataset prefix there"),
        (ck + ["--data", str(gone), "--tasks", "ppl"], "no IndexedDataset at"),
        (["--hf", str(not_export)], "model_type 'llama', not 'megatron_ham': not a megatron-ham export"),
        (["--hf", str(empty)], "no config.json: not a Hugging Face model directory"),
        (["--hf", str(tmp_path / "absent")], "absent: not a directory"),
        (["--checkpoint", str(tmp_path / "absent")], "absent: no such file or directory"),
        (ck + ["--tasks", "mqar", "--lengths", "40"], "--lengths 40: too short for mqar"),
        (ck + ["--tasks", "ppl", "--data", wide, "--ppl-samples", "1"], "token id 8009 is outside the model's vocabulary"),
        (ck + ["--tasks", "niah_single", "--lengths", "80", "--samples", "1", "--haystack", wide],
         "token id 8009 is outside the vocabulary [0, 8000): the text was tokenized for another model"),
        (ck + ["--tasks", "recall,bogus"], "--tasks: unknown task 'bogus'"),
        (ck + ["--kv-fraction", "1.5"], "--kv-fraction must be in [0, 1]"),
        (ck + ["--tasks", "ppl", "--data", trained["blend"], "--split", "valid", "--run-config",
               str(tmp_path / "none.yaml")], "--run-config"),
    ]
    for argv, msg in cases:
        rc, _, err = _eval(argv + out, capsys)
        assert rc == 2, (argv, err[-2000:])
        assert f"ham-eval: error: " in err and msg in err, (msg, err[-2000:])
    assert not os.path.exists(tmp_path / "r.json")


def test_help_explains(capsys):
    from megatron_ham.eval.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("--checkpoint", "--hf", "--kv-fraction", "--tau", "mqar", "niah_multivalue", "routing",
                 "Exit codes: 0 ok, 2 bad input"):
        assert word in text, word
