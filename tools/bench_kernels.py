#!/usr/bin/env python
"""GPU timing of the HAM mixer kernels against dense causal SDPA, measured in the same run.

Per sequence length T (default 4096 and 16384), B=1, H=16 heads, head dim 128, bf16, every row
timed forward+backward (CUDA events, warm-up, median of --iters runs) with its peak memory (the
allocator's peak during one fwd+bwd, minus what was allocated before it):

  sdpa            dense causal torch SDPA (the baseline of every ratio)
  gdn_fla         fla 0.6.0 chunk_gated_delta_rule alone
  gdn_ours        megatron_ham.kernels.gdn_with_error, no error (fla stages in our autograd.Function)
  gdn_err         the same with the routing error (our Triton kernel on fla's chunk intermediates)
  scratch@f       scratchpad alone at KV fraction f: compaction + staircase BlockMask build +
                  compiled FlexAttention (the mask construction is inside every timed call)
  ham@f           HAM mixer core: GDN + error + min over heads + threshold routing + scratchpad +
                  gated_combine (torch.compile'd; the eager op is timed too as combine_eager)
  mask_build      the compaction plan and BlockMask construction alone (forward only)
  sdpa+gdn        both in one fwd+bwd (the memory target's comparison)

then the ratios of the issue's targets. Writes a JSON of all rows with --json.

    PYTHONUNBUFFERED=1 python tools/bench_kernels.py --json $OUT/bench.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[4096, 16384], help="sequence lengths")
    p.add_argument("--H", type=int, default=16, help="heads")
    p.add_argument("--D", type=int, default=128, help="head dim (K = V = D)")
    p.add_argument("--fracs", type=float, nargs="+", default=[0.1, 0.25, 0.5], help="KV fractions")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--flex-options", type=str, default=None,
                   help="JSON kernel_options for flex_attention (default: FlexAttention's)")
    p.add_argument("--json", type=str, default=None, help="write all rows to this JSON file")
    return p.parse_args(argv)


def time_fwd_bwd(fn, leaves, warmup, iters):
    """Median ms of fn() (which runs forward and backward) and its peak extra memory in MiB."""
    def clear():
        for x in leaves:
            x.grad = None
    for _ in range(warmup):
        clear()
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        clear()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    clear()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    clear()
    return statistics.median(ts), peak, ts


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    from megatron_ham.kernels import scratchpad as sp
    from megatron_ham.kernels.gdn import gdn_with_error
    from megatron_ham.ops.combine import gated_combine
    from megatron_ham.ops.routing import min_over_heads, route

    opts = json.loads(args.flex_options) if args.flex_options else None
    combine_c = torch.compile(gated_combine, dynamic=False)
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    print(f"# device {name}, torch {torch.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    rows = []
    B, H, D = 1, args.H, args.D
    for T in args.T:
        torch.manual_seed(T)
        q = F.normalize(torch.randn(B, T, H, D, device=dev), dim=-1).bfloat16().requires_grad_()
        k = F.normalize(torch.randn(B, T, H, D, device=dev), dim=-1).bfloat16().requires_grad_()
        v = torch.randn(B, T, H, D, device=dev).bfloat16().requires_grad_()
        g = F.logsigmoid(torch.randn(B, T, H, device=dev) + 3.0).requires_grad_()
        beta = torch.sigmoid(torch.randn(B, T, H, device=dev)).bfloat16().requires_grad_()
        gr = torch.randn(B, T, H, device=dev).bfloat16().requires_grad_()
        gk = torch.randn(B, T, H, device=dev).bfloat16().requires_grad_()
        og = torch.randn(B, T, H, D, device=dev).bfloat16().requires_grad_()
        w = torch.ones(D, device=dev).bfloat16().requires_grad_()
        qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        do = torch.randn(B, T, H, D, device=dev).bfloat16()
        doh = do.transpose(1, 2).contiguous()
        gdn_leaves = [q, k, v, g, beta]
        all_leaves = gdn_leaves + [gr, gk, og, w]

        # thresholds giving each fraction exactly on these inputs
        with torch.no_grad():
            _, _, err0 = gdn_with_error(q, k, v, g, beta, return_error=True)
            score0 = min_over_heads(err0)
        taus = {f: torch.quantile(score0.float().flatten(), 1.0 - f).item() for f in args.fracs}
        routed_f = {f: route(score0, taus[f]) for f in args.fracs}

        def sdpa():
            F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).backward(doh)

        def gdn_fla():
            o, _ = chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta)
            o.backward(do)

        def gdn_ours(err):
            def f():
                o, _, e = gdn_with_error(q, k, v, g, beta, return_error=err)
                o.backward(do)
            return f

        def sdpa_gdn():
            o1 = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
            o2, _ = chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta)
            torch.autograd.backward([o1, o2], [doh, do])

        def scratch(f):
            r = routed_f[f]

            def fn():
                sp.scratchpad_attention_flex(q, k, v, r, kernel_options=opts).backward(do)
            return fn

        def mask_build(f):
            """compaction plan + BlockMask construction alone (included in every scratch/ham row)"""
            r = routed_f[f]

            def fn():
                plan = sp._compiled_plan()(r, None, None)
                sp._block_mask(r.shape[1], *plan[2:], lambda b, h, qi, ki: qi >= ki)
            return fn

        def ham(f, comb):
            tau = taus[f]

            def fn():
                o_rnn, _, err = gdn_with_error(q, k, v, g, beta, return_error=True)
                routed = route(min_over_heads(err), tau)
                o_kv = sp.scratchpad_attention_flex(q, k, v, routed, kernel_options=opts)
                comb(o_rnn, o_kv, gr, gk, og, w).backward(do)
            return fn

        def combine_only(comb):
            o1 = torch.randn(B, T, H, D, device=dev).bfloat16().requires_grad_()
            o2 = torch.randn(B, T, H, D, device=dev).bfloat16().requires_grad_()

            def fn():
                comb(o1, o2, gr, gk, og, w).backward(do)
            return fn, [o1, o2, gr, gk, og, w]

        cases = [("sdpa", sdpa, [qh, kh, vh]), ("gdn_fla", gdn_fla, gdn_leaves),
                 ("gdn_ours", gdn_ours(False), gdn_leaves), ("gdn_err", gdn_ours(True), gdn_leaves),
                 ("sdpa+gdn", sdpa_gdn, gdn_leaves + [qh, kh, vh])]
        for f in args.fracs:
            cases.append((f"scratch@{f}", scratch(f), [q, k, v]))
        for f in args.fracs:
            cases.append((f"ham@{f}", ham(f, combine_c), all_leaves))
        cases.append((f"mask_build@{max(args.fracs)}", mask_build(max(args.fracs)), []))
        ce, ce_leaves = combine_only(gated_combine)
        cc, cc_leaves = combine_only(combine_c)
        cases += [("combine_eager", ce, ce_leaves), ("combine_compiled", cc, cc_leaves)]

        res = {}
        for label, fn, leaves in cases:
            ms, mib, ts = time_fwd_bwd(fn, leaves, args.warmup, args.iters)
            res[label] = (ms, mib)
            spread = (max(ts) - min(ts)) / ms
            print(f"T={T:6d} {label:18s} {ms:8.3f} ms  peak {mib:8.1f} MiB  (spread {spread:.0%})")
            rows.append({"T": T, "case": label, "ms": ms, "peak_mib": mib, "all_ms": ts})

        s = res["sdpa"][0]
        print(f"\n## T={T}: ratios (dense causal SDPA = {s:.3f} ms)")
        print(f"{'case':18s} {'ms':>8s} {'x SDPA':>7s} {'peak MiB':>9s}")
        for label, (ms, mib) in res.items():
            print(f"{label:18s} {ms:8.3f} {ms / s:7.3f} {mib:9.1f}")
        print("targets:")
        for f in args.fracs:
            hr = res[f"ham@{f}"][0] / s
            tgt = {0.5: 1.0, 0.25: 0.75}.get(f)
            if tgt is not None:
                print(f"  ham@{f}: {hr:.3f} x SDPA (target <= {tgt}) {'MET' if hr <= tgt else 'MISSED'}")
        for f in args.fracs:
            sr = res[f"scratch@{f}"][0] / (f * s)
            print(f"  scratch@{f}: {sr:.3f} x (f x SDPA) (target <= 1.5) {'MET' if sr <= 1.5 else 'MISSED'}")
        eo = res["gdn_err"][0] / res["gdn_ours"][0] - 1
        ef = res["gdn_err"][0] / res["gdn_fla"][0] - 1
        print(f"  error extraction: +{eo:.1%} vs gdn_ours, +{ef:.1%} vs gdn_fla (target <= 10%) "
              f"{'MET' if max(eo, ef) <= 0.10 else 'MISSED'}")
        if 0.5 in args.fracs:
            hm = res["ham@0.5"][1]
            sm = res["sdpa"][1] + res["gdn_fla"][1]
            print(f"  peak memory ham@0.5 {hm:.0f} MiB vs sdpa+gdn_fla {sm:.0f} MiB (sum of peaks), "
                  f"{res['sdpa+gdn'][1]:.0f} MiB (one graph) {'MET' if hm <= sm else 'MISSED'}\n")
        del q, k, v, g, beta, qh, kh, vh
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
