"""The pretraining loop on Megatron-Core primitives.

    setup()  : process groups -> model chunks (build_model, DDP) -> distributed AdamW + LR
               schedule -> datasets -> resume from `latest`
    train()  : for each step: one global batch through Megatron's pipeline schedule
               (get_forward_backward_func: micro-batches, grad accumulation, overlapped DP
               gradient reduce-scatter), optimizer step (clip, AdamW), KV-fraction controllers,
               logging, validation, checkpoint, signal check

Layouts: a micro-batch is tokens/labels/position_ids [b, s] (b = micro_batch_size); the model
(GPTModel) works in [s, b, h] internally and returns per-token losses [b, s] when given labels.
Data parallelism is world / (tp * pp); every (tp, pp) replica reads its own slice of each
global batch (see data.py).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import compile_cache, grad_norm, wgrad_fusion
from megatron_ham.models.config import DTYPES

from .config import RunConfig, dump_config
from .data import BatchPlan, batch_to_device, build_datasets, check_batch_plan, check_data_paths, global_batch
from .logging import MetricsWriter, model_flops_per_token, peak_flops
from .logging.metrics import matmul_params, memory_gib, process_age_s
from .signals import EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE, StopRequest


@dataclass
class Trainer:
    cfg: RunConfig
    dist_info: object
    device: torch.device
    model: List[torch.nn.Module]
    optimizer: object
    scheduler: object
    train_ds: object
    valid_ds: Optional[object]
    eod_id: int
    plan: BatchPlan
    log: MetricsWriter
    step: int = 0
    consumed_samples: int = 0
    p_matmul: int = 0
    saved_step: int = -1  # the step of the checkpoint on disk that this run wrote or resumed
    history: List[Dict[str, float]] = field(default_factory=list)


# ----------------------------------------------------------------------------- set-up
def _prepare_model_config(cfg: RunConfig, log) -> None:
    """CPU runs in fp32 with CPU initialisation (bf16 training is a GPU setting)."""
    if not torch.cuda.is_available():
        if cfg.model.dtype != "fp32":
            log(f"[setup] no CUDA: model.dtype {cfg.model.dtype!r} runs as 'fp32' on CPU")
            cfg.model.dtype = "fp32"
        cfg.model.use_cpu_initialization = True


def build_model_chunks(cfg: RunConfig):
    """This rank's model chunks (one per virtual pipeline stage), each wrapped in Megatron DDP."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_ham.models import build_model

    vp = cfg.parallel.vp
    chunks = []
    for v in range(vp or 1):
        vp_stage = v if vp else None
        kw = {"vp_stage": vp_stage} if vp else {}
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, **kw) if vp else ps.is_pipeline_first_stage()
        post = ps.is_pipeline_last_stage(ignore_virtual=False, **kw) if vp else ps.is_pipeline_last_stage()
        m = build_model(cfg.model, pre_process=pre, post_process=post, vp_stage=vp_stage)
        if torch.cuda.is_available():
            m.cuda(torch.cuda.current_device())
        chunks.append(m)
    tc = chunks[0].config
    if cfg.train.recompute != "none":
        # TransformerBlock checks these at forward time: safe to set after construction.
        tc.recompute_granularity = "full"
        tc.recompute_method = "uniform" if cfg.train.recompute == "full" else "block"
        tc.recompute_num_layers = cfg.train.recompute_num_layers
    _fuse_wgrad_accumulation(cfg, chunks)
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.train.grad_reduce_in_fp32,
        overlap_grad_reduce=cfg.train.overlap_grad_reduce,
        use_distributed_optimizer=cfg.train.use_distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(config=c.config, ddp_config=ddp_cfg, module=c, disable_bucketing=(i > 0))
        for i, c in enumerate(chunks)
    ]
    # Hooks the pipeline schedules call: no_sync during grad accumulation, then finalize
    # (waits for the overlapped reduce-scatters, all-reduces embedding / layernorm grads).
    from megatron.core.distributed import finalize_model_grads

    tc.no_sync_func = [w.no_sync for w in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    tc.grad_sync_func = None
    tc.param_sync_func = None
    tc.finalize_model_grads_func = finalize_model_grads
    return wrapped


def _fuse_wgrad_accumulation(cfg: RunConfig, chunks) -> None:
    """train.gradient_accumulation_fusion: weight gradients summed into main_grad by their GEMM."""
    want = cfg.train.gradient_accumulation_fusion
    if want == "off":
        return
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if not wgrad_fusion.enable(chunks, dev) and want == "on":
        from .config import ConfigError

        raise ConfigError(f"train.gradient_accumulation_fusion=on: neither apex nor torch's addmm with "
                          f"an fp32 output runs on {dev}; use 'auto' or 'off'")


def build_optimizer(cfg: RunConfig, model_chunks):
    """Megatron's distributed AdamW (decoupled weight decay) and the warmup + decay schedule."""
    import dataclasses as dc

    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = cfg.train
    dtype = DTYPES[cfg.model.dtype]
    want = dict(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
        clip_grad=t.clip_grad, bf16=cfg.model.dtype == "bf16", fp16=cfg.model.dtype == "fp16",
        params_dtype=dtype, use_distributed_optimizer=t.use_distributed_optimizer,
        decoupled_weight_decay=True,
    )
    known = {f.name for f in dc.fields(OptimizerConfig)}
    missing = [k for k in ("lr", "clip_grad", "use_distributed_optimizer") if k not in known]
    if missing:  # pragma: no cover - megatron-core API drift
        raise RuntimeError(f"megatron-core OptimizerConfig lacks {missing}")
    ocfg = OptimizerConfig(**{k: v for k, v in want.items() if k in known})
    grad_norm.install()  # no per-tensor host syncs in the grad norm without apex / TE
    optimizer = get_megatron_optimizer(ocfg, model_chunks)
    decay = t.lr_decay_steps or t.train_steps
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=max(decay, t.warmup_steps + 1),
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(1, t.train_steps),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
    return optimizer, scheduler


def setup(cfg: RunConfig, stop: Optional[StopRequest] = None) -> Trainer:
    """Process groups -> start-up checks -> model, optimizer -> data -> resume. Collective.

    `stop` (installed by ham-train before anything slow) is checked by all ranks together after
    each phase; a signal raises signals.Preempted (nothing new to save at that point)."""
    from megatron.core import parallel_state as ps

    from megatron_ham.distributed import initialize

    from megatron_ham.cpu_shims import install_training_shims

    stop = stop or StopRequest()
    install_training_shims()
    info = initialize(tp=cfg.parallel.tp, pp=cfg.parallel.pp, seed=cfg.train.seed)
    device = info.device
    is_log_rank = dist.get_rank() == 0
    log = MetricsWriter(is_log_rank, _tb_dir(cfg), _jsonl_path(cfg))
    _prepare_model_config(cfg, log.info)
    check_batch_plan(cfg, info.dp)
    check_data_paths(cfg)  # a missing blend / prefix / tokenizer is named before the model is built
    params = _check_memory(cfg, info.dp)
    _prepare_checkpoint_dir(cfg, params, log.info)
    stop.check(device, "set-up (process groups)")
    plan = BatchPlan(cfg.train.global_batch_size, cfg.train.micro_batch_size, info.dp,
                     ps.get_data_parallel_rank())
    model = build_model_chunks(cfg)
    optimizer, scheduler = build_optimizer(cfg, model)
    stop.check(device, "set-up (model)")
    padded_vocab = cfg.model.padded_vocab_size()
    train_ds, valid_ds, eod = build_datasets(cfg, vocab_size=padded_vocab)
    cfg.data.eod_id = eod  # what the saved config.yaml records: the exporter reads it back
    stop.check(device, "set-up (datasets)")
    tr = Trainer(cfg, info, device, model, optimizer, scheduler, train_ds, valid_ds, eod, plan, log)
    # model FLOPs: matmul weights summed over the model-parallel ranks
    n = torch.tensor([matmul_params([_unwrap(c) for c in model], cfg.model.tie_embeddings,
                                    cfg.model.hidden_size, padded_vocab)], dtype=torch.float64,
                     device=device)
    dist.all_reduce(n, group=ps.get_model_parallel_group())
    tr.p_matmul = int(n.item())
    log.info(
        f"[setup] {cfg.name}: world {info.world_size} = tp {info.tp} x pp {info.pp} x dp {info.dp} "
        f"({info.backend}, {device}); {cfg.model.architecture} pattern "
        f"{cfg.model.resolved_pattern()} ; matmul params {tr.p_matmul / 1e6:.2f}M; "
        f"global batch {cfg.train.global_batch_size} x {cfg.model.seq_length} tokens = "
        f"{plan.num_microbatches} micro-batches of {cfg.train.micro_batch_size} per rank; "
        f"gradient accumulation fusion {'on' if _unwrap(model[0]).config.gradient_accumulation_fusion else 'off'}"
    )
    if cfg.checkpoint.resume:
        found = ckpt.resume(cfg.checkpoint.dir, model, optimizer, scheduler, warn=log.info)
        if found is not None and found[1].get("model_only"):  # an import: fine-tune from step 0
            log.info(f"[checkpoint] initialised the model from {found[0]} (a model-only checkpoint: "
                     "optimizer, LR schedule and step start fresh, from the recipe)")
        elif found is not None:
            path, st = found
            tr.step, tr.consumed_samples = int(st["step"]), int(st["consumed_samples"])
            tr.saved_step = tr.step
            log.info(f"[checkpoint] resumed from {path}: step {tr.step}, "
                     f"consumed_samples {tr.consumed_samples}")
    stop.check(device, "set-up (resume)")
    return tr


def _check_memory(cfg: RunConfig, dp: int) -> int:
    """The start-up memory check (training/memory.py) against this device; returns the model's
    parameter count. Collective: every rank raises the same ConfigError."""
    import socket

    from megatron_ham.models.accounting import count_parameters

    from . import memory
    from .config import ConfigError

    params = count_parameters(cfg.model)["total"]
    hosts: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    budget = cfg.train.memory_budget_gib
    err = None
    if budget != 0:
        if budget is None:
            limit, name = memory.device_budget(hosts.count(socket.gethostname()))
        else:
            limit, name = budget * 2.0 ** 30, f"train.memory_budget_gib={budget:g}"
        try:
            memory.check(cfg, memory.estimate(cfg, dp, params), limit, name,
                         lambda k: f"key '{k}' (rank {dist.get_rank()})")
        except ConfigError as e:
            err = str(e)
    err = ckpt.agree_error(err)
    if err:
        raise ConfigError(err)
    return params


def _prepare_checkpoint_dir(cfg: RunConfig, params: int, log) -> None:
    """Rank 0: remove leftovers of interrupted saves, check writability and room for two
    checkpoints. Collective: every rank raises the same ConfigError."""
    from . import preflight
    from .config import ConfigError

    err = None
    if dist.get_rank() == 0:
        root = os.path.abspath(cfg.checkpoint.dir)
        try:
            preflight.check_writable(root)
            ckpt.remove_stale_temps(root, log)  # first: leftovers must not count as used space
            preflight.check_free_space(root, 2 * preflight.checkpoint_bytes(root, params, cfg.model.dtype))
        except (ConfigError, OSError) as e:
            err = str(e) if isinstance(e, ConfigError) else f"checkpoint.dir {root}: {e}"
        if cfg.checkpoint.keep_last == 1:
            log("[checkpoint] warning: checkpoint.keep_last=1 leaves no older checkpoint to fall "
                "back to if the newest one turns out damaged (2 or more recommended)")
    err = ckpt.agree_error(err)
    if err:
        raise ConfigError(err)


def _tb_dir(cfg: RunConfig) -> Optional[str]:
    if cfg.logging.tensorboard_dir:
        return cfg.logging.tensorboard_dir
    return os.path.join(os.path.dirname(os.path.abspath(cfg.checkpoint.dir)), "tensorboard")


def _jsonl_path(cfg: RunConfig) -> str:
    return cfg.logging.jsonl or os.path.join(
        os.path.dirname(os.path.abspath(cfg.checkpoint.dir)), "metrics.jsonl")


def _unwrap(m):
    return getattr(m, "module", m)


# ----------------------------------------------------------------------------- one step
def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Mean next-token loss over the micro-batch's unmasked tokens (per-token losses [b, s])."""
    losses = output.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    total = (losses * mask).sum()
    count = mask.sum()
    loss = total / count.clamp(min=1.0)
    return loss, {"lm loss": torch.stack([total.detach(), count.detach()])}


def _forward_step(tr: Trainer, data_iterator, model):
    from megatron_ham.models import document_forward_kwargs

    host = next(data_iterator)  # on the host (global_batch)
    batch = batch_to_device(host, tr.device)
    kw = document_forward_kwargs(host["tokens"], tr.eod_id, tr.device) if tr.cfg.data.documents else {}
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], **kw)
    return out, partial(_loss_func, batch["loss_mask"])


