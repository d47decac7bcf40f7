"""Launch-time checks without a cluster: sweep run names (path escape, argument injection),
sweep YAML errors, and slurm/submit.sh checking data / tokenizer paths before sbatch and finding
the checkout's .venv Python without HAM_PYTHON."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from test_training_helpers import REPO, write_learnable_dataset


def _sweep(tmp_path, runs: str, root: str = "") -> str:
    p = tmp_path / "sweep.yaml"
    p.write_text(f"recipe: {REPO}/recipes/tiny_cpu.yaml\noutput_root: {root or tmp_path / 'runs'}\nruns:\n" + runs)
    return str(p)


@pytest.mark.parametrize("name", ["../../x", "..", "a/b", "-x", "", "x\ntrain.train_steps=7"])
def test_sweep_run_name_cannot_escape_output_root_or_inject(tmp_path, name):
    from megatron_ham.training.config import ConfigError
    from megatron_ham.training.sweep import load_sweep

    path = _sweep(tmp_path, f"  - name: {json.dumps(name)}\n")
    with pytest.raises(ConfigError, match=rf"{path}: runs\[0\]\.name"):
        load_sweep(path)


def test_sweep_override_line_break_and_duplicate_names_refused(tmp_path):
    from megatron_ham.training.config import ConfigError
    from megatron_ham.training.sweep import load_sweep

    inject = json.dumps("model.kv_fraction=0.1\ncheckpoint.dir=/elsewhere")
    path = _sweep(tmp_path, f"  - name: a\n    overrides: [{inject}]\n")
    with pytest.raises(ConfigError, match=r"runs\[0\] \(a\)\.overrides\[0\]"):
        load_sweep(path)
    path = _sweep(tmp_path, "  - name: a\n  - name: a\n")
    with pytest.raises(ConfigError, match=r"runs\[1\]\.name 'a' is used by an earlier run"):
        load_sweep(path)
    runs = load_sweep(_sweep(tmp_path, "  - name: kv10\n    overrides: [model.kv_fraction=0.1]\n"))
    assert runs[0][1:3] == ["name=kv10", f"checkpoint.dir={tmp_path / 'runs'}/kv10/checkpoints"]


def test_sweep_cli_errors_exit_2_naming_the_file(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("recipe: x\nruns: [\n")
    escape = _sweep(tmp_path, "  - name: ../../x\n")
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
    for path, what in ((str(bad_yaml), "not valid YAML"), (escape, "runs[0].name")):
        r = subprocess.run([sys.executable, "-m", "megatron_ham.training.sweep", path, "--count"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and path in r.stderr and what in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.fixture()
def checkout(tmp_path):
    """A checkout-shaped dir: the real slurm/ scripts, the package and recipes, and `.venv` (the
    venv running these tests); no HAM_PYTHON, and no sbatch or python on PATH."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("tests do not run in a virtual environment")
    co = tmp_path / "co"
    (co / "slurm").mkdir(parents=True)
    for f in ("submit.sh", "ham.sbatch"):
        shutil.copy(os.path.join(REPO, "slurm", f), co / "slurm" / f)
    for d in ("megatron_ham", "recipes", "data_prep"):
        os.symlink(os.path.join(REPO, d), co / d)
    os.symlink(sys.prefix, co / ".venv")
    bin_dir = tmp_path / "bin"  # what submit.sh runs besides bash and python: no sbatch, no python
    bin_dir.mkdir()
    for tool in ("dirname", "mkdir", "sed"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    env = {k: v for k, v in os.environ.items() if k not in ("HAM_PYTHON", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=str(bin_dir), PYTHONWARNINGS="ignore")
    return co, env


def _submit(co, env, *args):
    return subprocess.run([shutil.which("bash"), str(co / "slurm" / "submit.sh"), "--nodes=1", "recipes/tiny_cpu.yaml", *args],
                          cwd=str(co), env=env, capture_output=True, text=True, timeout=300)


def test_submit_checks_paths_before_sbatch_and_finds_the_venv(checkout, tmp_path):
    co, env = checkout
    blend = write_learnable_dataset(str(tmp_path / "data"), n_docs=20)
    common = ["model.vocab_size=128", "data.eod_id=0"]
    r = _submit(co, env, f"data.blend={tmp_path}/nope/blend.json", *common)
    assert r.returncode == 2, r.stderr
    assert f"[submit] python: {co}/.venv/bin/python" in r.stderr  # found without HAM_PYTHON
    assert f"key 'data.blend': blend file '{tmp_path}/nope/blend.json' not found" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    tok = os.path.join(REPO, "data_prep", "sample", "tokenizer")
    r = _submit(co, env, f"data.blend={blend}", f"data.tokenizer={tok}", *common)
    # the checks pass; with no sbatch on PATH the exec fails (this test needs no cluster)
    assert "[submit-check] tiny-cpu: ok" in r.stderr and r.returncode == 127 and "sbatch" in r.stderr, r.stderr


def test_submit_check_names_each_missing_or_refused_path(tmp_path):
    from megatron_ham.training.config import ConfigError
    from megatron_ham.training.submit_check import check

    blend = write_learnable_dataset(str(tmp_path / "data"), n_docs=20)
    recipe = os.path.join(REPO, "recipes", "tiny_cpu.yaml")
    common = [recipe, "model.vocab_size=128", "data.eod_id=0"]
    with pytest.raises(ConfigError, match=f"'data.tokenizer': {tmp_path}/no-tokenizer: no such file"):
        check(common + [f"data.blend={blend}", f"data.tokenizer={tmp_path}/no-tokenizer"])
    with pytest.raises(ConfigError, match=r"'data.prefixes\[0\]': no IndexedDataset at /nope/x"):
        check(common + ["data.blend=null", "data.prefixes=[/nope/x]"])
    with pytest.raises(ConfigError, match="data.allow_pipe_urls: true"):
        check(common + ["data.backend=webdataset", "data.urls=['pipe:touch /tmp/x']"])
    with pytest.raises(ConfigError, match=r"'data.urls': shard file\(s\) not found"):
        check(common + ["data.backend=webdataset", f"data.urls=['{tmp_path}/shard-{{0..3}}.tar']"])
    sweep = _sweep(tmp_path, "  - name: a\n    overrides: [data.eod_id=0, model.vocab_size=128]\n")
    with pytest.raises(ConfigError, match=f"run 'a': key 'data.blend': blend file '{tmp_path}/gone.json'"):
        check(["--sweep", sweep, f"data.blend={tmp_path}/gone.json"])
    os.remove(os.path.join(tmp_path, "data", "arith.bin"))
    with pytest.raises(ConfigError, match=r"blend\[0\]: no IndexedDataset at"):
        check(common + [f"data.blend={blend}"])
