#!/usr/bin/env python
"""Single-GPU forward/backward of a paper ~800M model at 16k context in bf16; prints time and
peak memory. Not a benchmark (one step after one warm-up step).

    python tools/gpu_smoke_800m.py [--arch ham] [--seq 16384] [--batch 1] [--docs 4]

--docs N packs N documents in the row (EOD boundaries via document_forward_kwargs).
Runs as a single-process world (torchrun not needed).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    from megatron_ham.models.presets import PAPER_ARCHITECTURES

    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="ham", choices=list(PAPER_ARCHITECTURES))
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--docs", type=int, default=1)
    ap.add_argument("--router", default="learned")
    ap.add_argument("--recompute", default="", choices=["", "full", "selective"],
                    help="Megatron activation recomputation (default off)")
    a = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_smoke_800m.py needs a GPU")
    os.environ.setdefault("MASTER_PORT", "29517")
    from megatron_ham import distributed as D
    from megatron_ham.models import build_model, document_forward_kwargs, paper_800m, step_kv_controllers
    from megatron_ham.models.accounting import count_parameters

    D.initialize(tp=1, pp=1, seed=1)
    cfg = paper_800m(a.arch, seq_length=a.seq, router=a.router)
    model = build_model(cfg).cuda()
    if a.recompute:  # as the training loop does (train.recompute)
        model.config.recompute_granularity = a.recompute
        if a.recompute == "full":
            model.config.recompute_method = "uniform"
            model.config.recompute_num_layers = 1
    n = sum(p.numel() for p in model.parameters())
    assert n == count_parameters(cfg)["total"], (n, count_parameters(cfg))
    print(f"{a.arch}: {n:,} parameters, layers {cfg.resolved_pattern()}, seq {a.seq}, "
          f"batch {a.batch}, docs {a.docs}, recompute {a.recompute or 'off'}", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(1, cfg.vocab_size, (a.batch, a.seq), device="cuda", generator=g)
    for i in range(1, a.docs):
        tokens[:, i * a.seq // a.docs - 1] = 0
    labels = torch.roll(tokens, -1, 1)
    pos = torch.arange(a.seq, device="cuda")[None].expand(a.batch, -1)
    kw = document_forward_kwargs(tokens, 0) if a.docs > 1 else {}
    model.train()
    for step in range(2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        try:
            loss = model(tokens, pos, None, labels=labels, **kw).float().mean()
            loss.backward()
            torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:
            print(f"step {step}: OUT OF MEMORY (peak "
                  f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB of "
                  f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)", flush=True)
            break
        dt = time.time() - t0
        stats = step_kv_controllers([model])
        model.zero_grad(set_to_none=True)
        fr = [round(v["fraction"], 3) for v in stats.values()]
        print(f"step {step}: loss {loss.item():.4f}  fwd+bwd {dt:.2f} s  peak memory "
              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB  routed fractions {fr[:6]}",
              flush=True)
    D.destroy()


if __name__ == "__main__":
    main()
