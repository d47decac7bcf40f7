"""lm-evaluation-harness on an exported tiny model, with local tasks (tests/lm_eval_tasks: YAML
over jsonl, no downloads), batch size 4, exactly as a user runs it:

    lm_eval --model hf --model_args pretrained=HF_DIR,trust_remote_code=True \
        --tasks TASK --include_path tests/lm_eval_tasks --batch_size 4

What lm-eval 0.4.13 passes to the model (read from lm_eval/models/huggingface.py):
- loglikelihood (multiple_choice): batches of context+continuation RIGHT-padded with token 0
  and NO attention_mask (`model(inps).logits`); only the real positions' logits are read. A
  causal model is unaffected by right padding, so this works today. Checked: every
  loglikelihood equals the one computed here row by row, unpadded.
- generate_until: prompts LEFT-padded with the tokenizer's pad id and an attention_mask, then
  `model.generate(input_ids, attention_mask=..., pad_token_id=..., use_cache=True)`. With prompts
  of equal token length the mask is all ones and it works today (checked against row-by-row
  greedy generation); prompts of different lengths give a mask with zeros: the padding is
  skipped by every layer, and each row equals its prompt generated alone.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from eval_helpers import REPO, trained_run

pytestmark = pytest.mark.slow
TASKS_DIR = os.path.join(REPO, "tests", "lm_eval_tasks")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_run(tmp_path_factory)


def _env(home: str) -> dict:
    env = dict(os.environ, HF_HOME=home, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # the export is loaded through its own code (trust_remote_code)
    return env


def lm_eval_cli(hf_dir: str, tasks: str, out_dir: str, home: str):
    """Run the lm_eval CLI offline (cwd = the task dir: data_files are relative to it)."""
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={hf_dir},trust_remote_code=True", "--tasks", tasks,
           "--include_path", TASKS_DIR, "--batch_size", "4", "--device", "cpu",
           "--output_path", out_dir, "--log_samples"]
    return subprocess.run(cmd, cwd=TASKS_DIR, env=_env(home), capture_output=True, text=True, timeout=600)


# lm-eval's Python API, the same HFLM path as the CLI; TaskManager(include_defaults=False) skips
# indexing the ~200 built-in task folders (~30 s on the CI machine) that the CLI always indexes
API = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
hf, tasks_dir, task, out = sys.argv[1:]
res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf},trust_remote_code=True",
                              tasks=[task], batch_size=4, device="cpu", log_samples=True,
                              task_manager=TaskManager(include_path=tasks_dir, include_defaults=False))
with open(out, "w") as f:
    json.dump([{"doc": s["doc"], "resps": s["resps"]} for s in res["samples"][task]], f)
"""


def lm_eval_api(hf_dir: str, task: str, out_json: str, home: str):
    return subprocess.run([sys.executable, "-c", API, hf_dir, TASKS_DIR, task, out_json], cwd=TASKS_DIR,
                          env=_env(home), capture_output=True, text=True, timeout=600)


def _samples(out_dir: str, task: str):
    (path,) = glob.glob(os.path.join(out_dir, "*", f"samples_{task}_*.jsonl"))
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _results(out_dir: str):
    (path,) = glob.glob(os.path.join(out_dir, "*", "results_*.json"))
    with open(path) as f:
        return json.load(f)


def _model_and_tokenizer(hf_dir):
    import megatron_ham.hf  # noqa: F401  (the package's class: the same math as the export's code)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(hf_dir).eval(), AutoTokenizer.from_pretrained(hf_dir)


@torch.no_grad()
def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), row by row without padding, split as lm-eval splits it."""
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    x = torch.tensor([whole])
    logp = torch.log_softmax(model(x).logits[0].float(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


@torch.no_grad()
def _greedy(model, tok, prompt: str, n: int) -> str:
    """Greedy continuation of one prompt alone, cut where lm-eval cuts (the task's "\n", the EOS)."""
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:]).split("\n")[0].split(tok.eos_token)[0]


def test_loglikelihood_and_generate_with_batch_4(trained, tmp_path):
    out = str(tmp_path / "out")
    p = lm_eval_cli(trained["hf"], "ham_local_choice,ham_local_gen_equal", out, str(tmp_path / "hf_home"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    res = _results(out)
    assert res["config"]["batch_size"] in (4, "4")
    assert res["results"]["ham_local_choice"]["sample_len"] == 8
    assert 0.0 <= res["results"]["ham_local_choice"]["acc,none"] <= 1.0
    model, tok = _model_and_tokenizer(trained["hf"])
    correct = 0
    for s in _samples(out, "ham_local_choice"):
        ctx = s["doc"]["context"]
        mine = [_loglikelihood(model, tok, ctx, " " + c) for c in s["doc"]["choices"]]
        theirs = [float(r[0][0]) for r in s["resps"]]
        assert max(abs(a - b) for a, b in zip(mine, theirs)) < 1e-3, (ctx, mine, theirs)
        pred = max(range(len(mine)), key=mine.__getitem__)
        assert s["acc"] == float(pred == s["doc"]["answer"])
        correct += pred == s["doc"]["answer"]
    assert res["results"]["ham_local_choice"]["acc,none"] == pytest.approx(correct / 8)
    gens = _samples(out, "ham_local_gen_equal")
    assert len(gens) == 4
    for s in gens:
        assert s["resps"][0][0] == _greedy(model, tok, s["doc"]["prompt"], 6), s


def test_generate_until_with_prompts_of_different_lengths(trained, tmp_path):
    """lm-eval left-pads the batch with the tokenizer's pad id (1, what the export's config and
    generation_config also say) and passes attention_mask with zeros: every row's greedy
    continuation equals the one generated for that prompt alone."""
    out = str(tmp_path / "samples.json")
    p = lm_eval_api(trained["hf"], "ham_local_gen", out, str(tmp_path / "hf_home"))
    assert p.returncode == 0, p.stderr[-2000:]
    model, tok = _model_and_tokenizer(trained["hf"])
    with open(out) as f:
        gens = json.load(f)
    assert len(gens) == 8
    for s in gens:
        assert s["resps"][0][0] == _greedy(model, tok, s["doc"]["prompt"], 6), s
