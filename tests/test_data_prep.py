"""ham-prep-data: round trip through GPTDataset, resumption after SIGKILL, bad input, webdataset
shards, determinism over worker counts. Real megatron-core, real tokenizer (the sample's)."""
import json
import logging
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from data_prep.cli import main
from data_prep.tokenizer import SAMPLE_TOKENIZER, MegatronTokenizerAdapter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data_prep", "sample")


def _sample_texts(rel="pretrain/licenses.jsonl.zst", n=None, max_chars=None):
    with open(os.path.join(SAMPLE, rel), "rb") as f:
        data = zstandard.ZstdDecompressor().decompress(f.read(), max_output_size=1 << 28)
    texts = [json.loads(x)["text"] for x in data.splitlines()]
    texts = texts[:n] if n else texts
    return [t[:max_chars] for t in texts] if max_chars else texts


def _write_zst(path, lines, frames=1):
    raw = b"".join(x if isinstance(x, bytes) else (json.dumps(x) + "\n").encode() for x in lines)
    cctx = zstandard.ZstdCompressor(level=3)
    step = max(1, len(raw) // frames + 1)
    with open(path, "wb") as f:
        for i in range(0, len(raw), step):
            f.write(cctx.compress(raw[i:i + step]))


def _run(args):
    return main(args + ["--no-progress", "--tokenizer", SAMPLE_TOKENIZER])


def _read_bytes(out, names):
    return {n + ext: open(os.path.join(out, n + ext), "rb").read() for n in names for ext in (".bin", ".idx")}


# ------------------------------------------------------------------------------------------ round trip
def test_round_trip_through_gpt_dataset(tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from data_prep.pipeline import load_blend

    texts = _sample_texts(n=6) + ["Short doc with unicode: caf\u00e9 \u2014 na\u00efve \U0001F600\n"]
    src = tmp_path / "in.jsonl.zst"
    _write_zst(src, [{"text": t, "meta": {"i": i}} for i, t in enumerate(texts)], frames=3)
    out = tmp_path / "out"
    assert _run(["--input", f"docs={src}", "--out", str(out), "--workers", "1"]) == 0

    prefixes, weights = load_blend(str(out / "blend.json"))
    assert weights == [1.0] and prefixes == [str(out / "docs")]
    tok = MegatronTokenizerAdapter(SAMPLE_TOKENIZER)
    seq = 256
    total = int(np.fromfile(str(out / "docs.bin"), dtype=np.uint16).size)
    n_samples = (total - 1) // seq
    cfg = GPTDatasetConfig(random_seed=7, sequence_length=seq, blend=(prefixes, None), split="1,0,0",
                           tokenizer=tok, reset_position_ids=False, reset_attention_mask=False,
                           eod_mask_loss=False, create_attention_mask=False,
                           path_to_cache=str(tmp_path / "cache"))
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [n_samples, None, None], lambda: True, cfg).build()
    assert isinstance(train, GPTDataset) and len(train) == n_samples
    # undo GPTDataset's sample shuffle; the token stream is then the documents in document_index order
    inv = np.empty_like(train.shuffle_index[:n_samples])
    inv[train.shuffle_index[:n_samples]] = np.arange(n_samples)
    parts = [train[int(inv[s])] for s in range(n_samples)]
    stream = np.concatenate([p["tokens"].numpy() for p in parts] + [parts[-1]["labels"].numpy()[-1:]])
    assert all(np.array_equal(p["labels"].numpy()[:-1], p["tokens"].numpy()[1:]) for p in parts)
    eod_pos = np.flatnonzero(stream == tok.eod)
    starts = np.concatenate([[0], eod_pos[:-1] + 1])
    order = train.document_index
    checked = 0
    for k, (a, b) in enumerate(zip(starts, eod_pos)):
        doc = texts[int(order[k])]
        assert tok.detokenize(stream[a:b + 1]) == doc + "<|endoftext|>"
        checked += 1
    assert checked >= len(texts) - 1  # every document that fits in the epoch's samples


# ------------------------------------------------------------------------------------------ resumption
def _cli_subprocess(args, kill=None):
    """ham-prep-data in a subprocess; kill="blocks=N" / "files=N" SIGKILLs it at that point
    (tests/_prep_killed.py)."""
    cmd = ["-m", "data_prep.cli"] if kill is None else [os.path.join(REPO, "tests", "_prep_killed.py"), kill]
    return subprocess.run([sys.executable, *cmd, *args, "--no-progress", "--tokenizer", SAMPLE_TOKENIZER],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    texts = _sample_texts(max_chars=6000)
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(3):
        _write_zst(inp / f"part{i}.jsonl.zst", [{"text": t} for t in texts[i::3]])
    common = ["--input", f"lic={inp}/*.jsonl.zst", "--input", f"one={inp}/part0.jsonl.zst",
              "--batch-bytes", "4096", "--workers", "2"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert _run(common + ["--out", str(ref)]) == 0

    # 1) killed in the middle of the first file: nothing looks finished
    r = _cli_subprocess(common + ["--out", str(out)], kill="blocks=2")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not (out / "lic.idx").exists() and not (out / "lic.bin").exists()
    assert not list((out / ".work" / "lic").glob("*.idx"))
    # 2) killed right after finishing file 2 of 3
    r = _cli_subprocess(common + ["--out", str(out)], kill="files=2")
    assert r.returncode == -signal.SIGKILL, r.stderr
    state = json.loads((out / ".work" / "state.json").read_text())
    assert sorted(state["components"]["lic"]["files"]) == ["0", "1"]
    assert not (out / "lic.idx").exists()
    # 3) re-run: skips the two finished files, completes, same bytes as the uninterrupted run
    r = _cli_subprocess(common + ["--out", str(out)])
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("finished in an earlier run, skipped") == 2
    assert _read_bytes(out, ["lic", "one"]) == _read_bytes(ref, ["lic", "one"])
    # 4) a further re-run does nothing
    r = _cli_subprocess(common + ["--out", str(out)])
    assert r.returncode == 0 and r.stderr.count("up to date") == 2, r.stderr


# ------------------------------------------------------------------------------------------ bad input
GOOD = {"text": "A good document.\n"}


def _bad_cases(tmp_path):
    good = (json.dumps(GOOD) + "\n").encode()
    cases = {}
    p = tmp_path / "malformed.jsonl"
    p.write_bytes(good + b'{"text": "unterminated\n' + good)
    cases["malformed_json"] = (p, 2)
    p = tmp_path / "missing.jsonl.zst"
    _write_zst(p, [GOOD, GOOD, {"meta": {"x": 1}}])
    cases["missing_field"] = (p, 3)
    p = tmp_path / "utf8.jsonl"
    p.write_bytes(good + good + good + b'{"text": "bad \xff\xfe byte"}\n')
    cases["invalid_utf8"] = (p, 4)
    p = tmp_path / "trunc.jsonl.zst"
    full = tmp_path / "full.jsonl.zst"
    _write_zst(full, [{"text": t} for t in _sample_texts(n=4)], frames=4)
    data = full.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    cases["truncated_zstd"] = (p, None)
    return cases


@pytest.mark.parametrize("kind", ["malformed_json", "missing_field", "invalid_utf8", "truncated_zstd"])
def test_bad_input_fails_with_file_and_line_then_skips(tmp_path, caplog, kind):
    path, line = _bad_cases(tmp_path)[kind]
    caplog.set_level(logging.INFO, logger="data_prep")
    rc = _run(["--input", f"c={path}", "--out", str(tmp_path / "fail")])
    assert rc == 3
    msg = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert kind in msg and str(path) in msg, msg
    if line is not None:
        assert f"{path}:{line}:" in msg, msg
    assert not (tmp_path / "fail" / "c.idx").exists()

    rc = _run(["--input", f"c={path}", "--out", str(tmp_path / "skip"), "--on-error", "skip"])
    assert rc == 0
    stats = json.loads((tmp_path / "skip" / "stats.json").read_text())["components"]["c"]
    assert stats["problems"] == {kind: 1}
    ex = stats["problem_examples"][0]
    assert ex["file"] == str(path) and ex["kind"] == kind
    if line is not None:
        assert ex["line"] == line and stats["documents"] == stats["records"] - 1
    else:  # truncated: the complete lines before the cut are kept
        assert 1 <= stats["documents"] < 4


def test_empty_documents_are_skipped_and_counted(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text(json.dumps(GOOD) + "\n" + json.dumps({"text": "  \n"}) + "\n" + json.dumps(GOOD) + "\n")
    assert _run(["--input", f"c={p}", "--out", str(tmp_path / "o")]) == 0
    st = json.loads((tmp_path / "o" / "stats.json").read_text())["components"]["c"]
    assert st["documents"] == 2 and st["problems"] == {"empty_document": 1}
    assert st["problem_examples"][0]["line"] == 2 and st["problem_examples"][0]["file"] == str(p)


def test_bad_arguments_exit_2(tmp_path):
    assert _run(["--input", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert _run(["--manifest", "sample", "--out", str(tmp_path / "o"), "--workers", "0"]) == 2


# ------------------------------------------------------------------------------------------ determinism
def test_one_and_two_workers_write_identical_bytes(tmp_path):
    texts = _sample_texts(max_chars=8000)
    src = tmp_path / "in.jsonl.zst"
    _write_zst(src, [{"text": t} for t in texts])
    outs = []
    for w in (1, 2):
        out = tmp_path / f"w{w}"
        assert _run(["--input", f"d={src}", "--out", str(out), "--workers", str(w), "--batch-bytes", "8192"]) == 0
        outs.append(_read_bytes(out, ["d"]))
    assert outs[0] == outs[1]
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(str(tmp_path / "w2" / "d"))
    assert len(ds) == len(texts) and ds.index.dtype == np.uint16
    assert all(int(ds[i][-1]) == 0 for i in range(len(ds)))  # EOD (id 0) ends every document
    # the block-wise writer produces what IndexedDatasetBuilder.add_document per document does
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    b = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for i in range(len(ds)):
        b.add_document(ds[i], [len(ds[i])])
    b.finalize(str(tmp_path / "ref.idx"))
    assert outs[1] == {"d.bin": (tmp_path / "ref.bin").read_bytes(), "d.idx": (tmp_path / "ref.idx").read_bytes()}


# ------------------------------------------------------------------------------------------ webdataset
def test_webdataset_shards_read_back_split_over_ranks_and_workers(tmp_path):
    import torch

    from data_prep.webdataset_io import PackedSequenceDataset

    src = tmp_path / "in.jsonl.zst"
    _write_zst(src, [{"text": t} for t in _sample_texts(max_chars=5000)])
    par = tmp_path / "in.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": _sample_texts("fine-tune/python_docs_titles.jsonl.zst", n=3, max_chars=4000)}),
                   par)
    out, wds_dir = tmp_path / "out", tmp_path / "wds"
    seq = 64
    assert _run(["--input", f"a:3={src}", "--input", f"b:1={par}", "--out", str(out), "--wds-out", str(wds_dir),
                 "--wds-seq-len", str(seq), "--wds-shard-multiple", "4", "--wds-samples-per-shard", "50"]) == 0
    index = json.loads((wds_dir / "index.json").read_text())
    assert index["num_shards"] % 4 == 0 and index["sample_tokens"] == seq + 1
    windows = set()
    for name in ("a", "b"):
        s = np.fromfile(str(out / f"{name}.bin"), dtype=np.uint16)
        windows |= {s[i * seq:i * seq + seq + 1].tobytes() for i in range((s.size - 1) // seq)}
    seen = []
    for rank in range(2):
        ds = PackedSequenceDataset(str(wds_dir), rank=rank, world_size=2)
        dl = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
        got = [row for batch in dl for row in batch["tokens"]]
        assert len(got) == ds.samples_per_rank(num_workers=2) == index["num_samples"] // 2
        assert all(t.dtype == torch.int64 and t.shape == (seq + 1,) for t in got)
        seen += [t.numpy().astype(np.uint16).tobytes() for t in got]
    assert len(seen) == index["num_samples"]
    assert all(s in windows for s in seen)  # every sample is a real window of a component
    lab = next(iter(PackedSequenceDataset(str(wds_dir), return_labels=True)))
    assert lab["tokens"].shape == lab["labels"].shape == (seq,)
    assert torch.equal(lab["tokens"][1:], lab["labels"][:-1])
    with pytest.raises(ValueError, match="split evenly"):
        PackedSequenceDataset(str(wds_dir), rank=0, world_size=3).shards_for(0, 1)


# ------------------------------------------------------------------------------------------ dry run / sample
def test_dry_run_on_sample_manifest_estimates_budget(tmp_path, capsys):
    dest = tmp_path / "dry.json"
    assert main(["--manifest", "sample", "--dry-run", "--budget", "1M", "--sample-bytes", "20000",
                 "--no-progress", "--dry-run-out", str(dest)]) == 0
    res = json.loads(dest.read_text())
    comps = res["components"]
    assert set(comps) == {"python_docs_library", "python_docs_guides", "licenses", "python_docs_titles"}
    assert comps["licenses"]["exact"] is False or comps["licenses"]["estimated_documents"] == 14
    for c in comps.values():
        assert c["estimated_tokens"] > 0 and c["epochs"] == pytest.approx(c["budget_tokens"] / c["estimated_tokens"])
    assert sum(c["budget_tokens"] for c in comps.values()) == pytest.approx(1_000_000, abs=4)
    assert not list(tmp_path.glob("*.bin"))
    assert "epochs" in capsys.readouterr().out


def test_sample_tokenizer_loads_with_auto_tokenizer_and_has_eos():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(SAMPLE_TOKENIZER)
    assert tok.eos_token == "<|endoftext|>" and len(tok) <= 8192
    text = _sample_texts(n=1, max_chars=2000)[0]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(SAMPLE) for f in fs)
    assert size < 6 * 2 ** 20


def test_part_merge_equals_megatron_add_index(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    texts = _sample_texts(max_chars=3000)
    for i in range(2):
        _write_zst(tmp_path / f"p{i}.jsonl.zst", [{"text": t} for t in texts[i::2]])
    out = tmp_path / "o"
    assert _run(["--input", f"m={tmp_path}/p*.jsonl.zst", "--out", str(out), "--keep-parts"]) == 0
    parts = sorted(str(p)[:-4] for p in (out / ".work" / "m").glob("*.idx"))
    assert len(parts) == 2
    b = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for p in parts:
        b.add_index(p)
    b.finalize(str(tmp_path / "ref.idx"))
    assert _read_bytes(out, ["m"]) == {"m.bin": (tmp_path / "ref.bin").read_bytes(),
                                       "m.idx": (tmp_path / "ref.idx").read_bytes()}


def test_long_data_collections_manifest_on_a_miniature_copy(tmp_path, caplog):
    """The shipped manifest's file names/fields on a tiny local copy without book.jsonl.zst."""
    import yaml

    from data_prep.manifest import BUILTIN, load_manifest

    with pytest.raises(ValueError, match="rp_sub.jsonl.zst"):  # names every missing file
        load_manifest("long-data-collections", str(tmp_path))
    with open(BUILTIN["long-data-collections"]) as f:
        comps = yaml.safe_load(f)["components"]
    texts = _sample_texts(n=2, max_chars=1500)
    root = tmp_path / "ldc"
    for c in comps:
        if c["name"] == "book":
            continue
        for pat in c["files"]:
            (root / os.path.dirname(pat)).mkdir(parents=True, exist_ok=True)
            if c["kind"] == "fine-tune":
                recs = [{"prompt": t, "completion": "x", "text": t + "x"} for t in texts]
            else:
                recs = [{"text": t, "meta": {"source": "test"}} for t in texts]
            _write_zst(root / pat, recs)
    caplog.set_level(logging.WARNING, logger="data_prep")
    out = tmp_path / "out"
    assert _run(["--manifest", "long-data-collections", "--data-root", str(root), "--out", str(out),
                 "--revision", "test-rev"]) == 0
    assert any("book" in r.getMessage() for r in caplog.records)
    blend = json.loads((out / "blend.json").read_text())
    names = [b["name"] for b in blend["blend"]]
    assert "book" not in names and len(names) == 8 and blend["revision"] == "test-rev"
    assert sum(b["weight"] for b in blend["blend"]) == pytest.approx(1.0)
