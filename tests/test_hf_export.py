"""Hugging Face export: Megatron checkpoint -> ham-convert-hf -> AutoModelForCausalLM.

Real parts end to end: a tiny Megatron model of each layer kind (hybrid "H*G" with the error
router and untied embeddings, pure "H" with the learned router and tied embeddings, "H" with the
learned router reading the prediction error too: router_input "hidden+error") is built in
a subprocess (gloo world of 1), its KV controllers set tau from a real training-mode forward,
and it is saved with megatron.core.dist_checkpointing in the trainer's layout (step dir +
config.yaml + train_state.json + `latest`). The CLI converts it (another subprocess); a fresh
process WITHOUT megatron_ham loads the export with trust_remote_code=True and compares logits
with the Megatron model (fp32, inputs with an EOD, documents on) and checks that greedy
generate with the recurrent cache equals generate without it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOD = 0
VOCAB = 100
CASES = {
    # name: (pattern, router, tie_embeddings)
    "hybrid": ("H*G", "error_l2", False),
    "ham": ("HH", "learned", True),
    "ham_err": ("H", "learned+error", False),  # router "learned", router_input "hidden+error"
}
ATOL = 2e-5


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _run(args, cwd=None, check=True):
    p = subprocess.run([sys.executable] + args, cwd=cwd or REPO, env=_env(), capture_output=True,
                       text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{args[:2]} failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


# ------------------------------------------------------------------ Megatron side (subprocess)
def _make_checkpoints(root: str) -> None:
    """Build, calibrate (one controller update), save and record reference logits per case."""
    import warnings

    warnings.filterwarnings("ignore")
    import yaml

    torch.set_num_threads(1)
    from megatron.core import dist_checkpointing

    from megatron_ham.hf.convert import _init_single_process
    from megatron_ham.models import ModelConfig, build_model, document_forward_kwargs, step_kv_controllers

    _init_single_process()
    for name, (pattern, router, tie) in CASES.items():
        arch = "hybrid" if len(set(pattern)) > 1 else "ham"
        cfg = ModelConfig(architecture=arch, pattern=pattern, num_layers=len(pattern), hidden_size=32,
                          vocab_size=VOCAB, num_attention_heads=4, num_query_groups=2,
                          mixer_num_heads=2, mixer_key_head_dim=8, mixer_value_head_dim=16,
                          router=router.split("+")[0], kv_fraction=0.5, tie_embeddings=tie, dtype="fp32",
                          router_input="hidden+error" if router.endswith("+error") else "hidden",
                          use_cpu_initialization=True, seq_length=64)
        torch.manual_seed(1)
        model = build_model(cfg)
        g = torch.Generator().manual_seed(2)
        x = torch.randint(1, VOCAB, (2, 40), generator=g)
        x[0, 13] = EOD
        x[1, 25] = EOD
        kw = document_forward_kwargs(x, EOD)
        model.train()  # one real controller update: tau = the batch quantile at 1 - kv_fraction
        model(x, None, None, **kw)
        taus = step_kv_controllers(model)
        assert len(taus) == pattern.count("H"), taus
        model.eval()
        with torch.no_grad():
            ref = model(x, None, None, **kw)
            routed = [m.self_attention.last_routed.float().mean().item()
                      for m in model.decoder.layers if hasattr(m.self_attention, "kv_controller")]
        run = os.path.join(root, name)
        step = os.path.join(run, "step_00000003")
        os.makedirs(step)
        dist_checkpointing.save({"model": model.sharded_state_dict()}, step)
        with open(os.path.join(step, "config.yaml"), "w") as f:
            yaml.safe_dump({"name": name, "model": cfg.to_dict(),
                            "data": {"backend": "synthetic", "eod_id": EOD, "documents": True,
                                     "tokenizer": None}}, f)
        with open(os.path.join(step, "train_state.json"), "w") as f:
            json.dump({"step": 3, "consumed_samples": 24, "world_size": 1}, f)
        with open(os.path.join(run, "latest"), "w") as f:
            f.write("step_00000003\n")
        torch.save({"x": x, "ref": ref.float(), "routed": routed,
                    "taus": {k: v["tau"] for k, v in taus.items()}}, os.path.join(root, f"{name}_ref.pt"))
    # the in-process API (the "hybrid" case goes through the CLI in the test process)
    import contextlib
    import io

    from megatron_ham.hf.convert import ConversionError, convert

    results = {}
    for name in CASES:
        if name == "hybrid":
            continue
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            convert(os.path.join(root, name), os.path.join(root, f"{name}_hf"), verify_tokens=24)
        results[f"{name}_log"] = buf.getvalue()
    # a run config that does not describe the checkpoint
    step = os.path.join(root, "hybrid", "step_00000003")
    doc = yaml.safe_load(open(os.path.join(step, "config.yaml")))
    doc["model"]["hidden_size"] = 48
    bad = os.path.join(root, "bad_config.yaml")
    with open(bad, "w") as f:
        yaml.safe_dump(doc, f)
    try:
        convert(step, os.path.join(root, "bad_out"), config_path=bad)
        results["mismatch"] = None
    except ConversionError as e:
        results["mismatch"] = str(e)
    results["bad_out_exists"] = os.path.exists(os.path.join(root, "bad_out"))
    with open(os.path.join(root, "make.json"), "w") as f:
        json.dump(results, f)


# ------------------------------------------------------------------ HF side (fresh process)
def _check_exports(root: str) -> None:
    """Runs WITHOUT megatron_ham on the path: trust_remote_code loading, parity, cache."""
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import megatron_ham  # noqa: F401
        raise AssertionError("megatron_ham must not be importable in the check process")
    except ImportError:
        pass
    report = {}
    for name in CASES:
        out = os.path.join(root, f"{name}_hf")
        ref = torch.load(os.path.join(root, f"{name}_ref.pt"))
        m = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        assert not [k for k in sys.modules if k.startswith("megatron_ham") and sys.modules[k] is not None], \
            "the export must load without megatron_ham"
        x = ref["x"]
        with torch.no_grad():
            logits = m(x, use_cache=False).logits
            diff = (logits - ref["ref"][..., :VOCAB]).abs().max().item()
            fr = [f for f in m.routed_fractions() if f is not None]
            # incremental (cache) forward == full forward, across the EOD
            c, outs = None, []
            for a, b in ((0, 9), (9, 10), (10, 20), (20, 21), (21, 22), (22, 40)):
                o = m(x[:, a:b], past_key_values=c, use_cache=True)
                c, outs = o.past_key_values, outs + [o.logits]
            inc = (torch.cat(outs, 1) - logits).abs().max().item()
            counts = [None if k is None else k.tolist() for k in c.kv_counts()]
        prompt = x[:1, 14:30]  # one document (after the EOD at 13)
        g_cache = m.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
        g_none = m.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
        tok = None
        if os.path.isfile(os.path.join(out, "tokenizer.json")):
            tok = AutoTokenizer.from_pretrained(out)("hello world")["input_ids"]
        report[name] = {"diff": diff, "inc": inc, "routed_hf": fr, "routed_ref": ref["routed"],
                        "kv_counts": counts, "gen_cache": g_cache.tolist(), "gen_none": g_none.tolist(),
                        "class": type(m).__module__, "tok": tok}
    with open(os.path.join(root, "report.json"), "w") as f:
        json.dump(report, f)


# ------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf_export"))
    _run([os.path.abspath(__file__), "make", root])
    with open(os.path.join(root, "make.json")) as f:
        made = json.load(f)
    logs = {**{n: made[f"{n}_log"] for n in CASES if n != "hybrid"}, "_mismatch": made["mismatch"], "_bad_out": made["bad_out_exists"]}
    p = _run(["tools/convert_to_hf.py", "--checkpoint", os.path.join(root, "hybrid"),
              "--output", os.path.join(root, "hybrid_hf"), "--verify", "24",
              "--tokenizer", os.path.join(REPO, "data_prep", "sample", "tokenizer")])
    logs["hybrid"] = p.stdout + p.stderr
    # the fresh process must not see megatron_ham: clean path, and the import blocked
    env_cmd = [os.path.abspath(__file__), "check", root]
    p = subprocess.run([sys.executable, "-c",
                        "import sys; sys.path = [p for p in sys.path if p not in ('', %r)]; "
                        "sys.modules['megatron_ham'] = None; "  # blocks it even when pip-installed
                        "sys.argv = %r; f = %r; exec(compile(open(f).read(), f, 'exec'), "
                        "{'__name__': '__main__', '__file__': f})" % (REPO, env_cmd, env_cmd[0])],
                       cwd=root, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                       capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise AssertionError(f"check process failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    with open(os.path.join(root, "report.json")) as f:
        return root, json.load(f), logs


def test_convert_log_and_files(exported):
    root, report, logs = exported
    for name in CASES:
        log = logs[name]
        assert "checkpoint: " + os.path.join(root, name, "step_00000003") in log, log
        assert "verify: max |logits(Megatron) - logits(HF)|" in log
        diff = float(log.split("verify: max |logits(Megatron) - logits(HF)| = ")[1].split()[0])
        assert diff < ATOL, log
        out = os.path.join(root, f"{name}_hf")
        for f in ("config.json", "generation_config.json", "model.safetensors", "modeling_ham.py",
                  "configuration_ham.py", "ham_ops.py", "gated_delta_rule.py", "scratchpad.py"):
            assert os.path.isfile(os.path.join(out, f)), f
        assert not [d for d in os.listdir(root) if d.startswith(".tmp_")], "temp dir left behind"
        cfg = json.load(open(os.path.join(out, "config.json")))
        ref = torch.load(os.path.join(root, f"{name}_ref.pt"))
        pattern = CASES[name][0]
        assert cfg["layer_pattern"] == pattern and cfg["eod_token_id"] == EOD and cfg["reset_at_eod"]
        for i, sym in enumerate(pattern):
            if sym == "H":
                assert cfg["ham_taus"][i] == pytest.approx(ref["taus"][i + 1], rel=1e-6)
            else:
                assert cfg["ham_taus"][i] is None
        assert cfg["tie_word_embeddings"] == CASES[name][2]
        # special ids: eos = the EOD; pad / bos = the shipped tokenizer's (the sample tokenizer
        # pads with <|pad|> = 1, its BOS is <|endoftext|> = 0), else pad = EOD and no bos
        gen = json.load(open(os.path.join(out, "generation_config.json")))
        want = (EOD, 1, 0) if name == "hybrid" else (EOD, EOD, None)
        for doc in (cfg, gen):
            assert (doc["eos_token_id"], doc["pad_token_id"], doc.get("bos_token_id")) == want, (name, doc)
        from safetensors import safe_open

        with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
            keys = set(f.keys())
            assert f.get_tensor("model.embed_tokens.weight").shape[0] == VOCAB  # padding dropped
        assert ("lm_head.weight" in keys) == (not CASES[name][2])
        if "*" in pattern:
            assert {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"} <= keys
        assert "model.layers.0.mixer.gate_kv_proj.weight" in keys


def test_trust_remote_code_parity_and_cache(exported):
    root, report, _ = exported
    for name, r in report.items():
        assert r["class"].startswith("transformers_modules"), r["class"]
        assert r["diff"] < ATOL, (name, r["diff"])
        assert r["inc"] < ATOL, (name, r["inc"])
        # same routing decisions as Megatron (fractions per HAM layer), and a partial fraction
        assert r["routed_hf"] == pytest.approx(r["routed_ref"], abs=1e-6), name
        assert any(0.0 < f < 1.0 for f in r["routed_hf"]), r["routed_hf"]
        assert r["gen_cache"] == r["gen_none"], name
        assert len(r["gen_cache"][0]) > 16
        # the scratchpad cache holds only routed tokens of the current document
        for i, sym in enumerate(CASES[name][0]):
            if sym == "H":
                c0, c1 = r["kv_counts"][i]
                assert 0 <= c0 <= 40 - 14 and 0 <= c1 <= 40 - 26, r["kv_counts"]
            elif sym == "*":
                assert r["kv_counts"][i] == [40 - 14, 40 - 26]
    assert report["hybrid"]["tok"], "tokenizer shipped with the export"


def test_registered_loading_without_remote_code(exported):
    root, _, _ = exported
    import megatron_ham.hf  # noqa: F401  (registers model_type megatron_ham)
    from transformers import AutoModelForCausalLM

    from megatron_ham.hf import HAMForCausalLM

    m = AutoModelForCausalLM.from_pretrained(os.path.join(root, "hybrid_hf")).eval()
    assert isinstance(m, HAMForCausalLM)
    ref = torch.load(os.path.join(root, "hybrid_ref.pt"))
    with torch.no_grad():
        logits = m(ref["x"]).logits
    assert (logits - ref["ref"][..., :VOCAB]).abs().max().item() < ATOL

    # tau override at inference: all / none routed, and calibration to a target fraction
    x = ref["x"]
    with torch.no_grad():
        m.set_tau(float("inf"))
        m(x, use_cache=False)
        assert m.routed_fractions()[0] == 0.0
        m.set_tau(float("-inf"))
        out = m(x, use_cache=True)
        assert m.routed_fractions()[0] == 1.0
        assert out.past_key_values.kv_counts()[0].tolist() == [40 - 14, 40 - 26]
        taus = m.calibrate_kv_fraction(x, 0.25)
        m(x, use_cache=False)
        assert m.routed_fractions()[0] == pytest.approx(0.25, abs=0.02)
        assert m.config.tau_override[0] == taus[0] and taus[1] is None
    # re-saving keeps the directory self-contained (code + auto_map) and the override
    resaved = os.path.join(root, "resaved")
    m.save_pretrained(resaved)
    for f in ("modeling_ham.py", "ham_ops.py", "scratchpad.py", "model.safetensors"):
        assert os.path.isfile(os.path.join(resaved, f)), f
    cfg = json.load(open(os.path.join(resaved, "config.json")))
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_ham.HAMForCausalLM"
    assert cfg["tau_override"][0] == pytest.approx(taus[0])
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, T\] = \[2, 40\]"):
        m(x, attention_mask=torch.ones(2, 39, dtype=torch.long))
    with pytest.raises(ValueError, match="one per layer"):
        m.set_tau([0.1])


def test_config_not_matching_checkpoint(exported):
    """A run config that does not describe the checkpoint is refused, naming the tensor."""
    _, _, logs = exported
    msg = logs["_mismatch"]
    assert msg and "does not match the model built from the run config" in msg, msg
    assert "embedding.word_embeddings.weight: checkpoint shape [128, 32], model shape [128, 48]" in msg
    assert not logs["_bad_out"]


def test_bad_inputs(tmp_path):
    from megatron_ham.hf import HAMConfig
    from megatron_ham.hf.convert import ConversionError, main, resolve_checkpoint

    missing = str(tmp_path / "nope")
    with pytest.raises(ConversionError, match="nope: no such file"):
        resolve_checkpoint(missing)
    run = tmp_path / "run"
    (run / "step_00000005").mkdir(parents=True)
    (run / "step_00000005" / "metadata.json").write_text("{}")
    with pytest.raises(ConversionError, match="no complete checkpoint found"):
        resolve_checkpoint(str(run))
    with pytest.raises(ConversionError, match="step_00000005: incomplete checkpoint: no train_state.json"):
        resolve_checkpoint(str(run / "step_00000005"))
    (run / "step_00000005" / "train_state.json").write_text("{}")
    with pytest.raises(ConversionError, match="step_00000005/train_state.json: unreadable train state"):
        resolve_checkpoint(str(run))  # complete-looking, but verified before use
    # a complete-looking step without the run config
    with pytest.raises(ConversionError, match="config.yaml: missing"):
        from megatron_ham.hf.convert import read_run_config

        read_run_config(str(run / "step_00000005"))
    # the CLI reports errors naming the path, rc 2
    assert main(["--checkpoint", missing, "--output", str(tmp_path / "o")]) == 2
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(ConversionError, match="exists; pass --overwrite"):
        from megatron_ham.hf.convert import convert

        convert(str(run), str(out))
    with pytest.raises(ValueError, match="layer_pattern"):
        HAMConfig(layer_pattern="HX", num_hidden_layers=2)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        HAMConfig(layer_pattern="HH", num_hidden_layers=3)
    with pytest.raises(ValueError, match="ham_taus"):
        HAMConfig(layer_pattern="HH", num_hidden_layers=2, ham_taus=[0.1])
    p = _run(["tools/convert_to_hf.py", "--help"])
    assert "--checkpoint" in p.stdout and "trust_remote_code" in p.stdout


# ------------------------------------------------------------------ foreign code, paths, permissions
SAMPLE_TOKENIZER = os.path.join(REPO, "data_prep", "sample", "tokenizer")


def _planted_tokenizer(d, marker, auto_map=None):
    """The sample tokenizer plus Python files that create `marker` when imported (and a config.json
    whose auto_map points at one of them); with `auto_map`, a tokenizer_config.json that names
    its own code."""
    import shutil

    shutil.copytree(SAMPLE_TOKENIZER, d)
    payload = f"open({str(marker)!r}, 'w').write(__name__)\n"
    for name in ("modeling_ham.py", "configuration_ham.py", "ham_ops.py", "evil.py", "tokenization_evil.py"):
        with open(os.path.join(d, name), "w") as f:
            f.write(payload + "class EvilTokenizer: pass\nclass Evil: pass\n")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"auto_map": {"AutoModelForCausalLM": "evil.Evil", "AutoConfig": "evil.Evil"}}, f)
    if auto_map:
        cfg = json.load(open(os.path.join(d, "tokenizer_config.json")))
        cfg["auto_map"] = auto_map
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f)
    return str(d)


def _convert_cli(args):
    p = subprocess.run([sys.executable, "tools/convert_to_hf.py", *args], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=600, preexec_fn=lambda: os.umask(0o022))
    return p.returncode, p.stdout + p.stderr


def test_export_carries_no_foreign_code_and_verify_loads_the_export(exported, tmp_path):
    """A tokenizer dir with planted modeling / config code: only allow-listed data files are
    copied, the code is the package's own, --verify loads the export dir (no marker), modes are
    0755 / 0644; a tokenizer with an auto_map is refused unless --allow-tokenizer-code, and then
    its tokenization_*.py ships but can never replace the exporter's files."""
    root, _, _ = exported
    marker = tmp_path / "PWNED"
    tok = _planted_tokenizer(tmp_path / "tok", marker)
    out = tmp_path / "export"
    rc, log = _convert_cli(["--checkpoint", os.path.join(root, "hybrid"), "--output", str(out),
                            "--tokenizer", tok, "--verify", "16"])
    assert rc == 0, log
    assert "the export directory, loaded with trust_remote_code=True in a fresh process" in log
    assert not marker.exists()
    files = sorted(os.listdir(out))
    assert not {"evil.py", "tokenization_evil.py"} & set(files) and "tokenizer.json" in files
    for name in ("modeling_ham.py", "configuration_ham.py"):
        assert (out / name).read_bytes() == open(os.path.join(REPO, "megatron_ham", "hf", name), "rb").read()
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_ham.HAMForCausalLM"
    assert json.load(open(out / "megatron_ham_export.json"))["files"] == files
    assert os.stat(out).st_mode & 0o777 == 0o755
    assert {oct(os.stat(out / n).st_mode & 0o777) for n in files} == {oct(0o644)}

    # a tokenizer with its own code: refused by default, before the model is loaded
    from megatron_ham.hf.convert import convert

    auto = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    tok2 = _planted_tokenizer(tmp_path / "tok2", marker, auto)
    with pytest.raises(ValueError, match="tokenizer_config.json has an auto_map.*--allow-tokenizer-code"):
        convert(os.path.join(root, "hybrid"), str(tmp_path / "o2"), tokenizer=tok2)
    bad = _planted_tokenizer(tmp_path / "tok3", marker, {"AutoTokenizer": [None, "modeling_ham.EvilTokenizer"]})
    with pytest.raises(ValueError, match="reserved for the export's own code"):
        convert(os.path.join(root, "hybrid"), str(tmp_path / "o3"), tokenizer=bad, allow_tokenizer_code=True)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
    # allowed: its module ships, the exporter's code is still its own; a user file in the old
    # export survives --overwrite (kept aside)
    (out / "USER_FILE.txt").write_text("mine")
    rc, log = _convert_cli(["--checkpoint", os.path.join(root, "hybrid"), "--output", str(out),
                            "--tokenizer", tok2, "--allow-tokenizer-code", "--overwrite"])
    assert rc == 0, log
    assert (out / "tokenization_evil.py").exists() and not (out / "evil.py").exists()
    assert (out / "modeling_ham.py").read_bytes() == open(os.path.join(REPO, "megatron_ham", "hf",
                                                                       "modeling_ham.py"), "rb").read()
    kept = [d for d in os.listdir(tmp_path) if d.startswith(".old_export_")]
    assert len(kept) == 1 and os.listdir(tmp_path / kept[0]) == ["USER_FILE.txt"]
    assert not marker.exists()  # nothing of the tokenizer's code ran in the converter


