"""One place that prints and records metrics (rank 0 only): stdout lines a person reads, plus
TensorBoard scalars under the same names (train/loss, train/lr, ..., kv/layer_03_fraction),
plus a JSON-lines file (one object per logged step / validation, exact floats) for tools and tests."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional

#: the megatron_ham package this process runs (the startup record names it)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.3e}"
    return f"{v:.4f}" if a < 10 else f"{v:.1f}"


class MetricsWriter:
    def __init__(self, enabled: bool, tensorboard_dir: Optional[str] = None,
                 jsonl_path: Optional[str] = None):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if enabled and jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            self.jsonl = open(jsonl_path, "a", encoding="utf-8")
        if enabled and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=tensorboard_dir)
            except Exception as e:  # tensorboard missing: stdout only
                print(f"[log] TensorBoard disabled: {e}", flush=True)

    def info(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def train_step(self, step: int, total: int, m: Dict[str, float], kv: Dict[int, Dict[str, float]]):
        if not self.enabled:
            return
        parts = [
            f"step {step:>6d}/{total}",
            f"loss {_fmt(m['loss'])}",
            f"lr {m['lr']:.3e}",
            f"grad_norm {_fmt(m['grad_norm'])}",
            f"tok/s {m['tokens_per_s']:.0f}",
            f"tok/s/dev {m['tokens_per_s_per_device']:.0f}",
            "MFU " + ("n/a" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%"),
            f"step_time {m['step_time_s']:.3f}s",
        ]
        for k in ("mem_alloc_gib", "mem_reserved_gib", "mem_rss_gib"):
            if k in m:
                parts.append(f"{k.replace('_gib', '')} {m[k]:.2f}GiB")
        line = " | ".join(parts)
        if kv:
            line += " | kv " + " ".join(
                f"L{l}:{v['fraction']:.2f}/tau={v['tau']:.3g}" for l, v in sorted(kv.items())
            )
        print(line, flush=True)
        self._record({"kind": "train", "step": step, **m,
                      "kv": {str(l): v for l, v in sorted(kv.items())}})
        if self.tb is not None:
            for k, v in m.items():
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    self.tb.add_scalar(f"train/{k}", v, step)
            for l, v in kv.items():
                self.tb.add_scalar(f"kv/layer_{l:02d}_fraction", v["fraction"], step)
                self.tb.add_scalar(f"kv/layer_{l:02d}_tau", v["tau"], step)
            self.tb.flush()

    def first_step(self, step: int, seconds: float, step_s: float, cache: dict, compiles: Dict[str, int]):
        """The time from process start to the end of this process's first step (set-up, imports
        and compilation included), with the compile cache's state, Inductor's cache counters and
        the directory of the megatron_ham that ran (``code``)."""
        if not self.enabled:
            return
        where = "no compile cache set" if cache.get("dir") is None else (
            f"compile cache {'warm' if cache['warm'] else 'cold'} at start")
        hits = (f"; Inductor FX graph cache {compiles['fxgraph_cache_hit']} hits / "
                f"{compiles['fxgraph_cache_miss']} misses, AOTAutograd cache "
                f"{compiles['autograd_cache_hit']} hits / {compiles['autograd_cache_miss']} misses"
                if compiles else "")
        print(f"[train] first step done {seconds:.1f} s after process start (set-up "
              f"{seconds - step_s:.1f} s, step {step:d} {step_s:.1f} s); {where}{hits}", flush=True)
        self._record({"kind": "startup", "step": step, "time_to_first_step_s": seconds,
                      "setup_s": seconds - step_s, "first_step_s": step_s, "compile_cache": cache,
                      "compile_counters": compiles, "code": _PACKAGE_DIR})

    def validation(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        print(f"step {step:>6d} | validation loss {_fmt(loss)} | ppl {_fmt(math.exp(min(loss, 50)))}",
              flush=True)
        self._record({"kind": "valid", "step": step, "loss": loss})
        if self.tb is not None:
            self.tb.add_scalar("valid/loss", loss, step)
            self.tb.flush()

    def _record(self, obj: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(obj) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.tb is not None:
            self.tb.close()
