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
    ("train.lr=-1", "train.lr"),  # not train.min_lr
    ("train.lr=.inf", "train.lr"),
    ("train.adam_eps=.nan", "train.adam_eps"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last"),  # not checkpoint.interval
    ("train.memory_budget_gib=-2", "train.memory_budget_gib"),
    ("model.num_layers=1000000000", "model.num_layers"),
    ("model.seq_length=100000000000", "model.seq_length"),  # no device holds its activations
    ("train.gradient_accumulation_fusion=maybe", "train.gradient_accumulation_fusion"),
    ("train.recompute=on", "train.recompute"),  # YAML's on/off only stand for "on"/"off"
])
def test_wrong_type_or_value_is_named(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert f"'{key}'" in str(e.value), str(e.value)


@pytest.mark.parametrize("value, want", [("on", "on"), ("off", "off"), ("auto", "auto"), ("'on'", "on")])
def test_on_off_settings_read_yaml_booleans(value, want):
    """YAML 1.1 reads on / off as booleans; a setting whose values are "on" / "off" takes them."""
    cfg = load_config(TINY, [f"train.gradient_accumulation_fusion={value}"])
    assert cfg.train.gradient_accumulation_fusion == want


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


def _alias_bomb() -> str:
    """The classic 'billion laughs' in YAML: ~750 bytes, 9^9 strings once constructed."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    lines.append("train: {lr: 0.001}")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_and_size_are_bounded(tmp_path):
    import time

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    assert 300 < bomb.stat().st_size < 800
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb.yaml: not valid YAML: aliases expand to more than"):
        load_config(str(bomb))
    assert time.perf_counter() - t0 < 5.0
    levels = ["&a [" + ",".join(["1"] * 9) + "]"]
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        levels.append(f"&{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    with pytest.raises(ConfigError, match="aliases expand"):  # the same bound for overrides
        load_config(TINY, ["data.weights=[" + ", ".join(levels) + "]"])
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"big.yaml: \d+ bytes; a recipe is at most"):
        load_config(str(big))
    loop = tmp_path / "loop.yaml"
    loop.write_text("a: &a [*a]\n")
    with pytest.raises(ConfigError, match="recursive alias|aliases expand|undefined alias"):
        load_config(str(loop))


def test_sweep_yaml_error_exits_2_without_traceback(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "sweep.yaml"
    bad.write_text("recipe: x.yaml\nruns: [\n")
    for path in (str(bad), str(tmp_path / "missing.yaml")):
        p = subprocess.run([sys.executable, "-m", "megatron_ham.training.sweep", path, "--count"],
                           cwd=REPO, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=REPO))
        assert p.returncode == 2 and path in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_on_off_words_reach_string_settings():
    """YAML 1.1 reads `on`/`off` as booleans: `model.fusions=on` still means "on"."""
    assert load_config(TINY, ["model.fusions=on"]).model.fusions == "on"
    assert load_config(TINY, ["model.fusions=off"]).model.fusions == "off"