def test_verify_reads_the_export_directory_itself(exported, tmp_path):
    """export_logits runs the export's own modeling code: a tampered copy gives other logits."""
    import shutil

    from megatron_ham.hf.verify_export import export_logits

    root, _, _ = exported
    src = os.path.join(root, "ham_hf")
    tampered = tmp_path / "tampered"
    shutil.copytree(src, tampered)
    code = (tampered / "modeling_ham.py").read_text()
    assert "logits = self.lm_head(" in code
    (tampered / "modeling_ham.py").write_text(code.replace("logits = self.lm_head(", "logits = 2 * self.lm_head(", 1))
    ref = torch.load(os.path.join(root, "ham_ref.pt"))  # the Megatron model's logits (fixture)
    x, want = ref["x"][:1, :12], ref["ref"][:1, :12, :VOCAB].numpy()  # before the first EOD: causal
    got, info = export_logits(str(tampered), x.numpy())
    assert got.shape == (1, 12, VOCAB) and abs(got - 2 * want).max() < 1e-4 and abs(want).max() > 1e-3
    assert "transformers_modules" in info["module_file"] and not info["megatron_ham_loaded"]


def test_missing_tokenizer_and_foreign_output_are_named(exported, tmp_path, capsys):
    from megatron_ham.hf.convert import main

    root, _, _ = exported
    missing = str(tmp_path / "no-such-tokenizer")
    assert main(["--checkpoint", os.path.join(root, "ham"), "--output", str(tmp_path / "o"),
                 "--tokenizer", missing]) == 2
    assert f"--tokenizer {missing}: no such file or directory" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "USER_FILE.txt").write_text("mine")
    assert main(["--checkpoint", os.path.join(root, "ham"), "--output", str(foreign), "--overwrite"]) == 2
    assert "is not an export of ham-convert-hf" in capsys.readouterr().err
    assert (foreign / "USER_FILE.txt").read_text() == "mine" and not (tmp_path / "o").exists()


if __name__ == "__main__":
    if sys.argv[1] == "make":
        _make_checkpoints(sys.argv[2])
    elif sys.argv[1] == "check":
        _check_exports(sys.argv[2])
