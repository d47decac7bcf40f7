"""ham-import-hf: a Hugging Face export back to a Megatron checkpoint that ham-train fine-tunes from.

Fast part (one process, no torch.distributed): exports written by HAMForCausalLM.save_pretrained
plus the ham-convert-hf record (megatron_ham_export.json) for every layer kind, norm and router;
the HF -> Megatron map is checked to be the exact inverse of ham-convert-hf's, and bad exports
are refused with a message naming what is wrong (exit 2).

Round trip (slow; real ham-train runs, gloo): a hybrid "H*" model trained 2 steps at TP=2 (its
vocabulary padded from 128 to 192 rows) -> ham-convert-hf -> ham-import-hf (the export's code
replaced by code that would leave a mark: it must never run) -> the imported weights equal the
trained ones bit for bit, and so do the logits; ham-train fine-tunes from the import at TP=2
(lr 0: the weights stay bit for bit, so the load reached the optimizer's main params too) and at
TP=1 (same first-step loss as TP=2).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from test_training_helpers import REPO, base_overrides, logs, read_metrics, run, write_learnable_dataset

EOD = 0


# ------------------------------------------------------------------ exports without Megatron
def make_export(out, pattern="H*G", router="learned", tie=False, norm="RMSNorm", step=5, vocab=100):
    """An export as ham-convert-hf lays it out (weights, config.json, the ModelConfig record) of
    a randomly initialised model; returns (ModelConfig, taus)."""
    from megatron_ham.hf import HAMForCausalLM
    from megatron_ham.hf.convert import hf_config_from
    from megatron_ham.models import ModelConfig

    cfg = ModelConfig(architecture="hybrid", pattern=pattern, num_layers=len(pattern), hidden_size=32,
                      vocab_size=vocab, num_attention_heads=4, num_query_groups=2, mixer_num_heads=2,
                      mixer_key_head_dim=8, mixer_value_head_dim=16, router=router, tie_embeddings=tie,
                      normalization=norm, seq_length=64, dtype="fp32")
    taus = [0.25 + 0.125 * i if c == "H" else None for i, c in enumerate(pattern)]
    torch.manual_seed(0)
    model = HAMForCausalLM(hf_config_from(cfg, taus, EOD, True))
    with torch.no_grad():  # every tensor random (norm weights and biases included)
        for p in model.parameters():
            p.normal_()
    model.save_pretrained(str(out))
    with open(os.path.join(str(out), "megatron_ham_export.json"), "w") as f:
        json.dump({"checkpoint": "/nowhere", "model_config": cfg.to_dict(), "train_state": {"step": step}}, f)
    return cfg, taus


@pytest.mark.parametrize("pattern,router,tie,norm", [
    ("H*G", "learned", False, "LayerNorm"),
    ("HH", "error_cosine", True, "RMSNorm"),
    ("G*", "error_l2", False, "RMSNorm"),
])
def test_hf_to_megatron_is_the_inverse_of_the_export_map(tmp_path, pattern, router, tie, norm):
    from megatron_ham.hf import import_hf as imp
    from megatron_ham.hf.convert import hf_config_from

    cfg, taus = make_export(tmp_path, pattern, router, tie, norm)
    doc = imp.read_hf_config(str(tmp_path))
    _, cfg2, train_state = imp.read_model_config(str(tmp_path), None)
    assert cfg2 == cfg and train_state == {"step": 5}
    hf_cfg = hf_config_from(cfg2, taus, EOD, True)
    imp.check_structure(doc, hf_cfg, cfg2, str(tmp_path))
    files = imp.weight_files(str(tmp_path))
    imp.check_tensors(files, imp.expected_hf_shapes(hf_cfg))
    hf = imp.read_tensors(files)
    assert ("lm_head.weight" in hf) == (not tie)
    meg = imp.hf_to_megatron(hf, cfg2, imp._taus(doc, len(pattern), "config.json"), 5)
    imp.check_inverse(meg, hf, cfg2, taus)  # raises unless megatron_to_hf(meg) == hf bit for bit
    emb = meg["embedding.word_embeddings.weight"]
    assert emb.shape[0] == cfg.padded_vocab_size() == 128
    assert torch.equal(emb[:100], hf["model.embed_tokens.weight"]) and not emb[100:].any()
    assert ("output_layer.weight" in meg) == (not tie)
    for i, c in enumerate(pattern):
        a = f"decoder.layers.{i}.self_attention."
        if c == "H":
            assert float(meg[a + "kv_controller.tau"]) == taus[i]
            assert int(meg[a + "kv_controller.num_updates"]) == 5  # the exported step
        assert (a + "kv_controller.tau" in meg) == (c == "H")
    # a kind whose inverse is wrong is caught (here: two sections swapped)
    bad = dict(meg)
    w = bad["decoder.layers.0.self_attention.in_proj.weight"]
    bad["decoder.layers.0.self_attention.in_proj.weight"] = torch.cat([w[16:32], w[:16], w[32:]])
    with pytest.raises(imp.ConversionError, match="not the inverse"):
        imp.check_inverse(bad, hf, cfg2, taus)


def test_fused_join_inverts_split():
    from megatron_ham.layers.kinds import Fused, Section

    secs = (Section("q", 3, "q"), Section("k", 2, "k"), Section("v", 2, "v"))
    for interleaved in (False, True):
        f = Fused("w", secs, 4, 5, "{}_proj.weight", interleaved=interleaved)
        t = torch.randn(f.rows, 5)
        parts = f.split(t)
        assert torch.equal(f.join(dict(parts)), t)
        with pytest.raises(ValueError, match="k_proj.weight: missing"):
            f.join({k: v for k, v in parts.items() if k != "k_proj.weight"})
        parts["v_proj.weight"] = parts["v_proj.weight"][:-1]
        with pytest.raises(ValueError, match="v_proj.weight: 7 rows, expected 8"):
            f.join(parts)


def _fails(argv, capsys, *needles):
    from megatron_ham.hf.import_hf import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


def test_bad_exports_are_refused(tmp_path, capsys):
    good = tmp_path / "good"
    make_export(good, "H*", "error_l2")
    out = str(tmp_path / "out")

    def variant(name):
        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    _fails(["--hf", str(tmp_path / "nope"), "--output", out], capsys, "nope: not a directory")
    d = variant("noconfig")
    os.remove(d / "config.json")
    _fails(["--hf", str(d), "--output", out], capsys, "config.json: missing")
    d = variant("llama")
    doc = json.load(open(d / "config.json"))
    doc["model_type"] = "llama"
    json.dump(doc, open(d / "config.json", "w"))
    _fails(["--hf", str(d), "--output", out], capsys, "model_type is 'llama', not 'megatron_ham'")
    d = variant("norecord")
    os.remove(d / "megatron_ham_export.json")
    _fails(["--hf", str(d), "--output", out], capsys, "no megatron_ham_export.json", "--config")
    # ... then the model comes from --config (a recipe), which must describe config.json's model
    import yaml

    rec = json.load(open(good / "megatron_ham_export.json"))["model_config"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": dict(rec, hidden_size=48), "data": {"backend": "synthetic"}}))
    _fails(["--hf", str(d), "--output", out, "--config", str(recipe)], capsys,
           "config.json: does not describe the model", "hidden_size: config.json has 32, the model config gives 48")
    _fails(["--hf", str(d), "--output", out, "--config", str(tmp_path / "none.yaml")], capsys,
           "--config", "none.yaml: no such file")
    d = variant("badrecord")
    rec = json.load(open(d / "megatron_ham_export.json"))
    rec["model_config"]["hidden_sise"] = 32
    json.dump(rec, open(d / "megatron_ham_export.json", "w"))
    _fails(["--hf", str(d), "--output", out], capsys, "megatron_ham_export.json", "hidden_sise")
    d = variant("structure")
    rec = json.load(open(d / "megatron_ham_export.json"))
    rec["model_config"]["mixer_value_head_dim"] = 8
    json.dump(rec, open(d / "megatron_ham_export.json", "w"))
    _fails(["--hf", str(d), "--output", out], capsys, "config.json: does not describe the model",
           "mixer_value_head_dim: config.json has 16, the model config gives 8")
    # weights: a wrong shape, a missing and an extra tensor are named before anything is read
    from safetensors.torch import load_file, save_file

    d = variant("weights")
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.mixer.q_proj.weight"] = sd["model.layers.0.mixer.q_proj.weight"][:8]
    del sd["model.norm.weight"]
    sd["model.layers.9.evil"] = torch.zeros(1 << 4)
    save_file(sd, str(d / "model.safetensors"))
    _fails(["--hf", str(d), "--output", out], capsys,
           "model.layers.0.mixer.q_proj.weight: shape [8, 32], the model config gives [16, 32]",
           "model.norm.weight: missing", "model.layers.9.evil: not a tensor of this model")
    d = variant("garbage")
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    _fails(["--hf", str(d), "--output", out], capsys, "not a readable safetensors file")
    # file names stay inside the export: an index naming ../, a link out of it
    d = variant("index")
    os.rename(d / "model.safetensors", tmp_path / "outside.safetensors")
    json.dump({"weight_map": {"model.norm.weight": "../outside.safetensors"}},
              open(d / "model.safetensors.index.json", "w"))
    _fails(["--hf", str(d), "--output", out], capsys, "a file name inside the export: '../outside.safetensors' contains a '/'")
    d = variant("link")
    os.remove(d / "model.safetensors")
    os.symlink(tmp_path / "outside.safetensors", d / "model.safetensors")
    _fails(["--hf", str(d), "--output", out], capsys, "outside the export directory")
    # the output must be new
    os.makedirs(tmp_path / "used")
    (tmp_path / "used" / "latest").write_text("step_00000007\n")
    _fails(["--hf", str(good), "--output", str(tmp_path / "used")], capsys, "exists and is not an empty directory")
    assert not os.path.exists(out)
    p = subprocess.run([sys.executable, "-m", "megatron_ham.hf.import_hf", "--help"], capture_output=True,
                       text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert p.returncode == 0 and "--hf" in p.stdout and "fresh optimizer" in " ".join(p.stdout.split())


# ------------------------------------------------------------------ round trip through ham-train
MODEL = ["model.architecture=hybrid", "model.pattern=H*", "model.make_vocab_size_divisible_by=96",
         "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=1",
         "train.eval_interval=0", "checkpoint.interval=0", "train.train_steps=2"]
MARK = "code_of_the_export_ran"


def _py(args, **kw):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable] + args, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_import")
    blend = write_learnable_dataset(str(root / "data"), n_docs=60)
    src = str(root / "src")
    assert run(2, base_overrides(blend, src) + MODEL + ["parallel.tp=2"], f"{src}.log") == [0, 0], \
        logs(f"{src}.log", 2)
    hf = str(root / "hf")
    p = _py(["-m", "megatron_ham.hf.convert", "--checkpoint", f"{src}/checkpoints", "--output", hf])
    assert p.returncode == 0, p.stdout + p.stderr
    for name in ("modeling_ham.py", "configuration_ham.py", "ham_ops.py"):  # must never run
        with open(os.path.join(hf, name), "w") as f:
            f.write(f"open({os.path.join(str(root), MARK)!r}, 'w').write('ran')\n")
    imported = str(root / "imported")
    p = _py(["-m", "megatron_ham.hf.import_hf", "--hf", hf, "--output", imported, "--verify", "32"])
    assert p.returncode == 0, p.stdout + p.stderr
    import_log = p.stdout
    copy = str(root / "imported_tp1")
    shutil.copytree(imported, copy)
    # fine-tune at TP=2 with lr 0 (the weights must stay exactly), and at TP=1 with the recipe's lr
    ft2, ft1 = str(root / "ft2"), str(root / "ft1")
    assert run(2, base_overrides(blend, ft2) + MODEL + [
        "parallel.tp=2", f"checkpoint.dir={imported}", "train.lr=0.0", "train.min_lr=0.0"],
        f"{ft2}.log") == [0, 0], logs(f"{ft2}.log", 2)
    assert run(1, base_overrides(blend, ft1) + MODEL + [f"checkpoint.dir={copy}"], f"{ft1}.log") == [0], \
        logs(f"{ft1}.log", 1)
    report = str(root / "report.json")
    p = _py([os.path.abspath(__file__), "compare", f"{src}/checkpoints/step_00000002",
             f"{imported}/step_00000000", f"{imported}/step_00000002", report])
    assert p.returncode == 0, p.stdout + p.stderr
    return dict(root=str(root), src=src, hf=hf, imported=imported, ft2=ft2, ft1=ft1, import_log=import_log,
                report=json.load(open(report)))


def _compare(src_step, imp_step, ft_step, out):
    """(subprocess) load the three checkpoints at TP=1 and compare them bit for bit."""
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from megatron_ham.hf.convert import load_megatron_model, read_run_config
    from megatron_ham.models import document_forward_kwargs

    cfg = read_run_config(src_step).model
    assert read_run_config(imp_step).model.resolved_pattern() == cfg.resolved_pattern()
    sds = [load_megatron_model(s, read_run_config(s).model).state_dict() for s in (src_step, imp_step, ft_step)]
    a, b, c = ({k: v for k, v in sd.items() if not k.endswith("_extra_state")} for sd in sds)
    V = cfg.vocab_size
    rep = {"keys_equal": set(a) == set(b) == set(c), "differ_src_imp": [], "differ_imp_ft": [], "pad_rows_zero": True}
    for k in sorted(a):
        x, y = a[k], b[k]
        if k in ("embedding.word_embeddings.weight", "output_layer.weight"):
            rep["pad_rows_zero"] &= not y[V:].any()
            x, y = x[:V], y[:V]
        if not torch.equal(x, y):
            rep["differ_src_imp"].append(k)
        if not k.endswith(("kv_controller.tau", "kv_controller.num_updates")) and not torch.equal(b[k], c[k]):
            rep["differ_imp_ft"].append(k)
    rep["num_updates"] = [int(sd[k]) for sd in (a, b, c) for k in sorted(sd) if k.endswith("num_updates")]
    # logits on tokens with an EOD inside: bitwise the same model
    models = [load_megatron_model(s, read_run_config(s).model) for s in (src_step, imp_step)]
    x = torch.randint(1, V, (2, 48), generator=torch.Generator().manual_seed(3))
    x[:, 20] = EOD
    kw = document_forward_kwargs(x, EOD)
    with torch.no_grad():
        la, lb = (m(x, None, None, **kw)[..., :V] for m in models)
    rep["logits_equal"] = bool(torch.equal(la, lb))
    with open(out, "w") as f:
        json.dump(rep, f)


@pytest.mark.slow
def test_round_trip_weights_and_logits_are_exact(round_trip):
    rep = round_trip["report"]
    assert rep["keys_equal"] and rep["differ_src_imp"] == [], rep
    assert rep["pad_rows_zero"]  # Megatron's vocab padding rows are not in an export: zeros
    assert rep["logits_equal"], rep
    # tau continues: num_updates = the source's steps (2), + 2 fine-tune steps
    assert rep["num_updates"] == [2, 2, 4], rep
    assert not os.path.exists(os.path.join(round_trip["root"], MARK)), "the export's code ran"
    diff = float(round_trip["import_log"].split("verify: max |logits(Megatron) - logits(HF)| = ")[1].split()[0])
    assert diff < 2e-5, round_trip["import_log"]
    state = json.load(open(os.path.join(round_trip["imported"], "step_00000000", "train_state.json")))
    assert state["model_only"] and state["step"] == 0 and state["imported_from"] == round_trip["hf"]
    assert state["export_train_state"]["step"] == 2


@pytest.mark.slow
def test_ham_train_fine_tunes_from_the_import_at_tp2_and_tp1(round_trip):
    rep = round_trip["report"]
    assert rep["differ_imp_ft"] == [], rep  # lr 0 at TP=2: every weight stays bit for bit
    log2 = logs(f"{round_trip['ft2']}.log", 2)
    assert "[checkpoint] initialised the model from " + round_trip["imported"] + "/step_00000000" in log2, log2
    ck = round_trip["imported"]
    assert open(f"{ck}/latest").read().strip() == "step_00000002"
    m2 = read_metrics(f"{round_trip['ft2']}/metrics.jsonl")
    m1 = read_metrics(f"{round_trip['ft1']}/metrics.jsonl")
    assert [r["step"] for r in m2] == [1, 2] == [r["step"] for r in m1]
    # the first step's loss is the imported model's on the same first batch, at TP=2 and TP=1
    assert m1[0]["loss"] == pytest.approx(m2[0]["loss"], abs=1e-5)
    # not a fresh init (which the source run's first step measured on the same batch)
    src = read_metrics(f"{round_trip['src']}/metrics.jsonl")
    assert abs(m1[0]["loss"] - src[0]["loss"]) > 1e-4, (m1[0], src[0])
    assert m1[0]["lr"] > 0 and m2[0]["lr"] == 0.0
    assert all(r["loss"] == r["loss"] for r in m1 + m2)


if __name__ == "__main__":
    if sys.argv[1] == "compare":
        _compare(*sys.argv[2:6])
