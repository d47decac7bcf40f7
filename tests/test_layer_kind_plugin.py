"""A layer kind added from this file alone: registered, trained, checkpointed, exported, loaded.

The toy kind 'T' is a gated projection mixer, y = o_proj(u * sigmoid(g)) with u, g two sections
per head of one fused in_proj: written here as a LayerKind (settings rule, ModuleSpec, section
table, parameter count, HF key map), a Megatron module on megatron_ham.layers.SectionedMixer and a
self-contained HF module. Nothing else in the repository knows it. Real parts throughout: a
2-rank gloo world at TP=2 trains a "TH" model (toy + HAM) through the training loop's API on a
learnable dataset and checkpoints it (sections saved TP-sharded); ham-convert-hf's API exports
it at TP=1 with --verify; transformers loads the export with the package's classes, and in a
fresh process without megatron_ham through the code the export ships (kind_toy.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from _dist import run_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


# ------------------------------------------------------------------ the toy kind (HF side first:
# its source is what the export ships, so it uses torch / nn only)
class ToyMixerHF(nn.Module):
    """HF module of the toy kind: [B, T, h] -> o_proj(u * sigmoid(g)) [B, T, h]."""

    def __init__(self, config, layer_idx):
        super().__init__()
        table = config.fused_sections["toy"]["in_proj.weight"]  # [[HF name, rows], ...]
        for name, rows in table:
            self.add_module(f"{name}_proj", nn.Linear(config.hidden_size, rows, bias=False))
        self.o_proj = nn.Linear(table[0][1], config.hidden_size, bias=False)

    def forward(self, x, doc, has_docs, cache, positions, mask):
        return self.o_proj(self.u_proj(x) * torch.sigmoid(self.g_proj(x)))


def _toy_kind():
    """The LayerKind and its Megatron module (megatron imports stay inside: see ToyMixerHF)."""
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from megatron_ham.layers.gdn_mixer import GDNMixerSubmodules
    from megatron_ham.layers.kinds import Fused, LayerKind, Section, divisible
    from megatron_ham.layers.sectioned import SectionedMixer

    class ToyMixer(SectionedMixer):
        """[s(/tp), b, h] -> (out_proj(u * sigmoid(g)), bias); heads split over TP."""

        def __init__(self, config, submodules, layer_number=None, pg_collection=None, kind=None,
                     model_config=None, **kwargs):
            super().__init__(config, kind, model_config, model_config.mixer_num_heads, pg_collection)
            common = dict(config=config, bias=False, is_expert=False, tp_group=self.tp_group)
            self.in_proj = build_module(submodules.in_proj, config.hidden_size,
                                        self.fused["in_proj.weight"].rows, init_method=config.init_method,
                                        gather_output=False, skip_bias_add=False,
                                        tp_comm_buffer_name="fc1", **common)
            self.out_proj = build_module(submodules.out_proj, self.fused["in_proj.weight"].rows // 2,
                                         config.hidden_size, init_method=config.output_layer_init_method,
                                         input_is_parallel=True, skip_bias_add=True,
                                         tp_comm_buffer_name="fc2", **common)
            self.init_fused("in_proj.weight", config.init_method)  # the same at any TP size

        def forward(self, hidden_states, attention_mask=None, **kwargs):
            proj, _ = self.in_proj(hidden_states)
            u, g = torch.split(proj, self.local_widths("in_proj.weight"), dim=-1)
            return self.out_proj(u * torch.sigmoid(g))

    class ToyKind(LayerKind):
        name, symbol = "toy", "T"
        hf_module = ToyMixerHF

        def check(self, cfg, tp):
            divisible("mixer_num_heads", cfg.mixer_num_heads, tp, "tensor_model_parallel_size")

        def spec(self, backend, cfg):
            return ModuleSpec(module=ToyMixer, params={"kind": self, "model_config": cfg},
                              submodules=GDNMixerSubmodules(in_proj=backend.column_parallel_linear,
                                                            out_proj=backend.row_parallel_linear))

        def fused(self, cfg):
            D = cfg.mixer_value_head_dim
            return [Fused("in_proj.weight", (Section("u", D, "u"), Section("g", D, "g")),
                          cfg.mixer_num_heads, cfg.hidden_size, "{}_proj.weight")]

        def renames(self, cfg):
            return {"out_proj.weight": "o_proj.weight"}

        def parameters(self, cfg):
            H, D = cfg.mixer_num_heads, cfg.mixer_value_head_dim
            return self.fused(cfg)[0].numel() + H * D * cfg.hidden_size

    return ToyKind()


def _register():
    from megatron_ham.layers.kinds import register

    return register(_toy_kind())


@pytest.fixture
def toy_registered():
    from megatron_ham.layers.kinds import unregister

    kind = _register()
    yield kind
    unregister(kind.name)


# ------------------------------------------------------------------ workers (spawned processes)
def _train_worker(rank, world, run_dir, blend):
    from megatron_ham.models.accounting import count_parameters
    from megatron_ham.training.config import load_config
    from megatron_ham.training.loop import setup, train

    _register()
    cfg = load_config(os.path.join(REPO, "recipes", "tiny_cpu.yaml"), [
        "model.architecture=hybrid", "model.pattern=TH", "model.num_layers=2", "model.vocab_size=128",
        f"data.blend={blend}", f"data.cache_dir={run_dir}/cache", "parallel.tp=2",
        f"train.train_steps={STEPS}", "train.warmup_steps=1", "train.eval_interval=0",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.lr=1e-2",
        f"checkpoint.dir={run_dir}/checkpoints", "checkpoint.interval=0",
        f"logging.jsonl={run_dir}/metrics.jsonl", f"logging.tensorboard_dir={run_dir}/tb",
        "logging.interval=1"])
    tr = setup(cfg)
    local = sum(p.numel() for c in tr.model for p in c.module.parameters())
    assert train(tr) == 0
    if rank == 0:
        with open(f"{run_dir}/params.json", "w") as f:
            json.dump({"rank0_local": local, "analytic": count_parameters(cfg.model)["total"]}, f)


def _export_worker(rank, world, run_dir, out):
    import contextlib
    import io

    from megatron_ham.hf.convert import convert

    _register()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        convert(f"{run_dir}/checkpoints", out, verify_tokens=24)
    with open(f"{out}.log", "w") as f:
        f.write(buf.getvalue())


def _load_without_package(out, x_path, y_path):
    """Run in a fresh process where megatron_ham cannot be imported."""
    sys.modules["megatron_ham"] = None
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(m.model.layers[0].mixer).__module__.endswith("kind_toy")
    with torch.no_grad():
        torch.save(m(torch.load(x_path), use_cache=False).logits, y_path)


# ------------------------------------------------------------------ the test
def test_toy_kind_trains_checkpoints_exports_and_loads(tmp_path, toy_registered):
    from test_training_helpers import read_metrics, write_learnable_dataset

    run_dir, out = str(tmp_path / "run"), str(tmp_path / "hf")
    os.makedirs(run_dir)
    blend = write_learnable_dataset(str(tmp_path / "data"), n_docs=60)
    run_world(_train_worker, 2, run_dir, blend)
    rows = read_metrics(f"{run_dir}/metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3, [r["loss"] for r in rows]
    assert sorted(rows[0]["kv"]) == ["2"]  # the HAM layer's controller; the toy has none
    params = json.load(open(f"{run_dir}/params.json"))
    assert params["rank0_local"] < params["analytic"]  # heads (and vocab) split over TP=2
    ck = f"{run_dir}/checkpoints/step_{STEPS:08d}"
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(ck)
    assert {"decoder.layers.0.self_attention.in_proj.weight.u",
            "decoder.layers.0.self_attention.in_proj.weight.g"} <= set(meta)

    run_world(_export_worker, 1, run_dir, out)
    log = open(f"{out}.log").read()
    diff = float(log.split("max |logits(Megatron) - logits(HF)| = ")[1].split()[0])
    assert diff < 2e-5, log
    cfg = json.load(open(f"{out}/config.json"))
    assert cfg["layer_pattern"] == "TH" and cfg["kind_symbols"]["T"] == "toy"
    assert os.path.isfile(f"{out}/kind_toy.py")
    from safetensors import safe_open

    with safe_open(f"{out}/model.safetensors", "pt") as f:
        assert {"model.layers.0.mixer.u_proj.weight", "model.layers.0.mixer.g_proj.weight",
                "model.layers.0.mixer.o_proj.weight"} <= set(f.keys())

    # loaded with the package's classes (the registry gives ToyMixerHF) ...
    import megatron_ham.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    from megatron_ham.training.config import load_run_config

    m = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(m.model.layers[0].mixer, ToyMixerHF)
    model_cfg = load_run_config(f"{ck}/config.yaml").model
    assert sum(p.numel() for p in m.model.layers[0].mixer.parameters()) == toy_registered.parameters(model_cfg)
    x = torch.randint(1, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = m(x, use_cache=False).logits
        c, outs = None, []
        for a, b in ((0, 7), (7, 8), (8, 20)):
            o = m(x[:, a:b], past_key_values=c, use_cache=True)
            c, outs = o.past_key_values, outs + [o.logits]
    assert (torch.cat(outs, 1) - y).abs().max() < 2e-5
    # ... and in a process without megatron_ham, through the code the export ships
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys; sys.path = [p for p in sys.path if p not in ('', %r)]; "
            "sys.path.insert(0, %r); import test_layer_kind_plugin as t; "
            "t._load_without_package(%r, %r, %r)" % (REPO, os.path.join(REPO, "tests"), out,
                                                     str(tmp_path / "x.pt"), str(tmp_path / "y.pt")))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert (torch.load(tmp_path / "y.pt") - y).abs().max() < 1e-6
