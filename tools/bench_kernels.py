#!/usr/bin/env python
"""GPU timing of the HAM mixer kernels against dense causal SDPA, measured in the same run.

Per sequence length T (default 4096 and 16384), B=1, H=16 heads, head dim 128, bf16, every row
timed forward+backward (CUDA events, warm-up, median of --iters runs) unless marked "fwd", with
its peak memory (the allocator's peak during one call, minus what was allocated before it) and,
for the attention rows, the achieved TFLOP/s of the visible (query, key) pairs P (4 P D H flops
forward, 3.5x that forward+backward: FlashAttention's convention, whatever the kernel recomputes):

  sdpa, sdpa_fwd   dense causal torch SDPA (the baseline of every ratio), fwd+bwd and fwd only
  gdn_fla          fla 0.6.0 chunk_gated_delta_rule alone
  gdn_ours         megatron_ham.kernels.gdn_with_error, no error (fla stages in our autograd.Function)
  gdn_err          the same with the routing error (our Triton kernel on fla's chunk intermediates)
  sdpa+gdn         both in one fwd+bwd (the memory target's comparison)
  plan             the staircase kernel's compaction plan alone (one launch, fwd only)
  scratch@f        the scratchpad alone at KV fraction f: megatron_ham.kernels.staircase (what
                   impl="auto" runs on CUDA; plan, K/V copies, forward, dq, dk/dv, all timed)
  scratch_fwd@f    the same, forward only
  ham@f            HAM mixer core: GDN + error + min over heads + threshold routing + scratchpad
                   (ops.scratchpad_attention, impl="auto") + gated_combine (torch.compile'd; the
                   eager op is timed too as combine_eager)
  ham_graph@f      ham@f captured once in a CUDA graph and replayed (launch/host cost removed;
                   at --graph-T only, default 4096, where the host is the bound)
  --flex adds      flex@f / ham_flex@f (the FlexAttention path, impl="flex") and mask_build

then the issue's targets. Writes a JSON of all rows with --json.

    PYTHONUNBUFFERED=1 python tools/bench_kernels.py --flex --json $OUT/bench.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
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
    p.add_argument("--flex", action="store_true",
                   help="also time the FlexAttention scratchpad (flex@f, ham_flex@f, mask_build)")
    p.add_argument("--attention-only", action="store_true",
                   help="only the attention rows (sdpa, plan, scratch): routing drawn at random at "
                        "exactly each fraction instead of thresholding GDN's error (no GDN, no HAM)")
    p.add_argument("--graph-T", type=int, nargs="*", default=[4096],
                   help="sequence lengths that also get the CUDA-graph rows ham_graph@f (none: skip)")
    p.add_argument("--flex-options", type=str, default=None,
                   help="JSON kernel_options for flex_attention (default: FlexAttention's)")
    p.add_argument("--json", type=str, default=None, help="write all rows to this JSON file")
    return p.parse_args(argv)


def cuda_median_ms(fn, warmup, iters, before=lambda: None):
    """(median ms, all ms) of fn() by CUDA events, after `warmup` untimed calls; before() runs
    untimed ahead of every call."""
    for _ in range(warmup):
        before()
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        before()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts), ts


def time_fwd_bwd(fn, leaves, warmup, iters):
    """Median ms of fn() (which runs forward and backward) and its peak extra memory in MiB."""
    def clear():
        for x in leaves:
            x.grad = None
    med, ts = cuda_median_ms(fn, warmup, iters, before=clear)
    clear()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    clear()
    return med, peak, ts


ATTENTION_ROWS = ("sdpa", "sdpa_fwd", "plan", "scratch", "scratch_fwd", "flex", "flex_fwd")


def cuda_graphed(fn, leaves):
    """fn (a fwd+bwd step) captured once in a CUDA graph; returns the replay. The gradients of
    leaves are the graph's own buffers, rewritten by every replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for x in leaves:
                x.grad = None
            fn()
    torch.cuda.current_stream().wait_stream(side)
    for x in leaves:
        x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def visible_pairs(routed: torch.Tensor) -> int:
    """Number of (query, key) pairs the scratchpad computes: sum over t of the routed count in
    [0, t] (no documents)."""
    return int(torch.cumsum(routed.long(), dim=1).sum())


