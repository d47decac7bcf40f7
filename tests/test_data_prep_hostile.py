"""ham-prep-data on hostile input: names that escape --out, files it must not delete or
overwrite, records and zstd bombs that would exhaust memory (run under RLIMIT_AS), inputs that
cannot be read, inputs without a document. Real files, the real CLI, the sample tokenizer."""
import json
import logging
import os
import resource
import subprocess
import sys

import pytest
import zstandard

from data_prep.cli import main
from data_prep.tokenizer import SAMPLE_TOKENIZER

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = (json.dumps({"text": "A good document about licences.\n"}) + "\n").encode()


def _run(args):
    return main(args + ["--no-progress", "--tokenizer", SAMPLE_TOKENIZER])


def _errors(caplog):
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def _stats(out, comp):
    return json.loads(open(os.path.join(out, "stats.json")).read())["components"][comp]


def _sentinels(*dirs):
    paths = []
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, "USER_FILE.txt")
        with open(p, "w") as f:
            f.write("mine")
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------ names
BAD_NAMES = ["..", ".", "", "../../x", "a/b", "x\ny", "a\0b", "-rf"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n) for n in BAD_NAMES])
def test_manifest_component_name_cannot_escape_out(tmp_path, caplog, name):
    data = tmp_path / "d.jsonl"
    data.write_bytes(GOOD)
    out = tmp_path / "parent" / "out"
    sentinels = _sentinels(str(out), str(tmp_path / "parent"))
    manifest = tmp_path / "m.yaml"
    manifest.write_text("components:\n  - name: " + json.dumps(name) + f"\n    files: [{data}]\n")
    assert _run(["--manifest", str(manifest), "--out", str(out)]) == 2
    msg = _errors(caplog)
    assert f"{manifest}: components[0].name" in msg, msg
    assert all(os.path.exists(p) for p in sentinels)
    assert sorted(os.listdir(out)) == ["USER_FILE.txt"]  # nothing written either


@pytest.mark.parametrize("spec", ["../..={f}", "..:0.5={f}", "a/b={f}", "-x={f}"])
def test_input_name_cannot_escape_out(tmp_path, caplog, spec):
    data = tmp_path / "d.jsonl"
    data.write_bytes(GOOD)
    out = tmp_path / "parent" / "out"
    sentinels = _sentinels(str(out), str(tmp_path / "parent"), str(tmp_path))
    arg = spec.format(f=data)
    assert _run([f"--input={arg}", "--out", str(out)]) == 2
    assert f"--input {arg!r}" in _errors(caplog)
    assert all(os.path.exists(p) for p in sentinels)


# ------------------------------------------------------------------------------------------ deletes
def test_user_files_in_out_survive_and_are_never_overwritten(tmp_path, caplog):
    data = tmp_path / "d.jsonl"
    data.write_bytes(GOOD * 3)
    out = tmp_path / "out"
    (user_notes,) = _sentinels(str(out))
    clash = out / "docs.bin"
    clash.write_bytes(b"my own binary")
    # an output name that exists and is not ours: refused, the file is untouched
    assert _run(["--input", f"docs={data}", "--out", str(out)]) == 2
    assert str(clash) in _errors(caplog) and clash.read_bytes() == b"my own binary"
    clash.unlink()
    assert _run(["--input", f"docs={data}", "--out", str(out), "--keep-parts"]) == 0
    # a user file put into the tool's work dir survives the next build of that component
    user_work = out / ".work" / "docs" / "USER_FILE.txt"
    user_work.write_text("mine too")
    data.write_bytes(GOOD * 4)  # the input changed: the component is rebuilt, its parts removed
    caplog.clear()
    assert _run(["--input", f"docs={data}", "--out", str(out)]) == 0
    assert os.path.exists(user_notes) and user_work.read_text() == "mine too"
    assert sorted(os.listdir(out / ".work" / "docs")) == ["USER_FILE.txt"]
    assert _stats(str(out), "docs")["documents"] == 4


