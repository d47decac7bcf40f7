"""Checkpoints: Megatron dist_checkpointing, published atomically, verified, auto-resumed.

Layout under `checkpoint.dir`:

    step_00000100/            one complete checkpoint (a dist_checkpointing directory)
        metadata.json, .metadata, __*.distcp, common.pt   written by dist_checkpointing (all ranks)
        config.yaml           the resolved run config
        train_state.json      {step, consumed_samples, ...}
        ham_manifest.json     every file above with its size and SHA-256 (manifest.py)
    .tmp_step_00000200/       a save in progress (never read; removed at start-up)
    latest                    text file: "step_00000100" (the newest complete checkpoint)

Publication protocol (all ranks write shards into the temp dir; rank 0 publishes):
  1. every rank: dist_checkpointing.save(state, .tmp_step_N)           (collective)
  2. every rank hashes its share of the files; rank 0 gathers the shares
  3. rank 0 writes config.yaml, train_state.json, then ham_manifest.json (each atomic, fsync)
  4. rank 0: os.rename(.tmp_step_N, step_N)  (atomic on one file system), fsync the parent
  5. rank 0: write latest.tmp, fsync, os.replace(latest.tmp, latest)     (atomic)
  6. every rank learns whether any rank failed (an error on one rank fails the save everywhere,
     the temp dir is removed, and the message names the path; ENOSPC is said as such)
A save killed at any point leaves a .tmp_ dir (ignored, removed at the next start-up) or a
complete step dir that `latest` may not point at yet.

Resume (`resume`, and ham-convert-hf through `usable_checkpoints`): candidates are `latest`'s
target, then every complete step dir newest first. Each is verified before anything is loaded
(`verify_step`: manifest sizes, safe_checkpoint.inspect_step_dir, manifest hashes split over
the ranks); a corrupt one is reported naming its step dir and file, and the next older one is
tried; an unsafe one (a foreign pickle global, a path out of the dir) stops everything. If
checkpoints exist but none is usable, resume refuses to start over silently.

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

import errno
import json
import os
import re
import shutil
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not Exception

from . import manifest as mf
from .atomic import atomic_write_text, fsync_dir
from .signals import start_writer_results_queue
from .safe_checkpoint import CheckpointError, CorruptCheckpoint, diagnose_items, inspect_step_dir

STEP_RE = re.compile(r"^step_(\d{8})$")
TEMP_RE = re.compile(r"^\.tmp_step_\d{8}$")  # a save in progress (ours)
OLD_RE = re.compile(r"^\.old_(step_\d{8})$")  # a step dir being replaced by a re-save (ours)
LATEST_TMP_RE = re.compile(r"^latest\.tmp\.\d+$")
MARKER = "train_state.json"
LATEST = "latest"
MAX_SMALL_FILE = 1 << 20  # train_state.json, latest: a few bytes; more is not ours


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; the message names the path (and says when the disk is full)."""


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def _warn(msg: str) -> None:
    print(msg, flush=True)


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


def read_latest(root: str, warn: Callable[[str], None] = _warn) -> Optional[str]:
    """The step dir name `latest` holds, or None (missing, or not a step name: warned)."""
    ptr = os.path.join(root, LATEST)
    if not os.path.isfile(ptr):
        return None
    with open(ptr, "rb") as f:
        raw = f.read(64)
    name = raw.decode("ascii", errors="replace").strip()
    if not STEP_RE.match(name):
        warn(f"[checkpoint] warning: {ptr} does not hold a step dir name ({raw[:24]!r}...); "
             "using the newest complete step dir")
        return None
    return name


def candidates(root: str, warn: Callable[[str], None] = _warn) -> List[str]:
    """Complete step dirs in the order resume tries them: `latest`'s, then newest first."""
    order = [p for _, p in reversed(complete_checkpoints(root))]
    name = read_latest(root, warn)
    if name is not None:
        target = os.path.join(root, name)
        if target in order:
            order.remove(target)
            order.insert(0, target)
        else:
            warn(f"[checkpoint] warning: {os.path.join(root, LATEST)} names {name}, which is not a "
                 "complete checkpoint; using the newest complete step dir")
    return order


