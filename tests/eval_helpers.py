"""Helpers (no tests) for the ham-eval tests: one tiny trained checkpoint and its HF export.

`trained_run(tmp_path_factory)` builds, once per pytest session (cached under the session's base
temp dir, so test_eval.py and test_eval_lm_eval.py share it):
  - data: the sample corpus's `licenses` documents (14) tokenized with the sample tokenizer
    (vocab 8000, EOD 0) into an IndexedDataset + blend.json, as ham-prep-data lays them out;
  - a real `ham-train recipes/tiny_cpu.yaml` run on 1 CPU rank (6 steps, validation at step 6
    on 2 x 4 sequences of the 80/10/10 split's validation documents, checkpoint at the end);
  - its export by the `ham-convert-hf` CLI (in this process), with the sample tokenizer.
"""
from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data_prep", "sample")
TOKENIZER = os.path.join(SAMPLE, "tokenizer")
EOD = 0
SPLIT = "80,10,10"


def sample_documents():
    """The token ids of the sample corpus's licenses documents (each ends with EOD)."""
    import zstandard
    from tokenizers import Tokenizer

    with open(os.path.join(SAMPLE, "pretrain", "licenses.jsonl.zst"), "rb") as f:
        raw = zstandard.ZstdDecompressor().decompress(f.read(), max_output_size=1 << 28)
    tok = Tokenizer.from_file(os.path.join(TOKENIZER, "tokenizer.json"))
    return [tok.encode(json.loads(line)["text"]).ids + [EOD] for line in raw.splitlines()]


def write_indexed(prefix: str, docs) -> None:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs:
        b.add_item(torch.tensor(d, dtype=torch.int64))
        b.end_document()
    b.finalize(prefix + ".idx")


def write_blend(path: str, prefix: str, vocab_size: int = 8000) -> str:
    with open(path, "w") as f:
        json.dump({"blend": [{"prefix": os.path.basename(prefix), "weight": 1.0}], "tokenizer": TOKENIZER,
                   "vocab_size": vocab_size, "eod_id": EOD}, f)
    return path


def trained_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.getbasetemp() / "eval_trained_run"
    done = root / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    root.mkdir(exist_ok=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_training_helpers import logs, read_metrics, run

    data = root / "data"
    data.mkdir()
    prefix = str(data / "licenses")
    write_indexed(prefix, sample_documents())
    blend = write_blend(str(data / "blend.json"), prefix)
    run_dir = root / "run"
    ov = [f"data.blend={blend}", f"checkpoint.dir={run_dir}/checkpoints",
          f"logging.jsonl={run_dir}/metrics.jsonl", f"logging.tensorboard_dir={run_dir}/tb",
          f"data.cache_dir={data}/cache", f"data.eod_id={EOD}", f"data.tokenizer={TOKENIZER}",
          f"data.split='{SPLIT}'", "train.train_steps=6", "train.global_batch_size=4",
          "train.micro_batch_size=2", "train.warmup_steps=2", "train.eval_interval=6",
          "train.eval_iters=2", "checkpoint.interval=0", "logging.interval=1"]
    codes = run(1, ov, f"{run_dir}.log")
    assert codes == [0], logs(f"{run_dir}.log", 1)
    valid = read_metrics(f"{run_dir}/metrics.jsonl", "valid")
    assert [v["step"] for v in valid] == [6], valid

    from megatron_ham.hf.convert import main as convert_main

    hf = str(root / "hf")
    assert convert_main(["--checkpoint", f"{run_dir}/checkpoints", "--output", hf,
                         "--tokenizer", TOKENIZER]) == 0
    out = {"root": str(root), "blend": blend, "prefix": prefix, "checkpoint": f"{run_dir}/checkpoints",
           "hf": hf, "valid_loss": valid[0]["loss"]}
    done.write_text(json.dumps(out))
    return out