def test_wds_out_never_deletes_a_foreign_directory(tmp_path, caplog):
    data = tmp_path / "d.jsonl"
    data.write_bytes(GOOD * 40)
    out, wds = tmp_path / "out", tmp_path / "wds"
    (sentinel,) = _sentinels(str(wds))
    args = ["--input", f"docs={data}", "--out", str(out), "--wds-out", str(wds), "--wds-seq-len", "8",
            "--wds-samples-per-shard", "16"]
    assert _run(args + ["--overwrite"]) == 2
    assert "not a webdataset export of ham-prep-data" in _errors(caplog) and os.path.exists(sentinel)
    os.remove(sentinel)
    old = os.umask(0o022)
    try:
        assert _run(args) == 0
    finally:
        os.umask(old)
    assert os.stat(wds).st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert all(os.stat(wds / n).st_mode & 0o777 == 0o644 for n in os.listdir(wds))
    # a file dropped into our own export survives --overwrite (kept aside, with a warning)
    (wds / "USER_FILE.txt").write_text("mine")
    caplog.clear()
    assert _run(args + ["--overwrite"]) == 0
    kept = [d for d in os.listdir(tmp_path) if d.startswith(".old_wds_")]
    assert len(kept) == 1 and os.listdir(tmp_path / kept[0]) == ["USER_FILE.txt"], kept
    assert "they are kept in" in _errors(caplog)


# ------------------------------------------------------------------------------------------ memory
def _bomb(path, gib: float) -> None:
    """A valid multi-frame zstd file of ``gib`` GiB of 'a' without a newline (~25 KB per GiB)."""
    frame = zstandard.ZstdCompressor(level=1).compress(b"a" * (128 << 20))
    with open(path, "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(GOOD))
        for _ in range(int(gib * 8)):
            f.write(frame)


def _limited_cli(args, cap_bytes):
    """The CLI in a fresh process whose address space is capped at ``cap_bytes``."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    env = dict(os.environ, PYTHONPATH=REPO, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "data_prep.cli", *args, "--no-progress", "--tokenizer",
                           SAMPLE_TOKENIZER], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, preexec_fn=cap)


CAP = 2 << 30     # bytes of address space; the tool itself peaks at ~1.1 GB on these inputs
LIMIT = 1 << 20   # --max-record-bytes for the test


def test_hostile_records_and_zstd_bomb_stay_within_memory(tmp_path, caplog):
    d = tmp_path / "in"
    d.mkdir()
    # a 64 MiB JSON line: ~9 GB to tokenize without the limit
    huge = b'{"text": "' + b"lorem ipsum, " * ((64 << 20) // 13) + b'"}\n'
    (d / "a_huge.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=1).compress(GOOD + huge + GOOD))
    # just above and just below the limit, in a plain jsonl file
    above = b'{"text": "' + b"x" * LIMIT + b'"}\n'
    below = b'{"text": "' + b"y " * ((LIMIT - 64) // 2) + b'"}\n'
    (d / "b_edge.jsonl").write_bytes(GOOD + above + below + GOOD)
    # 1.5 GiB without a newline behind one good line: more than the cap leaves free
    _bomb(d / "c_bomb.jsonl.zst", 1.5)
    out = tmp_path / "out"
    common = ["--input", f"c={d}/*", "--max-record-bytes", str(LIMIT)]
    r = _limited_cli(common + ["--out", str(out), "--on-error", "skip"], CAP)
    assert r.returncode == 0, r.stderr[-3000:]
    st = _stats(str(out), "c")
    assert st["problems"] == {"record_too_large": 3}, st["problems"]
    assert st["documents"] == 2 + 3 + 1 and st["records"] >= 6
    where = {(os.path.basename(e["file"]), e["line"]) for e in st["problem_examples"]}
    assert where == {("a_huge.jsonl.zst", 2), ("b_edge.jsonl", 2), ("c_bomb.jsonl.zst", 2)}, where
    # the dry run reads the bomb under the same cap
    r = _limited_cli(["--input", f"c={d}/c_bomb.jsonl.zst", "--max-record-bytes", str(LIMIT), "--dry-run",
                      "--dry-run-out", str(tmp_path / "plan.json")], CAP)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "plan.json").read_text())["components"]["c"]["estimated_documents"] == 1
    # --on-error fail stops at the first one, naming file and line
    assert _run(common + ["--out", str(tmp_path / "fail")]) == 3
    assert f"{d}/a_huge.jsonl.zst:2: record_too_large" in _errors(caplog)


# ------------------------------------------------------------------------------------------ unreadable
def _without_root_file_access():
    """preexec_fn: as root, drop CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH from the bounding set, so
    the exec'd process honours file permissions (mode 000 is unreadable) as any user would."""
    if os.geteuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unreadable_inputs_are_bad_inputs(tmp_path, caplog):
    d = tmp_path / "in"
    (d / "sub.jsonl").mkdir(parents=True)                           # a directory the glob matches
    os.symlink(tmp_path / "gone.jsonl", d / "dangling.jsonl")
    secret = d / "secret.jsonl"
    secret.write_bytes(GOOD)
    secret.chmod(0)
    (d / "ok.jsonl").write_bytes(GOOD * 2)
    # fail: the first bad input is named (in-process; no traceback)
    assert _run(["--input", f"c={d}/*.jsonl", "--out", str(tmp_path / "fail")]) == 3
    msg = _errors(caplog)
    assert f"{d}/dangling.jsonl: unreadable_file: dangling symbolic link" in msg, msg
    # skip: each is skipped and counted; the permission check needs a process without root's override
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "data_prep.cli", "--input", f"c={d}/*.jsonl", "--out", str(out),
                        "--on-error", "skip", "--no-progress", "--tokenizer", SAMPLE_TOKENIZER],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                       preexec_fn=_without_root_file_access)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    st = _stats(str(out), "c")
    assert st["problems"] == {"unreadable_file": 3} and st["documents"] == 2, st
    bad = {e["file"]: e["message"] for e in st["problem_examples"]}
    assert "is a directory" in bad[f"{d}/sub.jsonl"] and "dangling" in bad[f"{d}/dangling.jsonl"]
    assert "Permission denied" in bad[str(secret)], bad


