"""Checkpoints from elsewhere and damaged checkpoints, on real files of a real 2-rank run.

Attacks (a planted pickle payload in `.metadata`, in a BYTE_IO item of a shard -- rng_state,
an `_extra_state`, the optimizer's common state --, in `common.pt`; storage paths out of the
step dir; foreign formats): each payload is first shown to be live (plain pickle / torch.load
runs it and writes a marker file), then the project's loading path must refuse it, name the
file and the offending global, and leave no marker. Faults (a `latest` of random bytes,
truncated / emptied / changed files, with and without a manifest): the shared discovery must
name the step dir and the file and fall back to the newest usable earlier checkpoint.
The CLIs (ham-train, ham-convert-hf) are run on planted and damaged copies for the exit codes.
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from test_training_helpers import REPO, base_overrides, logs, read_metrics, run, write_learnable_dataset

from megatron_ham.training import checkpoint as ckpt
from megatron_ham.training import manifest as mf
from megatron_ham.training.safe_checkpoint import (CheckpointError, CorruptCheckpoint, UnsafeCheckpoint,
                                                  inspect_step_dir, read_metadata)

pytestmark = pytest.mark.slow
STEPS = 3


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def blend(tmp_path_factory):
    return write_learnable_dataset(str(tmp_path_factory.mktemp("data")))


def _overrides(blend, d):
    return base_overrides(blend, d) + [f"train.train_steps={STEPS}", "train.warmup_steps=1",
                                       "train.eval_interval=0", "checkpoint.interval=1"]


@pytest.fixture(scope="module")
def saved(blend, tmp_path_factory):
    """A 2-rank run that saved steps 1..3 (each with its manifest)."""
    d = str(tmp_path_factory.mktemp("saved"))
    assert run(2, _overrides(blend, d), f"{d}/log") == [0, 0], logs(f"{d}/log", 2)
    return d


@pytest.fixture
def ck(saved, tmp_path):
    """A private copy of the saved checkpoint dir."""
    dst = str(tmp_path / "checkpoints")
    shutil.copytree(f"{saved}/checkpoints", dst)
    return dst


def _step(ck, s):
    return os.path.join(ck, ckpt.step_dirname(s))


# ----------------------------------------------------------------------------- payloads
class _Payload:
    """Unpickling this runs `open(marker, 'w')` (the attacker's code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _live(blob: bytes, marker: str, loader) -> None:
    """The payload really runs under the loader torch / megatron would use (then clean up)."""
    loader(blob)
    assert os.path.exists(marker), "the planted payload did not run: the test proves nothing"
    os.remove(marker)


def _torch_blob(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _reseal(step_dir):
    """Rewrite the manifest as an attacker who controls the directory would."""
    mf.write_manifest(step_dir, 0, mf.hash_files(step_dir))


def _plant_item(step_dir, fqn_part, blob):
    """Append `blob` to the item's shard and point the item at it in `.metadata`."""
    md = read_metadata(step_dir)
    (idx, info), = [(i, s) for i, s in md.storage_data.items() if fqn_part in i.fqn][:1]
    path = os.path.join(step_dir, info.relative_path)
    info.offset, info.length = os.path.getsize(path), len(blob)
    with open(path, "ab") as f:
        f.write(blob)
    with open(os.path.join(step_dir, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    return info.relative_path, idx.fqn


# ----------------------------------------------------------------------------- attacks
def test_planted_metadata_pickle_is_refused(ck, tmp_path):
    marker = str(tmp_path / "marker")
    step = _step(ck, 3)
    md = read_metadata(step)
    md.storage_meta.modules = [_Payload(marker)]  # rides inside the real metadata object
    blob = pickle.dumps(md)
    _live(blob, marker, pickle.loads)
    open(os.path.join(step, ".metadata"), "wb").write(blob)
    _reseal(step)
    with pytest.raises(UnsafeCheckpoint, match=r"step_00000003/\.metadata: .*builtins\.exec"):
        next(ckpt.usable_checkpoints(ck))
    assert not os.path.exists(marker)


@pytest.mark.parametrize("item", ["rng_state", "in_proj._extra_state", "dp_group_idx_0.optimizer/"])
def test_planted_shard_object_is_refused(ck, tmp_path, item):
    marker = str(tmp_path / "marker")
    blob = _torch_blob({"state": _Payload(marker)})
    _live(blob, marker, lambda b: torch.load(io.BytesIO(b), weights_only=False))  # DCP's load_bytes
    step = _step(ck, 3)
    shard, fqn = _plant_item(step, item, blob)
    _reseal(step)
    with pytest.raises(UnsafeCheckpoint) as e:
        next(ckpt.usable_checkpoints(ck))
    msg = str(e.value)
    assert f"step_00000003/{shard}" in msg and fqn in msg and "builtin__.exec" in msg, msg  # torch.save pickles with protocol 2
    assert not os.path.exists(marker)


def test_planted_common_state_and_foreign_formats_are_refused(ck, tmp_path):
    marker = str(tmp_path / "marker")
    step = _step(ck, 3)
    good = open(os.path.join(step, "common.pt"), "rb").read()
    open(os.path.join(step, "common.pt"), "wb").write(_torch_blob({"x": _Payload(marker)}))
    with pytest.raises(UnsafeCheckpoint, match=r"common\.pt: the common state .*__builtin__\.exec"):
        inspect_step_dir(step)
    # the legacy (non-zip) torch format is several pickles in a row: never accepted
    buf = io.BytesIO()
    torch.save({"a": 1}, buf, _use_new_zipfile_serialization=False)
    open(os.path.join(step, "common.pt"), "wb").write(buf.getvalue())
    with pytest.raises(UnsafeCheckpoint, match="not a torch zip archive"):
        inspect_step_dir(step)
    open(os.path.join(step, "common.pt"), "wb").write(good)
    # another dist_checkpointing backend reads other files in other ways
    open(os.path.join(step, "metadata.json"), "w").write('{"sharded_backend": "zarr"}')
    with pytest.raises(UnsafeCheckpoint, match=r"metadata\.json: backends"):
        inspect_step_dir(step)
    assert not os.path.exists(marker)


def test_storage_paths_stay_in_the_step_dir(ck, tmp_path):
    step = _step(ck, 3)
    outside = tmp_path / "outside.distcp"
    shutil.copyfile(os.path.join(step, "__0_0.distcp"), outside)
    md = read_metadata(step)
    for info in md.storage_data.values():
        if info.relative_path == "__0_0.distcp":
            info.relative_path = "../../outside.distcp"
    with open(os.path.join(step, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(UnsafeCheckpoint, match=r"'\.\./\.\./outside\.distcp' is not a plain file name"):
        inspect_step_dir(step)
    # a shard that is a symbolic link to a file elsewhere
    step2 = _step(ck, 2)
    os.remove(os.path.join(step2, "__0_0.distcp"))
    os.symlink(outside, os.path.join(step2, "__0_0.distcp"))
    with pytest.raises(UnsafeCheckpoint, match=r"step_00000002/__0_0\.distcp: a symbolic link"):
        inspect_step_dir(step2)


# ----------------------------------------------------------------------------- faults
def _truncate(path, n=None):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2 if n is None else n)


def _flip(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("fault,name,expect", [
    ("truncate", "__0_0.distcp", "truncated"),
    ("truncate", ".metadata", "truncated"),
    ("truncate", "common.pt", "truncated"),
    ("empty", "__1_1.distcp", "0 bytes"),  # the shard holding optimizer states of rank 1
    ("flip", "__0_1.distcp", "SHA-256 differs"),
    ("legacy-truncate", "__0_0.distcp", "truncated?"),  # no manifest: the item bounds catch it
    ("legacy-truncate", ".metadata", "unreadable"),
])
def test_damaged_newest_checkpoint_falls_back(ck, fault, name, expect):
    step = _step(ck, 3)
    path = os.path.join(step, name)
    if fault.startswith("legacy"):
        os.remove(os.path.join(step, mf.MANIFEST))
    {"truncate": _truncate, "legacy-truncate": _truncate, "empty": lambda p: _truncate(p, 0),
     "flip": _flip}[fault](path)
    warnings = []
    got = next(ckpt.usable_checkpoints(ck, warn=warnings.append))
    assert got == _step(ck, 2)
    text = "\n".join(warnings)
    assert f"step_00000003/{name}" in text and expect in text and "falling back to" in text, text


def test_latest_of_random_bytes_and_nothing_usable(ck):
    open(os.path.join(ck, "latest"), "wb").write(os.urandom(40) + b"\xff\xfe")
    warnings = []
    assert next(ckpt.usable_checkpoints(ck, warn=warnings.append)) == _step(ck, 3)
    assert "does not hold a step dir name" in warnings[0]
    for s in (1, 2, 3):
        _truncate(os.path.join(_step(ck, s), "__0_0.distcp"))
    with pytest.raises(CorruptCheckpoint, match="none of the 3 complete checkpoint"):
        list(ckpt.usable_checkpoints(ck, warn=warnings.append))


def test_stale_temps_removed_others_kept(ck):
    os.makedirs(os.path.join(ck, ".tmp_step_00000009", "x"))
    open(os.path.join(ck, "latest.tmp.123"), "w").write("step_")
    os.rename(_step(ck, 3), os.path.join(ck, ".old_step_00000003"))  # killed mid re-save
    os.makedirs(os.path.join(ck, ".tmp_mine"))  # not a name this tool creates
    open(os.path.join(ck, "notes.txt"), "w").write("user file")
    removed = ckpt.remove_stale_temps(ck, warn=lambda m: None)
    assert removed == [".tmp_step_00000009", "latest.tmp.123"]
    assert os.path.isdir(_step(ck, 3)) and ckpt.verify_step(_step(ck, 3)) is None
    assert os.path.isdir(os.path.join(ck, ".tmp_mine")) and os.path.isfile(os.path.join(ck, "notes.txt"))


# ----------------------------------------------------------------------------- the CLIs
def _cli(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_resume_after_fallback_is_exact_and_leftovers_do_not_matter(blend, saved, tmp_path):
    """step_3 damaged: the trainer says so, resumes at step 2 and recomputes step 3 bitwise."""
    d = str(tmp_path)
    shutil.copytree(f"{saved}/checkpoints", f"{d}/checkpoints")
    _truncate(f"{d}/checkpoints/step_00000003/__0_1.distcp")
    os.makedirs(f"{d}/checkpoints/.tmp_step_00000004/junk")  # a killed save's leftovers
    assert run(2, _overrides(blend, d), f"{d}/log") == [0, 0], logs(f"{d}/log", 2)
    out = logs(f"{d}/log", 1)
    assert "step_00000003/__0_1.distcp" in out and "truncated" in out and "falling back to" in out, out
    assert f"resumed from {d}/checkpoints/step_00000002: step 2" in out
    assert not os.path.exists(f"{d}/checkpoints/.tmp_step_00000004")
    ref = {r["step"]: r for r in read_metrics(f"{saved}/metrics.jsonl")}
    new = read_metrics(f"{d}/metrics.jsonl")
    assert [r["step"] for r in new] == [3]
    for key in ("loss", "grad_norm", "lr", "kv"):
        assert new[0][key] == ref[3][key], (key, new[0][key], ref[3][key])
    ckpt.verify_step(f"{d}/checkpoints/step_00000003")  # re-saved, with a fresh manifest


def test_trainer_refuses_planted_checkpoint(blend, saved, tmp_path):
    marker = str(tmp_path / "marker")
    d = str(tmp_path / "run")
    shutil.copytree(f"{saved}/checkpoints", f"{d}/checkpoints")
    step = f"{d}/checkpoints/step_00000003"
    _plant_item(step, "rng_state/shard_1", _torch_blob([_Payload(marker)]))
    _reseal(step)
    assert run(1, _overrides(blend, d), f"{d}/log") == [2], logs(f"{d}/log", 1)
    out = logs(f"{d}/log", 1)
    assert "checkpoint error" in out and "__builtin__.exec" in out and "step_00000003/__" in out, out
    assert not os.path.exists(marker)


def test_converter_refuses_payload_and_names_unreadable_file(saved, tmp_path):
    marker = str(tmp_path / "marker")
    ck = str(tmp_path / "ck")
    shutil.copytree(f"{saved}/checkpoints", ck)
    step = f"{ck}/step_00000003"
    good_md = open(f"{step}/.metadata", "rb").read()
    md = read_metadata(step)
    md.storage_meta.modules = [_Payload(marker)]
    open(f"{step}/.metadata", "wb").write(pickle.dumps(md))
    _reseal(step)
    p = _cli(["megatron_ham.hf.convert", "--checkpoint", ck, "--output", str(tmp_path / "hf")])
    assert p.returncode == 2 and "builtins.exec" in p.stderr and "step_00000003/.metadata" in p.stderr, \
        p.stdout + p.stderr
    assert not os.path.exists(marker) and not os.path.exists(tmp_path / "hf")
    # no manifest (an older save) and a tensor record garbled in place: the pre-load checks pass,
    # torch raises CheckpointException (a BaseException): exit 2 naming the shard
    open(f"{step}/.metadata", "wb").write(good_md)
    os.remove(f"{step}/{mf.MANIFEST}")
    md = read_metadata(step)
    (info,) = [s for i, s in md.storage_data.items() if i.fqn == "embedding.word_embeddings.weight"][:1]
    with open(f"{step}/{info.relative_path}", "r+b") as f:
        f.seek(info.offset)
        f.write(b"\0" * info.length)
    p = _cli(["megatron_ham.hf.convert", "--checkpoint", step, "--output", str(tmp_path / "hf")])
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"step_00000003/{info.relative_path}" in p.stderr and "embedding.word_embeddings.weight" in p.stderr, \
        p.stderr
    assert "Traceback" not in p.stderr