def find_latest(root: str) -> Optional[str]:
    """The first resume candidate (unverified), or None."""
    c = candidates(root)
    return c[0] if c else None


def read_train_state(path: str) -> dict:
    p = os.path.join(path, MARKER)
    try:
        if os.path.getsize(p) > MAX_SMALL_FILE:
            raise ValueError("too large")
        with open(p, encoding="utf-8") as f:
            st = json.load(f)
        if not isinstance(st, dict) or not isinstance(st.get("step"), int):
            raise ValueError("no integer 'step'")
        return st
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{p}: unreadable train state ({e})") from None


def agree_error(err):
    """Collective: the first rank's error (any picklable; None = no error) as seen by every rank."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, err)
    return next((e for e in out if e is not None), None)


# ----------------------------------------------------------------------------- verification
def verify_step(path: str, rank: int = 0, world: int = 1) -> None:
    """Everything but loading: marker, manifest sizes, inspect_step_dir (nothing executes), and
    this rank's share of the manifest hashes. Raises CorruptCheckpoint / UnsafeCheckpoint."""
    read_train_state(path)
    files = mf.read_manifest(path)
    if files is not None:
        mf.check_sizes(path, files)
    data_files = inspect_step_dir(path)
    if files is not None:
        unlisted = [n for n in data_files if n not in files]
        if unlisted:
            raise CorruptCheckpoint(f"{os.path.join(path, unlisted[0])}: named by the metadata but "
                                    f"not in {mf.MANIFEST}")
        mf.check_hashes(path, files, rank, world)


def verify_step_collective(path: str) -> None:
    """verify_step on every rank (hashes split over the ranks); all ranks raise the same error."""
    rank, world = dist.get_rank(), dist.get_world_size()
    err = None
    try:
        verify_step(path, rank, world)
    except CheckpointError as e:
        err = (type(e).__name__, str(e))
    first = agree_error(err)
    if first:
        from . import safe_checkpoint as sc

        raise getattr(sc, first[0], CorruptCheckpoint)(first[1])


def is_step_dir(path: str) -> bool:
    base = os.path.basename(os.path.normpath(path))
    return bool(STEP_RE.match(base)) or base.startswith(".tmp_") or \
        os.path.isfile(os.path.join(path, "metadata.json"))


