"""`ham-convert-hf --verify`: the export directory itself, loaded the way a user loads it.

A fresh Python process without megatron_ham (the package is blocked in ``sys.modules``, no
PYTHONPATH, an empty transformers module cache, offline) runs
``AutoModelForCausalLM.from_pretrained(EXPORT, trust_remote_code=True)`` and the tokenizer, and
writes the logits of the given tokens; the converter compares them with the Megatron model's.
So what is checked is exactly the code and weights that will be published, not the package's
copy of the model.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

# runs in the fresh process: argv = [export_dir, scratch_dir]
_CHILD = r"""
import json, os, sys
sys.modules["megatron_ham"] = None  # the export must load without the package
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

export, scratch = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype="auto").eval()
x = torch.from_numpy(np.load(os.path.join(scratch, "tokens.npy"), allow_pickle=False))
with torch.no_grad():
    logits = model(x, use_cache=False).logits.float().numpy()
np.save(os.path.join(scratch, "logits.npy"), logits, allow_pickle=False)
info = {"module_file": os.path.realpath(sys.modules[type(model).__module__].__file__),
        "megatron_ham_loaded": any(k.startswith("megatron_ham") and v is not None for k, v in sys.modules.items()),
        "tokenizer": None}
if os.path.isfile(os.path.join(export, "tokenizer_config.json")):
    tok = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    info["tokenizer"] = tok("hello world")["input_ids"]
with open(os.path.join(scratch, "info.json"), "w") as f:
    json.dump(info, f)
"""


class VerifyError(RuntimeError):
    """The export did not load, or its logits differ from the Megatron model's."""


def export_logits(export_dir: str, tokens: np.ndarray, timeout: float = 900) -> tuple:
    """(logits [b, t, V] float32, info) of the export at ``export_dir`` on ``tokens`` [b, t] int64,
    computed in a fresh process (module docstring). Raises VerifyError with the child's error."""
    scratch = tempfile.mkdtemp(prefix="ham_verify_")
    try:
        np.save(os.path.join(scratch, "tokens.npy"), np.ascontiguousarray(tokens, dtype=np.int64))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.update(HF_MODULES_CACHE=os.path.join(scratch, "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONNOUSERSITE="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
        p = subprocess.run([sys.executable, "-c", _CHILD, os.path.abspath(export_dir), scratch], cwd=scratch,
                           env=env, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise VerifyError(f"{export_dir}: loading the export with trust_remote_code=True in a fresh process "
                              f"failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
        with open(os.path.join(scratch, "info.json"), encoding="utf-8") as f:
            info = json.load(f)
        if info["megatron_ham_loaded"] or not info["module_file"].startswith(os.path.realpath(scratch)):
            raise VerifyError(f"{export_dir}: the model class came from {info['module_file']}, not from the "
                              "export's own code")
        return np.load(os.path.join(scratch, "logits.npy"), allow_pickle=False), info
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
