"""Held-out data for perplexity, built by the training data path (megatron_ham.training.data).

    ho = heldout(data, run_cfg, split="valid", num_samples=64, seq_length=16384,
                 model_vocab=32000, eod_id=2)
    ho.dataset[i] -> {"tokens" [s], "labels" [s], "loss_mask" [s], ...}   (i < ho.num_samples)
    ho.describe() -> dict for the report;  ho.close() removes the index cache it created

`data` is a ham-prep-data blend file or one IndexedDataset prefix.
- split "valid": the run's validation split, exactly as `ham-train` builds it
  (`build_datasets` with the run's data.split, train.seed and sizes): with num_samples equal to
  the run's eval_iters x global_batch_size these are the very samples the loop's validation loss
  was computed on.
- split "test": the run's test documents. `build_datasets` builds train/valid only, so the
  split string a,b,c is passed as (a+b),c,0: the valid part is then exactly the documents of
  the test part (same boundaries, same seed, same GPTDataset shuffle).
- split "all": every document (split 0,1,0); the default for a bare prefix.
Samples are seq_length + 1 tokens packed across documents (GPTDataset), as in training.
"""
from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import List, Optional

from .errors import EvalError

SPLITS = ("valid", "test", "all")


def data_kind(data: str) -> str:
    """'blend' (a .json/.yaml blend file) or 'prefix' (an IndexedDataset); EvalError otherwise."""
    if os.path.isfile(data):
        if data.endswith((".json", ".yaml", ".yml")):
            return "blend"
        raise EvalError(f"--data {data}: a file but not a blend file (.json / .yaml from ham-prep-data); "
                        "for an IndexedDataset pass its prefix (without .bin/.idx)")
    missing = [data + e for e in (".idx", ".bin") if not os.path.isfile(data + e)]
    if missing:
        raise EvalError(f"--data {data}: no blend file and no IndexedDataset prefix there "
                        f"({', '.join(missing)} missing)")
    return "prefix"


def _split_spec(run_split: str, split: str) -> str:
    if split == "all":
        return "0,1,0"
    parts = [float(x) for x in run_split.split(",")]
    if split == "valid":
        if parts[1] <= 0:
            raise EvalError(f"--split valid: the run's data.split {run_split!r} has no validation part")
        return run_split
    if parts[2] <= 0:
        raise EvalError(f"--split test: the run's data.split {run_split!r} has no test part")
    return f"{parts[0] + parts[1]},{parts[2]},0"


@dataclass
class HeldOut:
    dataset: object
    num_samples: int
    seq_length: int
    info: dict
    _cache: Optional[str] = None
    warnings: List[str] = field(default_factory=list)

    def describe(self) -> dict:
        return dict(self.info)

    def close(self) -> None:
        if self._cache is not None:
            shutil.rmtree(self._cache, ignore_errors=True)
            self._cache = None


def _check_vocab(data: str, vocab, model_vocab: int, train_blend: dict) -> List[str]:
    """EvalError when the data's tokenizer cannot be the model's: its vocabulary is larger than
    the model's, or differs from the run's own training data's (`train_blend`, the run's blend
    info when known). A smaller vocabulary with the training data unknown is only a warning (a
    model's vocab_size may be rounded up past its tokenizer's)."""
    if vocab is None:
        return []
    vocab = int(vocab)
    if vocab > model_vocab:
        raise EvalError(f"--data {data}: the data's tokenizer has vocab_size {vocab}, larger than the "
                        f"model's vocabulary {model_vocab}: the data was tokenized for another model")
    trained = train_blend.get("vocab_size")
    if trained is not None and vocab != int(trained):
        raise EvalError(f"--data {data}: the data's tokenizer has vocab_size {vocab} but the model was "
                        f"trained on data with vocab_size {trained} ({train_blend.get('path')}): the data "
                        "was tokenized for another model")
    if trained is None and vocab != model_vocab:
        return [f"--data {data}: the data's tokenizer has vocab_size {vocab}, the model {model_vocab}; "
                "the run's training data is unknown here, so this is taken as vocabulary padding"]
    return []


def heldout(data: str, run_cfg, *, split: Optional[str], num_samples: int, seq_length: int,
            model_vocab: int, eod_id: Optional[int], cache_dir: Optional[str] = None,
            train_blend: Optional[dict] = None) -> HeldOut:
    """The held-out samples of `data` (see the module docstring). `train_blend`: the run's own
    blend info (model_io.training_blend), for the vocabulary check. Raises EvalError naming the
    file / argument for a missing prefix, a tokenizer that is not the model's, or a split the run
    does not have."""
    from megatron_ham.training.config import ConfigError
    from megatron_ham.training.data import build_datasets, read_blend

    kind = data_kind(data)
    if split is None:
        split = "valid" if kind == "blend" else "all"
    if split not in SPLITS:
        raise EvalError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    cfg = copy.deepcopy(run_cfg)
    d = cfg.data
    d.backend, d.weights = "megatron", []
    d.loss_mask = "all"  # perplexity over every token, whatever the run trained on
    info = {}
    if kind == "blend":
        try:
            _, _, info = read_blend(data)
        except ConfigError as e:
            raise EvalError(f"--data {e}") from e
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EvalError(f"--data {data}: not a readable blend file ({type(e).__name__}: {e})") from e
        d.blend, d.prefixes = os.path.abspath(data), []
    else:
        d.blend, d.prefixes = None, [os.path.abspath(data)]
    warnings = _check_vocab(data, info.get("vocab_size"), model_vocab, train_blend or {})
    d.split = _split_spec(d.split, split)
    d.eod_id = eod_id if eod_id is not None else info.get("eod_id", 0)
    d.tokenizer = None
    made = None
    if cache_dir is None:
        made = cache_dir = tempfile.mkdtemp(prefix="ham_eval_index_")
    d.cache_dir = cache_dir
    cfg.model.seq_length = int(seq_length)
    G = cfg.train.global_batch_size
    cfg.train.train_steps = 1  # the train split is not read; its size does not change the others
    cfg.train.eval_interval = 1
    cfg.train.eval_iters = max(1, math.ceil(num_samples / G))
    try:
        _, valid, _ = build_datasets(cfg, vocab_size=cfg.model.padded_vocab_size())
    except ConfigError as e:
        if made:
            shutil.rmtree(made, ignore_errors=True)
        raise EvalError(f"--data {e}") from e
    except BaseException:
        if made:
            shutil.rmtree(made, ignore_errors=True)
        raise
    if valid is None or len(valid) < num_samples:  # pragma: no cover - the builder guarantees the size
        raise EvalError(f"--data {data}: the {split} split yields no samples")
    desc = {"data": os.path.abspath(data), "kind": kind, "split": split, "split_spec": d.split,
            "seed": cfg.train.seed, "samples": int(num_samples), "seq_length": int(seq_length),
            "tokenizer_vocab": info.get("vocab_size")}
    return HeldOut(valid, int(num_samples), int(seq_length), desc, made, warnings)


__all__ = ["HeldOut", "heldout", "data_kind", "SPLITS"]