def attention_tflops(pairs: int, H: int, D: int, ms: float, fwd_only: bool) -> float:
    flops = 4.0 * pairs * D * H * (1.0 if fwd_only else 3.5)
    return flops / (ms * 1e-3) / 1e12


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    from megatron_ham.kernels import scratchpad as sp
    from megatron_ham.kernels.gdn import gdn_with_error
    from megatron_ham.kernels.staircase import compaction_plan, scratchpad_attention_triton
    from megatron_ham.ops.combine import gated_combine
    from megatron_ham.ops.routing import min_over_heads, route
    from megatron_ham.ops.scratchpad import _select_impl, scratchpad_attention

    opts = json.loads(args.flex_options) if args.flex_options else None
    combine_c = torch.compile(gated_combine, dynamic=False)
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    print(f"# device {name}, torch {torch.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    rows = []
    B, H, D = 1, args.H, args.D

    def flex(q, k, v, r):
        return sp.scratchpad_attention_flex(q, k, v, r, kernel_options=opts)

    def auto(q, k, v, r):  # what the HAM mixer calls
        return scratchpad_attention(q, k, v, r)

    x = torch.zeros(1, 1, 1, D, device=dev, dtype=torch.bfloat16)
    print(f"# scratchpad_attention(impl='auto') on CUDA bf16 resolves to {_select_impl('auto', x, x)!r}")
    scratch_impls = {"scratch": scratchpad_attention_triton}
    ham_impls = {"": auto}
    if args.flex:
        scratch_impls["flex"] = ham_impls["_flex"] = flex
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
            if args.attention_only:
                score0 = torch.rand(B, T, device=dev)
            else:
                _, _, err0 = gdn_with_error(q, k, v, g, beta, return_error=True)
                score0 = min_over_heads(err0)
        taus = {f: torch.quantile(score0.float().flatten(), 1.0 - f).item() for f in args.fracs}
        routed_f = {f: route(score0, taus[f]) for f in args.fracs}
        pairs = {f"@{f}": visible_pairs(routed_f[f]) for f in args.fracs}
        pairs[""] = T * (T + 1) // 2 * B

        def sdpa():
            F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).backward(doh)

        def sdpa_fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)

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

        def plan():
            compaction_plan(routed_f[max(args.fracs)], None)

        def scratch(fn, f, fwd_only=False):
            r = routed_f[f]

            def step():
                if fwd_only:
                    with torch.no_grad():
                        fn(q, k, v, r)
                else:
                    fn(q, k, v, r).backward(do)
            return step

        def mask_build(f):
            """compaction plan + BlockMask construction alone (included in every flex row)"""
            r = routed_f[f]

            def fn():
                plan = sp._compiled_plan()(r, None, None)
                sp._block_mask(r.shape[1], *plan[2:], lambda b, h, qi, ki: qi >= ki)
            return fn

        def ham(fn, f, comb):
            tau = taus[f]

            def step():
                o_rnn, _, err = gdn_with_error(q, k, v, g, beta, return_error=True)
                routed = route(min_over_heads(err), tau)
                o_kv = fn(q, k, v, routed)
                comb(o_rnn, o_kv, gr, gk, og, w).backward(do)
            return step

        def combine_only(comb):
            o1 = torch.randn(B, T, H, D, device=dev).bfloat16().requires_grad_()
            o2 = torch.randn(B, T, H, D, device=dev).bfloat16().requires_grad_()

            def fn():
                comb(o1, o2, gr, gk, og, w).backward(do)
            return fn, [o1, o2, gr, gk, og, w]

        cases = [("sdpa", sdpa, [qh, kh, vh]), ("sdpa_fwd", sdpa_fwd, []),
                 ("gdn_fla", gdn_fla, gdn_leaves),
                 ("gdn_ours", gdn_ours(False), gdn_leaves), ("gdn_err", gdn_ours(True), gdn_leaves),
                 ("sdpa+gdn", sdpa_gdn, gdn_leaves + [qh, kh, vh]), ("plan", plan, [])]
        for label, fn in scratch_impls.items():
            for f in args.fracs:
                cases.append((f"{label}@{f}", scratch(fn, f), [q, k, v]))
            for f in args.fracs:
                cases.append((f"{label}_fwd@{f}", scratch(fn, f, fwd_only=True), []))
        for label, fn in ham_impls.items():
            for f in args.fracs:
                cases.append((f"ham{label}@{f}", ham(fn, f, combine_c), all_leaves))
        if args.flex:
            cases.append((f"mask_build@{max(args.fracs)}", mask_build(max(args.fracs)), []))
        ce, ce_leaves = combine_only(gated_combine)
        cc, cc_leaves = combine_only(combine_c)
        cases += [("combine_eager", ce, ce_leaves), ("combine_compiled", cc, cc_leaves)]
        if args.attention_only:
            cases = [c for c in cases if c[0].split("@")[0] in ATTENTION_ROWS]
        elif T in args.graph_T:  # last: a failed capture must not spoil the other rows
            for f in args.fracs:
                cases.append((f"ham_graph@{f}", ("graph", ham(auto, f, combine_c)), all_leaves))

        res = {}
        for label, fn, leaves in cases:
            if isinstance(fn, tuple):  # CUDA graph of a step
                try:
                    fn = cuda_graphed(fn[1], leaves)
                except Exception as e:  # report, keep the other rows
                    print(f"T={T:6d} {label:18s} capture failed: {type(e).__name__}: {str(e)[:300]}")
                    continue
            ms, mib, ts = time_fwd_bwd(fn, leaves, args.warmup, args.iters)
            tf = None
            kind = label.split("@")[0]
            if kind in ATTENTION_ROWS and kind != "plan":
                key = "@" + label.split("@")[1] if "@" in label else ""
                tf = attention_tflops(pairs[key], H, D, ms, kind.endswith("fwd"))
            res[label] = (ms, mib, tf)
            spread = (max(ts) - min(ts)) / ms
            tft = f"  {tf:6.1f} TFLOP/s" if tf is not None else ""
            print(f"T={T:6d} {label:18s} {ms:8.3f} ms  peak {mib:8.1f} MiB  (spread {spread:.0%}){tft}")
            rows.append({"T": T, "case": label, "ms": ms, "peak_mib": mib, "tflops": tf, "all_ms": ts})

        s = res["sdpa"][0]
        print(f"\n## T={T}: ratios (dense causal SDPA = {s:.3f} ms)")
        print(f"{'case':18s} {'ms':>8s} {'x SDPA':>7s} {'peak MiB':>9s} {'TFLOP/s':>8s}")
        for label, (ms, mib, tf) in res.items():
            tft = f"{tf:8.1f}" if tf is not None else ""
            print(f"{label:18s} {ms:8.3f} {ms / s:7.3f} {mib:9.1f} {tft}")
        print_targets(T, res, args.fracs)
        if args.json:  # after every T, atomically: a run cut short keeps what it measured
            out = Path(args.json)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows},
                                      indent=1))
            os.replace(tmp, out)
        del q, k, v, g, beta, qh, kh, vh
        torch.cuda.empty_cache()


