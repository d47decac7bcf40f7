"""Checkpoints written by an earlier version still resume, load and export the same.

tests/fixtures/main_ckpt.tar.xz is a step-2 checkpoint `ham-train` wrote before the layer-kind
registry (commit 49d1f54; tests/fixtures/make_main_checkpoint.py says how): a hybrid "H*G" model
with the learned router, trained with synthetic tokens. main_ckpt_reference.json holds what that
version computed. Today's code must
  - resume it and log the same step 3 (loss, grad norm, lr, KV fraction): the model state loads
    into the same places (step 4 follows this version's KV-controller law);
  - give the same logits from the loaded model;
  - export the same tensors under the same names, and the same HF config.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

from _dist import run_world
from test_training_helpers import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
REF = json.load(open(os.path.join(FIXTURES, "main_ckpt_reference.json")))
STEP_DIR = f"step_{REF['step']:08d}"
# The export of the old checkpoint differs from the old export only here: the old exporter
# resolved the EOD id in its own order and found none, while training had used 0 with documents
# on; the export now uses what training used (docs/export.md "Documents").
EOD_KEYS = {"eod_token_id": 0, "eos_token_id": 0, "reset_at_eod": True}


def _env():
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """The fixture's checkpoint dir, unpacked (a run dir with `checkpoints/latest`)."""
    root = tmp_path_factory.mktemp("main_ckpt")
    with tarfile.open(os.path.join(FIXTURES, "main_ckpt.tar.xz")) as tar:
        tar.extractall(root, filter="data")
    return str(root)


def test_resume_old_checkpoint_same_steps(old_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(old_run, run)  # the other tests read the fixture's step 2 as `latest`
    ov = REF["overrides"] + [f"checkpoint.dir={run}/checkpoints", f"logging.jsonl={run}/m.jsonl",
                             f"logging.tensorboard_dir={run}/tb", "checkpoint.save_at_end=false"]
    env = dict(_env(), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29300 + os.getpid() % 600))
    p = subprocess.run([sys.executable, "-m", "megatron_ham.train", os.path.join(REPO, "recipes", "tiny_cpu.yaml"),
                        *ov], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"resumed from {run}/checkpoints/{STEP_DIR}" in p.stdout + p.stderr
    got = [{k: r[k] for k in ("step", "loss", "grad_norm", "lr", "kv")}
           for r in read_metrics(f"{run}/m.jsonl")]
    assert [r["step"] for r in got] == [r["step"] for r in REF["metrics"]]
    # Step 3 runs at the checkpoint's tau: everything is the old version's. The KV controller's
    # law changed since (quantile tracking, issue 16, docs/design.md "KV-fraction control"):
    # the tau it sets after step 3, hence step 4's routing and loss, are this version's own.
    g3, want3 = got[0], REF["metrics"][0]
    for key in ("loss", "grad_norm", "lr"):
        assert g3[key] == pytest.approx(want3[key], rel=1e-6, abs=1e-7), key
    for layer, v in want3["kv"].items():
        assert g3["kv"][layer]["fraction"] == v["fraction"]
    g4, want4 = got[1], REF["metrics"][1]
    assert g4["lr"] == pytest.approx(want4["lr"], rel=1e-6)
    assert g4["loss"] == pytest.approx(want4["loss"], rel=1e-3)
    for layer in want4["kv"]:
        assert 0.0 < g4["kv"][layer]["tau"] < 1.0


def _logits_worker(rank, world, step_dir, out):
    from megatron.core import dist_checkpointing

    from megatron_ham import distributed as D
    from megatron_ham.models import build_model, document_forward_kwargs
    from megatron_ham.training.config import load_run_config

    D.initialize(tp=1, pp=1, seed=0)
    cfg = load_run_config(os.path.join(step_dir, "config.yaml")).model
    model = build_model(cfg)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, step_dir)
    model.load_state_dict(state["model"], strict=True)
    model.eval()
    x = torch.arange(16).remainder(61).add(1)[None]
    x[0, 6] = 0
    with torch.no_grad():
        y = model(x, None, None, **document_forward_kwargs(x, 0)).float()
    torch.save(y if y.shape[0] == 1 else y.transpose(0, 1), out)


def test_old_checkpoint_same_logits(old_run, tmp_path):
    out = str(tmp_path / "logits.pt")
    run_world(_logits_worker, 1, os.path.join(old_run, "checkpoints", STEP_DIR), out)
    got = torch.load(out)[0]
    want = torch.tensor(REF["logits"])
    assert (got - want).abs().max().item() < 1e-6


def test_old_checkpoint_same_export(old_run, tmp_path):
    from safetensors import safe_open
    import hashlib

    out = str(tmp_path / "hf")
    p = subprocess.run([sys.executable, "-m", "megatron_ham.hf.convert", "--checkpoint",
                        os.path.join(old_run, "checkpoints"), "--output", out],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = {}
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k).contiguous()
            got[k] = [list(t.shape), hashlib.sha256(t.numpy().tobytes()).hexdigest()]
    assert got == REF["export_tensors"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    for key, want in REF["export_config"].items():
        if key in EOD_KEYS:
            want = EOD_KEYS[key]
        if key == "transformers_version":  # the installed transformers' own stamp, not the model's
            continue
        assert cfg.get(key) == want, (key, cfg.get(key), want)
    # the export's logits are the old Megatron model's; and a config.json without the fields
    # this version added (kind_symbols, fused_sections: an older export) loads the same
    import megatron_ham.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    x = torch.arange(16).remainder(61).add(1)[None]
    x[0, 6] = 0
    want = torch.tensor(REF["logits"])
    for strip in (False, True):
        if strip:
            for key in ("kind_symbols", "fused_sections"):
                cfg.pop(key)
            json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
        m = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            assert (m(x).logits[0] - want).abs().max().item() < 1e-6, strip