def usable_checkpoints(path: str, verify: Callable[[str], None] = verify_step,
                       warn: Callable[[str], None] = _warn) -> Iterator[str]:
    """Verified checkpoints to load, best first (the one discovery of ham-train and
    ham-convert-hf). `path` is a run's checkpoint dir (candidates() order, falling back past
    corrupt ones with a warning) or one step dir (it or an error). Yields nothing for a dir
    without checkpoints; raises CorruptCheckpoint when checkpoints exist but none was usable
    (the consumer resumes the iterator after a failed load), UnsafeCheckpoint at once."""
    if not os.path.exists(path):
        raise CorruptCheckpoint(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        raise CorruptCheckpoint(f"{path}: not a directory (expected a run's checkpoint dir or one "
                                "step_XXXXXXXX dir)")
    if is_step_dir(path):
        _require_complete(path)
        verify(path)
        yield path
        return
    order = candidates(path, warn)
    problems = []
    for i, c in enumerate(order):
        try:
            verify(c)
        except CorruptCheckpoint as e:
            problems.append(str(e))
            nxt = f"falling back to {order[i + 1]}" if i + 1 < len(order) else "no older checkpoint left"
            warn(f"[checkpoint] warning: {os.path.basename(c)} is unusable: {e}; {nxt}")
            continue
        problems.append(f"{c}: did not load")
        yield c
    if order:
        raise CorruptCheckpoint(
            f"{path}: none of the {len(order)} complete checkpoint(s) is usable ("
            + "; ".join(problems[:4]) + "); move them away to start over (or set checkpoint.resume=false)")


def _require_complete(path: str) -> None:
    base = os.path.basename(os.path.normpath(path))
    if base.startswith(".tmp_"):
        raise CorruptCheckpoint(f"{path}: a save in progress (temp dir), not a checkpoint")
    for name, why in (("metadata.json", "dist_checkpointing did not finish writing it"),
                      (MARKER, "the trainer writes it after every shard is saved")):
        if not os.path.isfile(os.path.join(path, name)):
            raise CorruptCheckpoint(f"{path}: incomplete checkpoint: no {name} ({why})")


def describe_load_failure(path: str, e: BaseException) -> str:
    """A failed dist_checkpointing.load as one line naming the step dir and, when found, the file."""
    failures = getattr(e, "failures", None)  # torch's CheckpointException: {rank: (exc, trace)}
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        inner = inner[0] if isinstance(inner, tuple) else inner
        what = f"{type(inner).__name__}: {(str(inner).splitlines() or [''])[0]}"
    else:
        what = f"{type(e).__name__}: {e}"
    where = diagnose_items(path)
    return f"{path}: could not load ({what.strip()[:400]})" + (f"; {where}" if where else "")


# ----------------------------------------------------------------------------- start-up
def remove_stale_temps(root: str, warn: Callable[[str], None] = _warn) -> List[str]:
    """Remove what an interrupted save of this tool left in `root` (names it alone creates:
    .tmp_step_NNNNNNNN dirs, latest.tmp.PID files); put back a step dir that a killed re-save
    had moved to .old_step_NNNNNNNN. Nothing else is touched. Returns the removed names."""
    removed = []
    if not os.path.isdir(root):
        return removed
    for name in sorted(os.listdir(root)):
        p = os.path.join(root, name)
        m = OLD_RE.match(name)
        if m and os.path.isdir(p) and not os.path.islink(p):
            final = os.path.join(root, m.group(1))
            if not os.path.exists(final):
                os.rename(p, final)
                warn(f"[checkpoint] restored {final} (a re-save of it was interrupted)")
                continue
            shutil.rmtree(p)
        elif TEMP_RE.match(name) and os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif LATEST_TMP_RE.match(name) and os.path.isfile(p):
            os.remove(p)
        else:
            continue
        removed.append(name)
    if removed:
        warn(f"[checkpoint] removed leftovers of interrupted saves in {root}: {', '.join(removed)}")
    return removed


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
def _on_all_ranks(fn: Callable[[], object], what: str, cleanup: Callable[[], None]) -> list:
    """Run fn on every rank; if it raised anywhere, every rank raises CheckpointSaveError (after
    rank 0 ran `cleanup`). Returns the per-rank results. Collective (all_gather_object)."""
    try:
        res, err = fn(), None
    except (Exception, CheckpointException) as e:
        res, err = None, _describe_save_error(what, e)
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, (res, err))
    errs = [e for _, e in out if e]
    if errs:
        if dist.get_rank() == 0:
            cleanup()
        raise CheckpointSaveError(errs[0])
    return [r for r, _ in out]


