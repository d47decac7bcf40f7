#!/usr/bin/env python
"""Print parameters and KV-cache bytes per token of the paper's ~800M configurations.

    python tools/model_table.py [--context 16384]

KV/token: bytes of keys+values stored per token (bf16): attention layers store every token;
HAM layers store kv_fraction of the tokens (scratchpad K and V). State/seq: the constant memory
of the GDN/HAM layers per sequence (fp32 state H*K*V plus the bf16 conv tail), independent of the
length; Total/token = KV/token + State/seq / context (the state amortised over the context).
Counts are analytic (megatron_ham.models.accounting), equal to build_model's parameter count.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ham.models.accounting import cache_bytes, count_parameters  # noqa: E402
from megatron_ham.models.presets import PAPER_ARCHITECTURES, paper_800m  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--context", type=int, default=16384)
    a = ap.parse_args(argv)
    rows = []
    for arch in PAPER_ARCHITECTURES:
        cfg = paper_800m(arch)
        p = count_parameters(cfg)
        c = cache_bytes(cfg, a.context)
        rows.append((arch, cfg.num_layers, cfg.resolved_pattern(), p["total"], c))
    ref = next(r[3] for r in rows if r[0] == "transformer")
    print(f"context {a.context}; bf16 KV, fp32 recurrent state")
    hdr = (f"{'model':<12} {'layers':>6} {'pattern':<10} {'params':>12} {'vs T':>7} "
           f"{'KV B/tok':>10} {'state MiB/seq':>14} {'total B/tok':>12}")
    print(hdr)
    print("-" * len(hdr))
    for arch, L, pat, n, c in rows:
        pat_s = pat if len(pat) <= 10 else pat[:7] + "..."
        print(f"{arch:<12} {L:>6} {pat_s:<10} {n:>12,} {100 * (n / ref - 1):>+6.1f}% "
              f"{c['kv_per_token']:>10,.0f} {c['state_per_seq'] / 2**20:>14.2f} "
              f"{c['total_per_token']:>12,.0f}")
    tot = [r[3] for r in rows]
    print(f"max/min parameter ratio: {max(tot) / min(tot):.4f}")


if __name__ == "__main__":
    main()
