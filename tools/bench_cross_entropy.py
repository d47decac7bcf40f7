#!/usr/bin/env python
"""GPU timing of the language model's loss: our Triton cross entropy against megatron-core's.

The model's loss is ``ops.vocab_parallel_cross_entropy`` (models.language_model.HAMLanguageModel);
on CUDA it runs our kernels (kernels/cross_entropy.py). Until 2026-12-03 the model ran megatron-
core's fused cross entropy (``cross_entropy_loss_fusion``, "native": compiled, keeps the fp32
softmax). Timed in the same run, forward + backward of the per-token loss with a mask as the
training loop applies it (CUDA events, median of --iters), on bf16 logits [T, 1, vocab] (default:
the 800M recipes, 16k tokens x 32,000 ids), one rank:

  megatron_fused   megatron-core's fused_vocab_parallel_cross_entropy (the baseline of the ratios)
  megatron         megatron-core's unfused vocab_parallel_cross_entropy
  triton           ours, impl "triton" (what the model runs on CUDA)
  reference        ours, impl "reference" (eager PyTorch, for scale)

    python tools/bench_cross_entropy.py --json $OUT/cross_entropy.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_kernels import time_fwd_bwd  # noqa: E402  (tools/, this script's directory)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=16384, help="tokens")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary ids on this rank")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", type=str, default=None, help="write the rows to this JSON file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_cross_entropy.py needs a CUDA GPU")
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatron_ce

    from megatron_ham.distributed import free_port
    from megatron_ham.ops.cross_entropy import vocab_parallel_cross_entropy

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    tp = parallel_state.get_tensor_model_parallel_group()
    dev = torch.device("cuda")
    T, V = args.T, args.vocab
    print(f"# device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; logits [{T}, 1, {V}] bf16")
    torch.manual_seed(0)
    logits = (torch.randn(T, 1, V, device=dev) * 3).bfloat16().requires_grad_()
    target = torch.randint(0, V, (T, 1), device=dev)
    mask = (torch.rand(T, 1, device=dev) > 0.1).float()
    losses = {
        "megatron_fused": lambda: fused_vocab_parallel_cross_entropy(logits, target, tp),
        "megatron": lambda: megatron_ce(logits, target),
        "triton": lambda: vocab_parallel_cross_entropy(logits, target, group=tp, impl="triton"),
        "reference": lambda: vocab_parallel_cross_entropy(logits, target, group=tp, impl="reference"),
    }
    rows = []
    for name, loss in losses.items():
        def step(loss=loss):
            ((loss() * mask).sum() / mask.sum()).backward()

        ms, peak, _ = time_fwd_bwd(step, [logits], args.warmup, args.iters)
        rows.append(dict(name=name, T=T, vocab=V, ms=ms, peak_mib=peak))
    base = rows[0]["ms"]
    print(f"{'row':<16}{'ms':>9}{'x fused':>9}{'peak MiB':>10}")
    for r in rows:
        r["x_megatron_fused"] = r["ms"] / base
        print(f"{r['name']:<16}{r['ms']:>9.3f}{r['x_megatron_fused']:>9.2f}{r['peak_mib']:>10.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