def print_targets(T, res, fracs):
    """Verdicts of the rows in res against the issue's targets (#14): HAM core <= 0.6 / 0.75 /
    1.0 x SDPA at f = 0.1 / 0.25 / 0.5 and <= 1.5x at T=4096 f=0.5; scratchpad <= 1.15 x
    (f x SDPA) for f >= 0.25, <= 1.5 at f=0.1; peak memory of the HAM core at 0.5 <= SDPA + GDN."""
    s = res["sdpa"][0]
    verdict = lambda ok: "MET" if ok else "MISSED"  # noqa: E731
    print("targets:")
    ham_tgt = {0.1: 0.6, 0.25: 0.75, 0.5: 1.0} if T >= 16384 else ({0.5: 1.5} if T == 4096 else {})
    for f in fracs:
        for label in (f"ham@{f}", f"ham_graph@{f}"):
            if f in ham_tgt and label in res:
                hr = res[label][0] / s
                print(f"  {label}: {hr:.3f} x SDPA (target <= {ham_tgt[f]}) {verdict(hr <= ham_tgt[f])}")
    for f in fracs:
        for label in (f"scratch@{f}", f"flex@{f}"):
            if label in res:
                sr = res[label][0] / (f * s)
                tgt = 1.15 if f >= 0.25 else 1.5
                print(f"  {label}: {sr:.3f} x (f x SDPA) (target <= {tgt}) {verdict(sr <= tgt)}")
    if "gdn_err" not in res:
        return
    eo = res["gdn_err"][0] / res["gdn_ours"][0] - 1
    ef = res["gdn_err"][0] / res["gdn_fla"][0] - 1
    print(f"  error extraction: +{eo:.1%} vs gdn_ours, +{ef:.1%} vs gdn_fla (target <= 10%) "
          f"{verdict(max(eo, ef) <= 0.10)}")
    if "ham@0.5" in res:
        hm = res["ham@0.5"][1]
        sm = res["sdpa"][1] + res["gdn_fla"][1]
        print(f"  peak memory ham@0.5 {hm:.0f} MiB vs sdpa+gdn_fla {sm:.0f} MiB (sum of peaks), "
              f"{res['sdpa+gdn'][1]:.0f} MiB (one graph) {verdict(hm <= sm)}\n")


if __name__ == "__main__":
    main()
