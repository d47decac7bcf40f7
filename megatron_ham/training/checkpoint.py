"""Checkpoints: Megatron dist_checkpointing, published atomically, auto-resumed.

Layout under `checkpoint.dir`:

    step_00000100/            one complete checkpoint (a dist_checkpointing directory)
        metadata.json, common.pt, __*.distcp     written by dist_checkpointing (all ranks)
        train_state.json      {step, consumed_samples, ...}: the completion marker, written last
        config.yaml           the resolved run config
    .tmp_step_00000200/       a save in progress (never read on resume)
    latest                    text file: "step_00000100" (the newest complete checkpoint)

Publication protocol (all ranks write shards into the temp dir; rank 0 publishes):
  1. every rank: dist_checkpointing.save(state, .tmp_step_N)           (collective)
  2. barrier; rank 0 writes train_state.json + config.yaml into the temp dir (fsync)
  3. rank 0: os.rename(.tmp_step_N, step_N)  (atomic on one file system), fsync the parent
  4. rank 0: write latest.tmp, fsync, os.replace(latest.tmp, latest)     (atomic)
  5. barrier
A save killed at any point leaves either a .tmp_ dir (ignored) or a complete step dir that
`latest` may not point at yet; resume reads `latest` and checks the marker, and falls back to
the newest step dir that has its marker when `latest` is missing or points at an incomplete dir.

What is saved: model (all chunks; includes every HAM layer's KV-fraction controller buffers
tau / num_updates), the distributed optimizer (fp32 main params + Adam moments, dp_reshardable
format), the LR scheduler, every rank's RNG states (CPU, CUDA, Megatron's tracker), and
train_state (step, consumed_samples, consumed_valid). Resuming needs the same tp x pp x dp layout
for the RNG states (a different layout loads everything else and reseeds; a warning says so).

A MODEL-ONLY checkpoint (`save` without optimizer and scheduler; train_state has
"model_only": true; ham-import-hf writes one, at step 0) holds the model and the RNG states:
ham-train starts from it with `load_model` (weights and buffers, any tp x pp layout) and a fresh
optimizer, schedule and step count, the recipe's.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

STEP_RE = re.compile(r"^step_(\d{8})$")
MARKER = "train_state.json"
LATEST = "latest"


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def is_complete(path: str) -> bool:
    """A checkpoint dir counts only with dist_checkpointing's metadata and our marker."""
    return (
        os.path.isdir(path)
        and os.path.isfile(os.path.join(path, MARKER))
        and os.path.isfile(os.path.join(path, "metadata.json"))
    )


def complete_checkpoints(root: str) -> List[Tuple[int, str]]:
    """[(step, path)] of complete checkpoints, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = STEP_RE.match(name)
        if m and is_complete(os.path.join(root, name)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def find_latest(root: str) -> Optional[str]:
    """The checkpoint to resume from: `latest` if it names a complete dir, else the newest
    complete step dir, else None. Temp dirs and dirs without the marker are never chosen."""
    ptr = os.path.join(root, LATEST)
    if os.path.isfile(ptr):
        with open(ptr, encoding="utf-8") as f:
            name = f.read().strip()
        if STEP_RE.match(name) and is_complete(os.path.join(root, name)):
            return os.path.join(root, name)
    ckpts = complete_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def read_train_state(path: str) -> dict:
    with open(os.path.join(path, MARKER), encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- state dicts
def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    st = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    st["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return st


def _set_rng_state(st: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(st["cpu"])
    if torch.cuda.is_available() and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(st["tracker"])


def _sharded_state(model_chunks, optimizer, scheduler, train_state: dict, is_loading: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    sd: dict = {}
    if len(model_chunks) == 1:
        sd["model"] = _unwrap(model_chunks[0]).sharded_state_dict()
    else:
        for i, c in enumerate(model_chunks):
            sd[f"model{i}"] = _unwrap(c).sharded_state_dict()
    model_sd = {k: v for k, v in sd.items() if k.startswith("model")}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
        ) if _is_distributed_optimizer(optimizer) else optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    if scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    sd["train_state"] = dict(train_state)
    rank, world = dist.get_rank(), dist.get_world_size()
    sd["rng_state"] = ShardedObject(
        "rng_state", _rng_state(), (world,), (rank,), replica_id=0
    )
    return sd


def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in opts)


def _unwrap(m):
    return getattr(m, "module", m)


# ----------------------------------------------------------------------------- save / load
def save(root: str, step: int, model_chunks, optimizer, scheduler, train_state: dict,
         config_yaml: str = "", keep_last: int = 0) -> str:
    """Save a checkpoint for `step` and publish it atomically (collective). Returns its path.
    optimizer = scheduler = None: a model-only checkpoint (train_state should say
    "model_only": true, see the module docstring)."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    name = step_dirname(step)
    final = os.path.join(root, name)
    tmp = os.path.join(root, ".tmp_" + name)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    dist.barrier()
    state = _sharded_state(model_chunks, optimizer, scheduler, train_state, is_loading=False)
    dist_checkpointing.save(state, tmp)
    dist.barrier()
    if rank == 0:
        if config_yaml:
            _atomic_write_text(os.path.join(tmp, "config.yaml"), config_yaml)
        _atomic_write_text(os.path.join(tmp, MARKER), json.dumps(dict(train_state), indent=1) + "\n")
        if os.path.exists(final):  # re-saving a step (e.g. after a resume): replace it
            old = os.path.join(root, ".old_" + name)
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
        _atomic_write_text(os.path.join(root, LATEST), name + "\n")
        if keep_last > 0:
            for s, path in complete_checkpoints(root)[:-keep_last]:
                if s != step:
                    shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    return final


