"""Recipe loading and validation (no processes): errors name the key and its source."""
from __future__ import annotations

import glob
import os

import pytest

from megatron_ham.training import checkpoint as ckpt
from megatron_ham.training.config import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "recipes", "tiny_cpu.yaml")


def test_tiny_recipe_loads_with_overrides():
    cfg = load_config(TINY, ["train.lr=3e-4", "model.num_layers=3", "data.weights=[1, 2]",
                             "data.prefixes=[a, b]", "logging.peak_tflops=null"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.num_layers == 3 and cfg.model.resolved_pattern() == "HHH"
    assert cfg.data.weights == [1.0, 2.0] and cfg.name == "tiny-cpu"


@pytest.mark.parametrize("override, key", [
    ("train.lrr=3e-4", "train.lrr"),
    ("model.num_layer=2", "model.num_layer"),
    ("bogus.x=1", "bogus"),
])
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert f"unknown key '{key}'" in str(e.value) and override in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("train.lr=fast", "train.lr"),
    ("train.train_steps=1.5", "train.train_steps"),
    ("train.overlap_grad_reduce=1", "train.overlap_grad_reduce"),
    ("model.hidden_size=big", "model.hidden_size"),
    ("train.lr_decay_style=exp", "train.lr_decay_style"),
    ("train.global_batch_size=7", "train.global_batch_size"),
    ("model.kv_fraction=1.5", "model.kv_fraction"),
])
def test_wrong_type_or_value_is_named(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert f"'{key}'" in str(e.value), str(e.value)


@pytest.mark.parametrize("override", ["train.lr", "=3", "train..lr=1"])
def test_bad_override_syntax(override):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert override in str(e.value)


def test_error_in_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {TINY}\ntrain:\n  warmup_stepz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    assert str(bad) in str(e.value) and "train.warmup_stepz" in str(e.value)
    bad.write_text(f"base: {TINY}\ntrain:\n  clip_grad: [1]\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    assert str(bad) in str(e.value) and "train.clip_grad" in str(e.value)


def test_base_inheritance_merges_sections(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {TINY}\nname: child\ntrain:\n  lr: 0.5\n")
    cfg = load_config(str(child))
    assert cfg.name == "child" and cfg.train.lr == 0.5
    assert cfg.train.global_batch_size == load_config(TINY).train.global_batch_size


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "recipes", "*.yaml"))))
def test_every_shipped_recipe_validates(path):
    cfg = load_config(path)  # base files (_*.yaml) validate too
    if "800m" in path and not os.path.basename(path).startswith("_"):
        assert cfg.model.seq_length == 16384 and cfg.train.global_batch_size == 32
        assert cfg.train.lr == 1e-4 and cfg.model.dtype == "bf16"
        assert 94_000 <= cfg.train.train_steps <= 96_000


def test_sweep_file_expands_to_valid_runs():
    from megatron_ham.training.sweep import load_sweep

    runs = load_sweep(os.path.join(REPO, "recipes", "sweeps", "ham_800m_kv.yaml"))
    assert len(runs) >= 3
    fracs = [load_config(r[0], r[1:]).model.kv_fraction for r in runs]
    assert len(set(fracs)) == len(fracs)
    assert len({r[2] for r in runs}) == len(runs)  # distinct checkpoint dirs


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    root = str(tmp_path)

    def make(name, complete):
        os.makedirs(os.path.join(root, name))
        open(os.path.join(root, name, "metadata.json"), "w").write("{}")
        if complete:
            open(os.path.join(root, name, ckpt.MARKER), "w").write('{"step": 1}')

    assert ckpt.find_latest(root) is None
    make("step_00000010", True)
    make("step_00000020", False)  # killed after the shards, before the marker
    os.makedirs(os.path.join(root, ".tmp_step_00000030"))  # killed mid-save
    assert ckpt.find_latest(root) == os.path.join(root, "step_00000010")
    open(os.path.join(root, "latest"), "w").write("step_00000020\n")  # pointer to incomplete
    assert ckpt.find_latest(root) == os.path.join(root, "step_00000010")
    make("step_00000040", True)  # complete but not yet published: newest complete wins
    open(os.path.join(root, "latest"), "w").write("step_00000010\n")
    assert ckpt.find_latest(root) == os.path.join(root, "step_00000010")
    os.remove(os.path.join(root, "latest"))
    assert ckpt.find_latest(root) == os.path.join(root, "step_00000040")
