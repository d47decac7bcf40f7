#!/usr/bin/env python
"""GPU timing of a layer's pre-norms and its MLP's SwiGLU: what the models ran, what they run now.

Every layer has two pre-norm blocks (out = x + block(RMSNorm(x))) and one SwiGLU. Timed in the
same run, forward+backward (CUDA events, median of --iters), at the recipe's shapes (default
ham_800m: 16k tokens, h = 1536, ffn = 4096, bf16):

  prenorm_torch   torch's fused F.rms_norm, then autograd adds the residual branch's gradient in a
                  separate kernel, and computes the weight gradient in another (the baseline)
  prenorm_ours    ops.hidden_norm_with_residual impl "triton": the residual comes out of the
                  norm's node, one backward pass (dx + residual gradient + weight partial sums)
  swiglu_mcore    megatron-core's compiled bias_swiglu_impl (bias_activation_fusion; the baseline)
  swiglu_liger    ops.swiglu impl "liger": liger-kernel's fused gate-up kernel

Each block row runs the block's own residual add (x + y) in the forward, as megatron's layer does.

    python tools/bench_norm_mlp.py --json $OUT/norm_mlp.json
    python tools/bench_norm_mlp.py --profile     # also each row's kernels (torch.profiler, ms per call)
    python tools/bench_norm_mlp.py --host        # also each row's host time by Python function
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
from profile_step import host_functions  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384, help="tokens (sequence x micro-batch)")
    p.add_argument("--hidden", type=int, default=1536, help="hidden size h")
    p.add_argument("--ffn", type=int, default=4096, help="MLP hidden size F (fc1 gives 2F)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json", type=str, default=None, help="write the rows to this JSON file")
    p.add_argument("--profile", action="store_true",
                   help="after the timings, each row's CUDA kernels under torch.profiler (ms per call)")
    p.add_argument("--host", action="store_true",
                   help="after the timings, each row's host time (cProfile of 20 calls, the "
                        "functions with most own time, ms per call)")
    return p.parse_args(argv)


def _fresh_call(fn, leaves):
    """One call of fn with the leaves' gradients cleared first (as the timings run it)."""
    for x in leaves:
        x.grad = None
    fn()


def kernel_table(fn, leaves, calls: int = 5, top: int = 6):
    """[(kernel name, ms per call)] of fn's CUDA kernels, most time first (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            _fresh_call(fn, leaves)
        torch.cuda.synchronize()
    times = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name] = times.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3 / calls
    return sorted(times.items(), key=lambda kv: -kv[1])[:top]


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_norm_mlp.py needs a CUDA GPU")
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    from megatron_ham.ops.norm import hidden_norm, hidden_norm_with_residual
    from megatron_ham.ops.swiglu import swiglu

    dev = torch.device("cuda")
    N, h, F_ = args.tokens, args.hidden, args.ffn
    print(f"# device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; "
          f"{N} tokens, h = {h}, ffn = {F_}, bf16")
    torch.manual_seed(0)
    x = torch.randn(N, 1, h, device=dev).bfloat16().requires_grad_()
    w = torch.rand(h, device=dev).add(0.5).bfloat16().requires_grad_()
    g_out = torch.randn(N, 1, h, device=dev).bfloat16()
    fc1 = torch.randn(N, 1, 2 * F_, device=dev).bfloat16().requires_grad_()
    g_act = torch.randn(N, 1, F_, device=dev).bfloat16()

    def prenorm_torch():
        (x + hidden_norm(x, w, eps=1e-5)).backward(g_out)

    def prenorm_ours():
        y, residual = hidden_norm_with_residual(x, w, eps=1e-5, impl="triton")
        (residual + y).backward(g_out)

    groups = {
        "prenorm": (("prenorm_torch", prenorm_torch, [x, w]), ("prenorm_ours", prenorm_ours, [x, w])),
        "swiglu": (("swiglu_mcore", lambda: bias_swiglu_impl(fc1, None).backward(g_act), [fc1]),
                   ("swiglu_liger", lambda: swiglu(fc1, impl="liger").backward(g_act), [fc1])),
    }
    rows = []
    print(f"\n{'row':<16}{'ms':>9}{'x baseline':>12}{'peak MiB':>10}")
    for group in groups.values():
        base = None
        for name, fn, leaves in group:
            ms, peak, _ = time_fwd_bwd(fn, leaves, args.warmup, args.iters)
            base = ms if base is None else base
            rows.append(dict(name=name, ms=ms, x_baseline=ms / base, peak_mib=peak))
            print(f"{name:<16}{ms:>9.3f}{ms / base:>12.2f}{peak:>10.0f}")
            if args.profile:
                rows[-1]["kernels"] = kernel_table(fn, leaves)
                for kname, kms in rows[-1]["kernels"]:
                    print(f"    {kms:8.3f} ms  {kname[:90]}")
            if args.host:
                hs = host_functions(lambda fn=fn, leaves=leaves: _fresh_call(fn, leaves), top=10,
                                    calls=20)
                torch.cuda.synchronize()
                rows[-1]["host_ms"], rows[-1]["host_top"] = hs["host_ms"], hs["functions"]
                print(f"    host {hs['host_ms']:.3f} ms per call (cProfile's own overhead included); most:")
                for fname, fms, _ in hs["functions"]:
                    print(f"    {fms:8.3f} ms  {fname[:90]}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), tokens=N,
                                                   hidden=h, ffn=F_, rows=rows), indent=1))


if __name__ == "__main__":
    main()