def load(path: str, model_chunks, optimizer, scheduler) -> dict:
    """Load `path` into the model chunks, optimizer, scheduler and RNG; returns train_state."""
    from megatron.core import dist_checkpointing

    train_state = read_train_state(path)
    _prime_optimizer_state(optimizer)
    state = _sharded_state(model_chunks, optimizer, scheduler, train_state, is_loading=True)
    saved_world = _saved_world(path)
    if saved_world is not None and saved_world != dist.get_world_size():
        state.pop("rng_state")
        restore_rng = False
    else:
        restore_rng = True
    loaded = dist_checkpointing.load(state, path)
    if len(model_chunks) == 1:
        _unwrap(model_chunks[0]).load_state_dict(loaded["model"])
    else:
        for i, c in enumerate(model_chunks):
            _unwrap(c).load_state_dict(loaded[f"model{i}"])
    with torch.no_grad():  # fp32 main params are views of the (grad-requiring) model params
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_step(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    if restore_rng:
        _set_rng_state(loaded["rng_state"])
    elif dist.get_rank() == 0:
        print(f"[checkpoint] world size changed ({saved_world} -> {dist.get_world_size()}): "
              "RNG states not restored", flush=True)
    return train_state


def is_model_only(path: str) -> bool:
    """The checkpoint holds only a model (no optimizer / scheduler state): an import."""
    return bool(read_train_state(path).get("model_only"))


def load_model(path: str, model_chunks) -> dict:
    """Load only the model part of checkpoint `path` (weights and buffers, e.g. the KV-fraction
    controllers' tau) into this rank's model chunks, at any tp x pp layout; returns its
    train_state. The optimizer, scheduler and RNG are left as they are."""
    from megatron.core import dist_checkpointing

    if len(model_chunks) == 1:
        state = {"model": _unwrap(model_chunks[0]).sharded_state_dict()}
    else:
        state = {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}
    loaded = dist_checkpointing.load(state, path)
    for i, c in enumerate(model_chunks):
        _unwrap(c).load_state_dict(loaded["model" if len(model_chunks) == 1 else f"model{i}"])
    return read_train_state(path)


def _prime_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer zero Adam states (exp_avg, exp_avg_sq, step) to load into.

    Megatron's DistributedOptimizer builds its loading state dict from its current state and,
    without Apex / Transformer Engine, asserts that every param has a 'step'; a just-built
    torch Adam has none until its first step. The values are overwritten by the load.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        init = getattr(opt, "init_state_fn", None)
        if init is not None:
            init(inner, getattr(opt, "config", None))
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if "step" not in st and "exp_avg" in st:
                    st["step"] = torch.tensor(0.0)


def _restore_adam_step(optimizer) -> None:
    """torch Adam keeps `step` per parameter; Megatron's DistributedOptimizer checkpoints it once
    per param group (param_group['step']). Without Apex/TE the per-param tensors can come back
    from a primed (zero) state, so set them from the loaded group value (bias correction)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                st = inner.state.get(p)
                if st and "step" in st and torch.is_tensor(st["step"]):
                    st["step"] = torch.tensor(float(group["step"]), dtype=st["step"].dtype,
                                              device=st["step"].device)


def _saved_world(path: str) -> Optional[int]:
    try:
        return int(read_train_state(path).get("world_size"))
    except (TypeError, ValueError):
        return None
