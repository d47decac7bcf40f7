#!/usr/bin/env python
"""GPU timing of the mixers' short conv + SiLU: fla's Triton kernel against the compiled reference.

The GDN/HAM mixers run SiLU(causal depthwise conv) over the q, k, v section of the in-projection
(a strided view), then the activations (q, k L2-normalised, decay, beta). Until 2026-12-03 the conv
was the reference op compiled by torch.compile (model.fusions, documents as ids); now it is fla's
Triton kernel (ops.short_conv impl "fla", documents as cu_seqlens). Both are timed here in the
same run, forward+backward (CUDA events, median of --iters), at the recipe's shape (default
ham_800m: 12 heads x (2 x 128 + 128) channels, kernel 4, bf16, two documents in the row):

  conv_compiled    the reference, torch.compile'd (the baseline of the ratios)
  conv_fla         fla's kernel (what the mixers run on CUDA now)
  conv_eager       the reference, eager (for scale)
  +act rows        the same followed by the compiled gdn_activations (the mixer's whole front end)
  *_pre+act        the conv WITHOUT its SiLU (silu=False), then the SiLU and the activations,
                   compiled and recomputed in backward (layers.gdn_mixer.activations_recomputed):
                   (fla's backward then neither recomputes the conv nor re-reads it at every tap)
  *_pre+act_triton the same with our Triton SiLU + norm kernels for q, k, v (ops.gdn_activations.
                   qkv_activations impl "triton") and the compiled decay and beta
  conv_fla_pre     the conv alone (silu=False) on fla's kernels: what the mixers run (with
                   +act_triton: the mixers' whole front end)
Each row's ratio is against the baseline of its kind (the last column names it).

    python tools/bench_short_conv.py --T 16384 --json $OUT/short_conv.json
    python tools/bench_short_conv.py --profile     # also the conv_fla_pre row's kernels
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_kernels import time_fwd_bwd  # noqa: E402  (tools/, this script's directory)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[16384], help="tokens per row")
    p.add_argument("--heads", type=int, default=12, help="mixer heads on this rank")
    p.add_argument("--K", type=int, default=128, help="key head dim")
    p.add_argument("--V", type=int, default=128, help="value head dim")
    p.add_argument("--W", type=int, default=4, help="conv kernel")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--json", type=str, default=None, help="write the rows to this JSON file")
    p.add_argument("--profile", action="store_true",
                   help="also the CUDA kernels of the conv_fla_pre row (torch.profiler, ms per call)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_short_conv.py needs a CUDA GPU")
    from megatron_ham.layers.gdn_mixer import activations_recomputed
    from megatron_ham.ops.gdn_activations import decay_and_beta, gdn_activations, qkv_activations
    from megatron_ham.ops.short_conv import causal_conv_silu

    dev = torch.device("cuda")
    H, K, V, W = args.heads, args.K, args.V, args.W
    C = H * (2 * K + V)
    print(f"# device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; C = {C}, W = {W}")
    conv_c = torch.compile(causal_conv_silu, dynamic=False)
    act_c = torch.compile(gdn_activations, dynamic=False)
    act_r = torch.compile(activations_recomputed, dynamic=False)
    db_c = torch.compile(decay_and_beta, dynamic=False)
    rows = []
    for T in args.T:
        torch.manual_seed(T)
        # the projection's output [1, T, q k v | z | beta a]: the conv reads a strided view of it
        proj = torch.randn(1, T, C + H * V + 2 * H, device=dev).bfloat16().requires_grad_()
        w = (torch.randn(C, W, device=dev) / 2).bfloat16().requires_grad_()
        A_log, dt_bias = torch.rand(H, device=dev).add(1).log(), torch.rand(H, device=dev)
        cut = T // 3
        cu = torch.tensor([0, cut, T], device=dev, dtype=torch.int64)
        doc = (torch.arange(T, device=dev) >= cut).long()[None]
        dy = torch.randn(1, T, C, device=dev).bfloat16()
        convs = {
            "conv_compiled": lambda x: conv_c(x, w, doc, impl="reference"),
            "conv_fla": lambda x: causal_conv_silu(x, w, cu_seqlens=cu, impl="fla"),
            "conv_eager": lambda x: causal_conv_silu(x, w, doc, impl="reference"),
        }
        for name, conv in convs.items():
            def step(conv=conv):
                conv(proj[..., :C]).backward(dy)

            def step_act(conv=conv):
                a, beta = proj[..., C + H * V: C + H * V + H], proj[..., C + H * V + H:]
                q, k, v, g, b = act_c(conv(proj[..., :C]), a, beta, A_log, dt_bias, H, K, V)
                (q.float().sum() + k.float().sum() + v.float().sum() + g.sum() + b.sum()).backward()

            for label, fn, base in ((name, step, "conv_compiled"),
                                    (name + "+act", step_act, "conv_compiled+act")):
                ms, peak, _ = time_fwd_bwd(fn, [proj, w], args.warmup, args.iters)
                rows.append(dict(name=label, T=T, C=C, ms=ms, peak_mib=peak, base=base))
        # what the mixers run: the conv without its SiLU, the SiLU inside the compiled activations
        conv_pre_c = lambda x: conv_c(x, w, doc, impl="reference", silu=False)  # noqa: E731
        conv_pre_fla = lambda x: causal_conv_silu(x, w, cu_seqlens=cu, impl="fla", silu=False)  # noqa: E731
        for name, conv in (("conv_fla_pre", conv_pre_fla),):
            ms, peak, _ = time_fwd_bwd(lambda conv=conv: conv(proj[..., :C]).backward(dy), [proj, w],
                                       args.warmup, args.iters)
            rows.append(dict(name=name, T=T, C=C, ms=ms, peak_mib=peak, base="conv_fla_pre"))
            if args.profile:
                from bench_norm_mlp import kernel_table  # tools/, this script's directory

                rows[-1]["kernels"] = kernel_table(lambda conv=conv: conv(proj[..., :C]).backward(dy),
                                                   [proj, w])

        def act_triton(x, a, beta):
            return qkv_activations(x, H, K, V, silu=True, impl="triton") + db_c(a, beta, A_log, dt_bias)

        pre_rows = {
            "conv_compiled_pre+act": (conv_pre_c, lambda x, a, b: act_r(x, a, b, A_log, dt_bias, H, K, V)),
            "conv_fla_pre+act": (conv_pre_fla, lambda x, a, b: act_r(x, a, b, A_log, dt_bias, H, K, V)),
            "conv_fla_pre+act_triton": (conv_pre_fla, act_triton),
        }
        for name, (conv, act) in pre_rows.items():
            def step_pre(conv=conv, act=act):
                a, beta = proj[..., C + H * V: C + H * V + H], proj[..., C + H * V + H:]
                q, k, v, g, b = act(conv(proj[..., :C]), a, beta)
                (q.float().sum() + k.float().sum() + v.float().sum() + g.sum() + b.sum()).backward()

            ms, peak, _ = time_fwd_bwd(step_pre, [proj, w], args.warmup, args.iters)
            rows.append(dict(name=name, T=T, C=C, ms=ms, peak_mib=peak, base="conv_compiled_pre+act"))
        mine = [r for r in rows if r["T"] == T]
        ms_of = {r["name"]: r["ms"] for r in mine}
        print(f"\nT = {T}: fwd+bwd ms, ratio to the baseline of the same row kind")
        print(f"{'row':<28}{'ms':>9}{'x baseline':>12}{'peak MiB':>10}  baseline")
        for r in mine:
            r["x_baseline"] = r["ms"] / ms_of[r["base"]]
            print(f"{r['name']:<28}{r['ms']:>9.3f}{r['x_baseline']:>12.2f}{r['peak_mib']:>10.0f}  "
                  f"{r['base']}")
            for kname, kms in r.get("kernels", []):
                print(f"    {kms:8.3f} ms  {kname[:90]}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