def _describe_save_error(what: str, e: BaseException) -> str:
    """One line naming `what` (the path); says 'no space left on device' when that is the cause."""
    chain, x = [], e
    while x is not None and len(chain) < 8:
        chain.append(x)
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            for f in failures.values():
                chain.append(f[0] if isinstance(f, tuple) else f)
        x = x.__cause__ or x.__context__
    text = " | ".join(f"{type(c).__name__}: {(str(c).splitlines() or [''])[0]}" for c in chain
                      if isinstance(c, BaseException) and not isinstance(getattr(c, "failures", None), dict))
    full = any(getattr(c, "errno", None) == errno.ENOSPC for c in chain) or "No space left" in text
    path = what.split(" ", 1)[0]
    try:
        du = shutil.disk_usage(os.path.dirname(path) if not os.path.isdir(path) else path)
        full = full or du.free < max(1 << 20, du.total // 1000)
        space = f" ({du.free / 2**20:.1f} MiB free of {du.total / 2**30:.2f} GiB)"
    except OSError:
        space = ""
    if full:
        return f"{what}: no space left on device{space}; the checkpoint was not saved ({text[:300]})"
    return f"{what}: {text[:500]}"


def save(root: str, step: int, model_chunks, optimizer, scheduler, train_state: dict,
         config_yaml: str = "", keep_last: int = 0) -> str:
    """Save a checkpoint for `step` and publish it atomically (collective). Returns its path.
    optimizer = scheduler = None: a model-only checkpoint (train_state should say
    "model_only": true, see the module docstring).
    Raises CheckpointSaveError on every rank when any rank failed (temp dir removed)."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    name = step_dirname(step)
    final = os.path.join(root, name)
    tmp = os.path.join(root, ".tmp_" + name)
    drop_tmp = lambda: shutil.rmtree(tmp, ignore_errors=True)  # noqa: E731

    def prepare():
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            drop_tmp()
            os.makedirs(tmp)

    _on_all_ranks(prepare, f"{tmp} (creating the temp dir)", drop_tmp)
    start_writer_results_queue()  # a stop signal to the whole job must not kill Megatron's writer
    state = _sharded_state(model_chunks, optimizer, scheduler, train_state, is_loading=False)
    _on_all_ranks(lambda: dist_checkpointing.save(state, tmp), f"{tmp} (writing step {step})", drop_tmp)

    def write_small_files():  # before hashing, so the manifest covers them
        if rank == 0:
            if config_yaml:
                atomic_write_text(os.path.join(tmp, "config.yaml"), config_yaml)
            atomic_write_text(os.path.join(tmp, MARKER), json.dumps(dict(train_state), indent=1) + "\n")

    _on_all_ranks(write_small_files, f"{tmp} (train state)", drop_tmp)
    world = dist.get_world_size()
    shares = _on_all_ranks(lambda: mf.hash_files(tmp, rank, world), f"{tmp} (hashing)", drop_tmp)

    def publish():
        if rank != 0:
            return
        files = {}
        for share in shares:
            files.update(share)
        mf.write_manifest(tmp, step, files)
        if os.path.exists(final):  # re-saving a step (e.g. after a resume): replace it
            old = os.path.join(root, ".old_" + name)
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(root)
        atomic_write_text(os.path.join(root, LATEST), name + "\n")
        if keep_last > 0:
            for s, path in complete_checkpoints(root)[:-keep_last]:
                if s != step:
                    shutil.rmtree(path, ignore_errors=True)

    _on_all_ranks(publish, f"{final} (publishing)", drop_tmp)
    return final


def resume(root: str, model_chunks, optimizer, scheduler,
           warn: Callable[[str], None] = _warn) -> Optional[Tuple[str, dict]]:
    """Load the best usable checkpoint under `root` (collective): (path, train_state), or None
    when there is none. A model-only checkpoint (train_state "model_only", written by
    ham-import-hf) loads the model's weights and buffers only. Corrupt checkpoints -- found by verification or by a failed load -- are
    reported and the next older one is tried; see usable_checkpoints for the errors."""
    for path in usable_checkpoints(root, verify_step_collective, warn):
        try:
            err = None
            if is_model_only(path):  # an import (ham-import-hf): weights only, the rest fresh
                st = load_model(path, model_chunks)
                optimizer.reload_model_params()  # the main (fp32) params from the loaded weights
            else:
                st = load(path, model_chunks, optimizer, scheduler)
        except (Exception, CheckpointException) as e:
            err = describe_load_failure(path, e)
        first = agree_error(err)
        if first is None:
            return path, st
        warn(f"[checkpoint] warning: {first}; trying an older checkpoint")
    return None


def load(path: str, model_chunks, optimizer, scheduler) -> dict:
    """Load `path` into the model chunks, optimizer, scheduler and RNG; returns train_state.
    Call verify_step (or resume, which does) first: this reads the files as Megatron does."""
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
