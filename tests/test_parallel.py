"""Tensor / sequence / pipeline parallelism of the HAM layers and models on real megatron-core.

Multi-process worlds (gloo on CPU; the `gpu` variant uses NCCL on 2 GPUs). Each world runs many
checks because every process start imports megatron (~5 s).
"""
from __future__ import annotations

import os

import pytest
import torch

from _dist import run_world

ATOL, RTOL = 2e-5, 1e-4


def _close(name, a, b, atol=ATOL, rtol=RTOL):
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    if a.shape != b.shape:
        raise AssertionError(f"{name}: shape {list(a.shape)} != {list(b.shape)}")
    if not torch.allclose(a, b, atol=atol, rtol=rtol):
        err = (a - b).abs().max().item()
        raise AssertionError(f"{name}: max abs diff {err:.3e} (scale {b.abs().max().item():.3e})")


def _same_on_all_ranks(name, t, group=None):
    import torch.distributed as dist

    t = t.detach().contiguous()
    outs = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(outs, t, group=group)
    for i, o in enumerate(outs):
        if not torch.equal(o, outs[0]):
            raise AssertionError(f"{name}: differs between ranks 0 and {i}")


# ---------------------------------------------------------------------------- mixer (TP, SP)

def _build_mixer(kind, router, sp, device, seed=7):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from megatron_ham.layers import get_backend, mixer_spec
    from megatron_ham.models import ModelConfig
    from megatron_ham.models.builder import mixer_options, transformer_config

    cfg = ModelConfig(architecture="ham", hidden_size=32, mixer_num_heads=4, mixer_key_head_dim=8,
                      mixer_value_head_dim=8, router=router, dtype="fp32",
                      use_cpu_initialization=True, sequence_parallel=sp, impl="chunk")
    tc = transformer_config(cfg)
    torch.manual_seed(seed)
    spec = mixer_spec(kind, get_backend("local"), mixer_options(cfg))
    m = build_module(spec, config=tc, layer_number=1,
                     pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    return m.to(device)


def _mixer_case(m, x_full, dout_full, sp, tp, rank, device, doc_kwargs):
    s = x_full.shape[0]
    if sp:
        lo, hi = rank * s // tp, (rank + 1) * s // tp
        x = x_full[lo:hi].clone().to(device).requires_grad_(True)
        dout = dout_full[lo:hi].to(device)
    else:
        x = x_full.clone().to(device).requires_grad_(True)
        dout = dout_full.to(device)
    m.zero_grad(set_to_none=True)
    out, bias = m(x, None, **doc_kwargs)
    assert bias is None
    (out * dout).sum().backward()
    return out, x.grad


def _expected_local(m, name, g_full, tp, rank):
    """Slice of the TP=1 gradient that rank `rank` of TP=`tp` holds for parameter `name`."""
    H_l = m.H // tp
    if name in ("in_proj.weight", "conv1d.weight"):
        secs = m.sections if name.startswith("in_proj") else m.conv_sections
        parts, off = [], 0
        for _, w in secs:
            parts.append(g_full[off + rank * H_l * w: off + (rank + 1) * H_l * w])
            off += m.H * w
        return torch.cat(parts, 0)
    if name in ("A_log", "dt_bias"):
        return g_full[rank * H_l:(rank + 1) * H_l]
    if name == "out_proj.weight":
        return g_full[:, rank * H_l * m.V:(rank + 1) * H_l * m.V]
    return g_full  # replicated: norm_weight, router.*


def _mixer_worker(rank, world, device_kind):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ham import distributed as D
    from megatron_ham.models import document_forward_kwargs, step_kv_controllers

    backend = "nccl" if device_kind == "cuda" else "gloo"
    D.initialize(tp=1, seed=11, backend=backend)
    device = torch.device("cuda", torch.cuda.current_device()) if device_kind == "cuda" else torch.device("cpu")
    s, b, h = 16, 2, 32
    g = torch.Generator().manual_seed(3)
    x_full = torch.randn(s, b, h, generator=g)
    dout_full = torch.randn(s, b, h, generator=g)
    tokens = torch.randint(1, 50, (b, s), generator=g)
    tokens[0, 4] = 0
    tokens[1, 9] = 0
    tokens[1, 12] = 0
    docs = {k: (v if not hasattr(v, "cu_seqlens_q") else v) for k, v in document_forward_kwargs(tokens, 0).items()}
    docs["packed_seq_params"].cu_seqlens_q = docs["packed_seq_params"].cu_seqlens_q.to(device)
    docs["packed_seq_params"].cu_seqlens_kv = docs["packed_seq_params"].cu_seqlens_kv.to(device)
    cases = [("ham", "error_l2", True), ("ham", "learned", False), ("ham", "error_cosine", False),
             ("gdn", "error_l2", True)]
    ref = {}
    # TP = 1 references (every rank computes them; DP = 2 here)
    for kind, router, use_docs in cases:
        kw = docs if use_docs else {}
        m = _build_mixer(kind, router, False, device)
        tau = None
        if kind == "ham":
            m.train()
            _mixer_case(m, x_full, dout_full, False, 1, 0, device, kw)
            step_kv_controllers([m], dp_group=None)
            tau = float(m.kv_controller.tau)
        out, xg = _mixer_case(m, x_full, dout_full, False, 1, 0, device, kw)
        grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
        routed = m.last_routed.clone() if kind == "ham" else None
        if routed is not None:  # routing is selective: neither nothing nor everything
            frac = routed.float().mean().item()
            assert 0.0 < frac < 1.0, f"{router}: routed fraction {frac}"
        ref[(kind, router)] = (tau, out.detach().clone(), xg.clone(), grads, routed)
        del m

    D.initialize(tp=2, seed=11, backend=backend)
    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    tpg = ps.get_tensor_model_parallel_group()
    assert tp == 2
    for sp in (False, True):
        for kind, router, use_docs in cases:
            kw = docs if use_docs else {}
            tag = f"[{kind}/{router} sp={sp} docs={use_docs}]"
            tau, out1, xg1, grads1, routed1 = ref[(kind, router)]
            m = _build_mixer(kind, router, sp, device)
            if kind == "ham":
                m.kv_controller.set_tau(tau)
            out, xg = _mixer_case(m, x_full, dout_full, sp, tp, r, device, kw)
            if sp:
                lo, hi = r * s // tp, (r + 1) * s // tp
                _close(f"{tag} output", out, out1[lo:hi])
                _close(f"{tag} input grad", xg, xg1[lo:hi])
            else:
                _close(f"{tag} output", out, out1)
                _close(f"{tag} input grad", xg, xg1)
            for n, p in m.named_parameters():
                _close(f"{tag} grad {n}", p.grad, _expected_local(m, n, grads1[n], tp, r))
                if n == "norm_weight" or n.startswith("router."):
                    _same_on_all_ranks(f"{tag} grad {n}", p.grad, tpg)
            if kind == "ham":
                _same_on_all_ranks(f"{tag} routed", m.last_routed.to(torch.uint8), tpg)
                assert torch.equal(m.last_routed.cpu(), routed1.cpu()), f"{tag} routed != TP=1"
            del m
    dist.barrier()


def test_mixer_tp2_matches_tp1():
    """HAM / GDN mixers at TP=2 (SP off and on) == TP=1: outputs, input grads, every parameter
    grad (sliced), routed mask identical on all ranks and equal to TP=1; norm-weight and router
    grads equal across TP ranks and to the TP=1 grad; with and without document boundaries."""
    run_world(_mixer_worker, 2, "cpu")


@pytest.mark.gpu
def test_mixer_tp2_matches_tp1_nccl():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run_world(_mixer_worker, 2, "cuda")
