"""Tensor / sequence / pipeline parallelism of the HAM layers and models on real megatron-core.

Multi-process worlds (gloo on CPU; the `gpu` variants use NCCL on 2 GPUs). Each world runs many
checks because every process start imports megatron (~5 s). Workers: tests/_parallel_workers.py.
"""
from __future__ import annotations

import pytest
import torch

from _dist import run_world
from _parallel_workers import (
    _gdn_mixer_kernels_worker,
    _mixer_worker,
    _model_worker,
    _pp_worker,
    _pre_norm_swiglu_worker,
    _wgrad_fusion_worker,
)


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


@pytest.mark.gpu
def test_gdn_mixer_gpu_kernels_match_reference_ops():
    """The GDN and HAM mixers' wiring of the GPU kernels (fla's conv with documents over a
    batch of rows, our q/k/v activations, fla's GDN, the staircase) is as close to the fp32 mixer as
    the reference ops in bf16."""
    run_world(_gdn_mixer_kernels_worker, 1)


@pytest.mark.gpu
def test_pre_norm_kernel_and_liger_swiglu_in_the_model():
    """A bf16 model with the fusions on (pre-norms returning the residual branch on our RMSNorm
    kernels, liger-kernel's SwiGLU) gives the loss and gradients of the fusions-off model."""
    run_world(_pre_norm_swiglu_worker, 1)


def test_gradient_accumulation_fusion_only_where_it_runs():
    """CPU: train.gradient_accumulation_fusion "auto" fuses no layer (the GEMM is CUDA-only),
    "on" is refused naming the key; main_grad of two micro-batches is the same either way."""
    run_world(_wgrad_fusion_worker, 1, "cpu")


@pytest.mark.gpu
def test_gradient_accumulation_fusion_gives_the_unfused_main_grad():
    """train.gradient_accumulation_fusion (each weight gradient summed into main_grad by its
    GEMM) gives DDP's main_grad of the unfused path after two micro-batches."""
    run_world(_wgrad_fusion_worker, 1, "cuda")


def test_model_tp_sp_and_checkpoint_resharding(tmp_path):
    """Small hybrid model (H, *, G layers; learned router; packed documents):
    TP=2+SP trains a step of the controller, its dist checkpoint (torch_dist) loads at TP=1 with
    identical logits, per-token loss and gradients (grads saved through the same sharded state
    dict); tau is in the checkpoint; a TP=1 checkpoint loads at TP=2 with identical logits; the
    four architectures run forward+backward at TP=2+SP."""
    run_world(_model_worker, 2, "cpu", str(tmp_path))


@pytest.mark.gpu
def test_model_tp_sp_and_checkpoint_resharding_nccl(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run_world(_model_worker, 2, "cuda", str(tmp_path))


def test_pipeline_pp2_forward_matches_pp1(tmp_path):
    """PP=2 through Megatron's pipeline schedule (p2p over gloo) gives the PP=1 per-token loss,
    from a PP=1 checkpoint (global layer numbering / offsets, tau restored)."""
    run_world(_pp_worker, 2, str(tmp_path))


@pytest.mark.gpu
def test_pipeline_pp2_forward_matches_pp1_nccl(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run_world(_pp_worker, 2, str(tmp_path), "cuda")