def _run_batches(tr: Trainer, batches, forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    n_chunks = len(tr.model)
    it = [iter(batches) for _ in range(n_chunks)] if n_chunks > 1 else iter(batches)
    return fb(
        forward_step_func=partial(_forward_step, tr),
        data_iterator=it,
        model=tr.model if n_chunks > 1 else tr.model[0],
        num_microbatches=len(batches),
        seq_length=tr.cfg.model.seq_length,
        micro_batch_size=tr.cfg.train.micro_batch_size,
        forward_only=forward_only,
    )


def _global_loss(tr: Trainer, losses) -> float:
    """Token-weighted mean loss over the whole global batch (same value on every rank)."""
    from megatron.core import parallel_state as ps

    acc = torch.zeros(2, dtype=torch.float64, device=tr.device)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
        for d in losses:
            acc += d["lm loss"].to(torch.float64)
    dist.all_reduce(acc)
    return float(acc[0] / acc[1].clamp(min=1.0))


def train_step(tr: Trainer) -> Dict[str, float]:
    from megatron_ham.models import step_kv_controllers
    from megatron.core import parallel_state as ps

    for c in tr.model:
        c.zero_grad_buffer()
    tr.optimizer.zero_grad()
    batches = global_batch(tr.train_ds, tr.plan, tr.consumed_samples, pin=tr.device.type == "cuda")
    losses = _run_batches(tr, batches, forward_only=False)
    tr.scheduler.step(increment=1)  # the LR of update number step+1
    ok, grad_norm, _ = tr.optimizer.step()
    kv = step_kv_controllers(tr.model, ps.get_data_parallel_group())
    tr.step += 1
    tr.consumed_samples += tr.cfg.train.global_batch_size
    return {
        "loss": _global_loss(tr, losses),
        "lr": tr.optimizer.param_groups[0]["lr"],
        "grad_norm": float(grad_norm) if grad_norm is not None else None,  # None: clip_grad=0, fp32
        "update_ok": bool(ok),
        "kv": kv,
    }


def evaluate(tr: Trainer) -> Optional[float]:
    if tr.valid_ds is None:
        return None
    for c in tr.model:
        c.eval()
    acc = []
    with torch.no_grad():
        for i in range(tr.cfg.train.eval_iters):
            start = i * tr.cfg.train.global_batch_size
            batches = global_batch(tr.valid_ds, tr.plan, start, pin=tr.device.type == "cuda")
            acc.extend(_run_batches(tr, batches, forward_only=True))
    for c in tr.model:
        c.train()
    return _global_loss(tr, acc)


def _gather_kv(kv: Dict[int, Dict[str, float]]) -> Dict[int, Dict[str, float]]:
    """Per-layer KV stats from every pipeline stage (layers live on different ranks)."""
    if dist.get_world_size() == 1:
        return kv
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return kv
    out: List[Optional[dict]] = [None] * dist.get_world_size()
    dist.all_gather_object(out, kv)
    merged: Dict[int, Dict[str, float]] = {}
    for d in out:
        merged.update(d or {})
    return merged


# ----------------------------------------------------------------------------- the loop
def save_checkpoint(tr: Trainer) -> str:
    state = {
        "step": tr.step,
        "consumed_samples": tr.consumed_samples,
        "world_size": dist.get_world_size(),
        "tp": tr.cfg.parallel.tp,
        "pp": tr.cfg.parallel.pp,
        "name": tr.cfg.name,
    }
    t0 = time.time()
    path = ckpt.save(tr.cfg.checkpoint.dir, tr.step, tr.model, tr.optimizer, tr.scheduler, state,
                     dump_config(tr.cfg), keep_last=tr.cfg.checkpoint.keep_last)
    tr.saved_step = tr.step
    tr.log.info(f"[checkpoint] saved step {tr.step} to {path} ({time.time() - t0:.1f}s)")
    return path


def _finite(m: Dict[str, float]) -> bool:
    """The step's loss and gradient norm are finite (megatron reports no norm without clipping)."""
    g = m.get("grad_norm")
    return math.isfinite(m["loss"]) and (g is None or math.isfinite(g))


def train(tr: Trainer, stop: Optional[StopRequest] = None) -> int:
    """Run until train_steps (a preemption signal or a non-finite loss /
    grad norm). Returns the exit code. `stop` stays installed after return (shutdown is covered)."""
    cfg = tr.cfg
    stop = stop or StopRequest().install()
    last = cfg.train.train_steps
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    world = dist.get_world_size()
    peak = peak_flops(cfg.logging.peak_tflops)
    code = EXIT_OK
    first = True  # this process's first step: its time from process start is logged
    if tr.step >= last:
        tr.log.info(f"[train] nothing to do: at step {tr.step} >= {last}")
    try:
        while tr.step < last:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            m = train_step(tr)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if first:
                first = False
                stop.reassert()  # after the libraries the first step loaded (signals.py)
                tr.log.first_step(tr.step, process_age_s(), dt, compile_cache.current().summary(),
                                  compile_cache.counters())
            kv = m.pop("kv")
            m["step_time_s"] = dt
            m["tokens_per_s"] = tokens_per_step / dt
            m["tokens_per_s_per_device"] = tokens_per_step / dt / world
            tr.history.append({"step": tr.step, "loss": m["loss"]})
            finite = _finite(m)  # the same on every rank: loss and norm are global
            if tr.step % cfg.logging.interval == 0 or tr.step == last or not finite:
                kv_all = _gather_kv(kv)
                fr = {l: v["fraction"] for l, v in kv_all.items()}
                flops = model_flops_per_token(cfg.model, tr.p_matmul, fr)
                m["model_tflops_per_token"] = flops / 1e12
                m["mfu"] = (flops * m["tokens_per_s_per_device"] / peak) if peak else None
                m.update(memory_gib())
                tr.log.train_step(tr.step, cfg.train.train_steps, m,
                                  kv_all if cfg.logging.log_kv_layers else {})
            if not finite:
                kept = (f"{ckpt.step_dirname(tr.saved_step)} is the last checkpoint"
                        if tr.saved_step >= 0 else "no checkpoint was written")
                tr.log.info(f"[train] error: non-finite loss or gradient norm at step {tr.step} (loss "
                            f"{m['loss']}, grad norm {m['grad_norm']}): stopping without saving "
                            f"({kept}); exit {EXIT_NONFINITE}")
                code = EXIT_NONFINITE
                break
            if cfg.train.eval_interval and tr.step % cfg.train.eval_interval == 0:
                vl = evaluate(tr)
                if vl is not None:
                    tr.log.validation(tr.step, vl)
            signum = stop.agreed(tr.device)
            if signum:
                code = _stop_for_signal(tr, signum)
                break
            at_end = tr.step == last and cfg.checkpoint.save_at_end
            if cfg.checkpoint.interval and tr.step % cfg.checkpoint.interval == 0 and not at_end:
                save_checkpoint(tr)
        else:
            if cfg.checkpoint.save_at_end and tr.history and tr.saved_step != tr.step:
                save_checkpoint(tr)
            signum = stop.agreed(tr.device)  # a signal during the last step, evaluation or save
            if signum:
                code = _stop_for_signal(tr, signum)
    finally:
        tr.log.close()
    return code


def _stop_for_signal(tr: Trainer, signum: int) -> int:
    """Save if this run has a step the disk does not, then EXIT_REQUEUE."""
    if tr.step != tr.saved_step and tr.history:
        save_checkpoint(tr)
        what = "saved"
    else:
        what = "nothing new to save"
    tr.log.info(f"[train] stopped by signal {signum} at step {tr.step} ({what}); "
                f"exit {EXIT_REQUEUE} (requeue)")
    return EXIT_REQUEUE
