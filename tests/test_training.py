"""The pretraining loop on 2 CPU ranks (gloo): learning, exact resumption, signals, checkpoints.

Each 2-rank run is real: torch.distributed (gloo), Megatron DDP + distributed optimizer,
pipeline schedule, dist_checkpointing, the tiny HAM of recipes/tiny_cpu.yaml on a learnable
IndexedDataset read through GPTDataset / BlendedMegatronDatasetBuilder.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from test_training_helpers import (
    base_overrides,
    launch,
    logs,
    read_metrics,
    run,
    wait,
    write_learnable_dataset,
)

pytestmark = pytest.mark.slow
EXIT_REQUEUE = 75
STEPS = 8


@pytest.fixture(scope="module")
def blend(tmp_path_factory):
    return write_learnable_dataset(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def full_run(blend, tmp_path_factory):
    """An uninterrupted 2-rank run of STEPS steps."""
    d = str(tmp_path_factory.mktemp("full"))
    ov = base_overrides(blend, d) + [f"train.train_steps={STEPS}", "train.warmup_steps=2",
                                     "train.eval_interval=4", "checkpoint.interval=0"]
    codes = run(2, ov, f"{d}/log")
    assert codes == [0, 0], logs(f"{d}/log", 2)
    return d


def test_two_rank_loss_falls(full_run):
    rows = read_metrics(f"{full_run}/metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.5, losses  # ln(128) = 4.85 at the start
    first = rows[0]
    for key in ("lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "step_time_s"):
        assert first[key] == first[key] and first[key] > 0, key
    # per-layer KV fraction and tau of both HAM layers are logged every step
    assert sorted(first["kv"]) == ["1", "2"]
    assert all(0.0 <= v["fraction"] <= 1.0 for v in first["kv"].values())
    valid = read_metrics(f"{full_run}/metrics.jsonl", "valid")
    assert [v["step"] for v in valid] == [4, 8] and all(v["loss"] > 0 for v in valid)
    # a complete checkpoint at the end, published through `latest`
    ck = f"{full_run}/checkpoints"
    assert open(f"{ck}/latest").read().strip() == f"step_{STEPS:08d}"
    state = json.load(open(f"{ck}/step_{STEPS:08d}/train_state.json"))
    assert state["step"] == STEPS and state["consumed_samples"] == STEPS * 8
    assert os.path.exists(f"{full_run}/tb")


def test_resume_is_bitwise_exact(blend, full_run, tmp_path):
    d = str(tmp_path)
    ov = base_overrides(blend, d) + [f"train.train_steps={STEPS}", "train.warmup_steps=2",
                                     "train.eval_interval=4", "checkpoint.interval=0"]
    k = 3
    assert run(2, ov, f"{d}/log1", preempt_after=k) == [EXIT_REQUEUE] * 2, logs(f"{d}/log1", 2)
    ck = f"{d}/checkpoints"
    assert open(f"{ck}/latest").read().strip() == f"step_{k:08d}"
    # debris of killed saves must be ignored: a temp dir and a newer dir without the marker
    os.makedirs(f"{ck}/.tmp_step_00000005")
    os.makedirs(f"{ck}/step_00000006")
    open(f"{ck}/step_00000006/metadata.json", "w").write("{}")
    assert run(2, ov, f"{d}/log2") == [0, 0], logs(f"{d}/log2", 2)
    assert f"resumed from {ck}/step_{k:08d}" in logs(f"{d}/log2", 1)
    full = {r["step"]: r for r in read_metrics(f"{full_run}/metrics.jsonl")}
    resumed = {r["step"]: r for r in read_metrics(f"{d}/metrics.jsonl")}
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        for key in ("loss", "grad_norm", "lr"):
            assert resumed[s][key] == full[s][key], (s, key, resumed[s][key], full[s][key])
        assert resumed[s]["kv"] == full[s]["kv"], s
    fv = read_metrics(f"{full_run}/metrics.jsonl", "valid")
    rv = read_metrics(f"{d}/metrics.jsonl", "valid")
    assert [v["loss"] for v in rv] == [v["loss"] for v in fv]


def test_signal_saves_and_exits_with_requeue_code(blend, tmp_path):
    d = str(tmp_path)
    ov = base_overrides(blend, d) + ["train.train_steps=500", "checkpoint.interval=0",
                                     "train.eval_interval=0"]
    procs = launch(2, ov, f"{d}/log")
    deadline = time.time() + 240
    while time.time() < deadline:
        rows = read_metrics(f"{d}/metrics.jsonl")
        if rows and rows[-1]["step"] >= 2 or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.5)
    assert all(p.poll() is None for p in procs), logs(f"{d}/log", 2)
    procs[1].send_signal(signal.SIGUSR1)  # one rank only: the ranks must agree to stop
    codes = wait(procs, 180)
    assert codes == [EXIT_REQUEUE, EXIT_REQUEUE], logs(f"{d}/log", 2)
    ck = f"{d}/checkpoints"
    name = open(f"{ck}/latest").read().strip()
    state = json.load(open(f"{ck}/{name}/train_state.json"))
    last_logged = read_metrics(f"{d}/metrics.jsonl")[-1]["step"]
    assert state["step"] == last_logged and 2 <= state["step"] < 500
    assert state["consumed_samples"] == state["step"] * 8
    assert not [n for n in os.listdir(ck) if n.startswith(".tmp_")]


def test_pipeline_parallel_resume_and_keep_last(blend, tmp_path):
    """pp=2 (1F1B over gloo p2p): interrupted + resumed == uninterrupted; keep_last prunes."""
    ov = lambda d: base_overrides(blend, d) + [  # noqa: E731
        "parallel.pp=2", "train.global_batch_size=4", "train.train_steps=4", "train.warmup_steps=1",
        "train.eval_interval=0"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run(2, ov(a), f"{a}.log") == [0, 0], logs(f"{a}.log", 2)
    assert run(2, ov(b) + ["checkpoint.interval=1", "checkpoint.keep_last=1"], f"{b}.log1",
               preempt_after=2) == [EXIT_REQUEUE] * 2, logs(f"{b}.log1", 2)
    assert sorted(n for n in os.listdir(f"{b}/checkpoints") if n.startswith("step_")) == ["step_00000002"]
    assert run(2, ov(b), f"{b}.log2") == [0, 0], logs(f"{b}.log2", 2)
    la = [(r["step"], r["loss"], r["grad_norm"], r["kv"]) for r in read_metrics(f"{a}/metrics.jsonl")]
    lb = [(r["step"], r["loss"], r["grad_norm"], r["kv"]) for r in read_metrics(f"{b}/metrics.jsonl")]
    assert la == lb and [x[0] for x in la] == [1, 2, 3, 4]
    assert sorted(la[0][3]) == ["1", "2"]  # KV stats of both stages' layers reach rank 0
