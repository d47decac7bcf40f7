"""Model FLOPs and MFU.

MFU = (model FLOPs per token x tokens per second per device) / peak FLOP/s per device.

Model FLOPs per token of one training step (forward + backward = 3 x forward; activation
recomputation is NOT counted: it is hardware work, not model work):

    3 x [ 2 x P_matmul                         every weight matrix (dense projections, MLPs,
                                               routers, depthwise convs, the output layer)
        + sum over layers of the layer kind's flops_per_token (megatron_ham/layers/kinds):
            attention ('*'):  4 x H x d x s_avg
            GDN ('G'):        H_m x (6 K V + 2 C (K + V))
            HAM ('H'):        H_m x (6 K V + 2 C (K + V)) + 2 x H_m x (K + V) x f_l x s_avg ]

  P_matmul  weight elements of all >= 2-D parameters except the input embedding (a lookup),
            summed over tensor- and pipeline-parallel ranks; with tied embeddings the output
            layer's h x V is added once.
  s_avg     (s + 1) / 2: keys a causal query sees on average (s = seq_length).
  H, d      attention heads and head dim; H_m, K, V mixer heads and key/value head dims.
  C = 64    the chunk length of the chunked delta rule (state readout 2KV, prediction 2KV,
            update 2KV, intra-chunk q k^T and attention x values 2C(K+V), per head and token).
  f_l       the ACTUAL routed KV fraction of HAM layer l in this step (from its controller), so
            the scratchpad is counted at the cost it really had, not at its target.

Peak FLOP/s: `logging.peak_tflops` in the recipe, else the bf16 dense peak of the device by
name (PEAK_TFLOPS), else MFU is reported as n/a (CPU).
"""
from __future__ import annotations

import os

from typing import Dict, Optional

import torch

# dense bf16 tensor-core peak, TFLOP/s per device
PEAK_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
}


def peak_flops(override_tflops: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s per device: the override, else by CUDA device name, else None."""
    if override_tflops:
        return float(override_tflops) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tf in PEAK_TFLOPS.items():  # ordered most specific first
        if key in name:
            return tf * 1e12
    return None


def matmul_params(model_chunks, tie_embeddings: bool, hidden: int, padded_vocab: int) -> int:
    """Weight elements of >= 2-D parameters on this rank, excluding the input embedding."""
    n = 0
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if p.dim() < 2 or "word_embeddings" in name or "position_embeddings" in name:
                continue
            n += p.numel()
    return n


def model_flops_per_token(cfg, p_matmul: int, kv_fractions: Optional[Dict[int, float]] = None) -> float:
    """Training FLOPs per token (see module docstring). `cfg` is the ModelConfig; `p_matmul`
    the matmul weight count of the whole model; kv_fractions {layer number (1-based): f}."""
    from megatron_ham.layers.kinds import parse_pattern

    fwd = 2.0 * p_matmul
    if cfg.tie_embeddings:
        fwd += 2.0 * cfg.hidden_size * cfg.padded_vocab_size()
    for i, kind in enumerate(parse_pattern(cfg.resolved_pattern(), cfg.num_layers)):
        fwd += kind.flops_per_token(cfg, (kv_fractions or {}).get(i + 1))
    return 3.0 * fwd


def memory_gib() -> Dict[str, float]:
    """Peak allocated / reserved GPU memory (GiB) since the last reset, or the process RSS on CPU."""
    if torch.cuda.is_available():
        out = {
            "mem_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
        torch.cuda.reset_peak_memory_stats()
        return out
    import psutil

    return {"mem_rss_gib": psutil.Process().memory_info().rss / 2**30}


def process_age_s() -> float:
    """Seconds since this process started (the OS's start time: interpreter start-up and imports
    included). psutil when installed, else Linux's /proc (start ticks after boot + boot time)."""
    import time

    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except ImportError:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return time.time() - (boot + ticks / os.sysconf("SC_CLK_TCK"))