# ------------------------------------------------------------------------------------------ no documents
def test_component_without_documents_is_never_written(tmp_path, caplog):
    empty, blank, ok = tmp_path / "empty.jsonl", tmp_path / "blank.jsonl", tmp_path / "ok.jsonl"
    empty.write_bytes(b"")
    blank.write_bytes(b"\n\n\n")
    ok.write_bytes(GOOD)
    out = tmp_path / "out"
    args = ["--input", f"e={empty},{blank}", "--input", f"ok={ok}", "--out", str(out)]
    assert _run(args) == 3
    assert "component 'e' produced no documents" in _errors(caplog)
    assert not (out / "e.bin").exists() and not (out / "e.idx").exists()
    caplog.clear()
    out = tmp_path / "skip"
    args = ["--input", f"e={empty},{blank}", "--input", f"ok={ok}", "--out", str(out)]
    assert _run(args + ["--on-error", "skip"]) == 0
    assert "left out of the blend" in _errors(caplog)
    assert not (out / "e.bin").exists() and not (out / "e.idx").exists() and (out / "ok.idx").exists()
    blend = json.loads((out / "blend.json").read_text())["blend"]
    assert [b["name"] for b in blend] == ["ok"] and blend[0]["weight"] == 1.0
    # nothing at all to train on: an error, and no blend file
    out2 = tmp_path / "out2"
    assert _run(["--input", f"e={empty},{blank}", "--out", str(out2), "--on-error", "skip"]) == 3
    assert not (out2 / "blend.json").exists() and not (out2 / "e.bin").exists()


def test_parquet_text_over_the_limit_is_a_bad_record(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["short one", "\u00e9" * (LIMIT // 2 + 1), "short two"]}), p)
    out = tmp_path / "out"
    assert _run(["--input", f"c={p}", "--out", str(out), "--on-error", "skip", "--max-record-bytes", str(LIMIT)]) == 0
    st = _stats(str(out), "c")
    assert st["problems"] == {"record_too_large": 1} and st["documents"] == 2
    assert st["problem_examples"][0]["line"] == 2 and f"{LIMIT + 2} bytes" in st["problem_examples"][0]["message"]
