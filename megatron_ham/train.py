"""ham-train: pretrain a megatron-ham model from a recipe.

    ham-train RECIPE.yaml [key=value ...]          (also: python -m megatron_ham.train ...)
    torchrun --nproc-per-node 8 -m megatron_ham.train recipes/ham_800m.yaml train.lr=3e-4
    srun --ntasks-per-node 8 python -m megatron_ham.train recipes/ham_800m.yaml   (slurm/)

Overrides are dotted keys of the recipe schema (docs/training.md). Process layout comes from
RANK/WORLD_SIZE/LOCAL_RANK (torchrun) or SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (srun).
Exit codes: 0 done, 1 error (or a failed save), 2 bad recipe/override/checkpoint dir, 3 non-finite
loss or grad norm (stopped before saving), 75 preempted (anything new saved; requeue).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ham-train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.lr=3e-4 model.num_layers=2")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit (no processes started)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    # First, before anything slow (imports, process groups, data indices): a preemption signal
    # from now on is handled (signals.py), and forked helpers die with this process.
    from megatron_ham.training.signals import StopRequest, die_with_parent

    stop = StopRequest().install()
    die_with_parent()
    args = build_parser().parse_args(argv)
    import warnings

    for msg in (".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
                ".*full scope is deprecated.*", ".*is not a leaf Tensor.*",
                ".*torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor).*"):
        warnings.filterwarnings("ignore", message=msg)
    from megatron_ham.training.config import ConfigError, dump_config, load_config
    from megatron_ham.training.signals import EXIT_CONFIG

    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        print(f"ham-train: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    # Before megatron, Inductor, Triton or TileLang is imported (only torch is, by now): the
    # compilers read their cache directories from the environment (training/compile_cache.py).
    from megatron_ham.training import compile_cache

    try:
        cache = compile_cache.configure(cfg.train.compile_cache_dir, cfg.train.compile_cache_local)
    except OSError as e:
        print(f"ham-train: config error: train.compile_cache_dir / train.compile_cache_local: {e}",
              file=sys.stderr)
        return EXIT_CONFIG
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(cache.describe(), flush=True)
    try:
        return _run(cfg, stop)
    finally:
        try:
            n = compile_cache.sync_back(cache)
            if n:
                print(f"[compile-cache] copied {n} new entries back to {cache.shared}", flush=True)
        except OSError as e:  # the run's own result stands; the next start compiles what is missing
            print(f"[compile-cache] warning: copying new entries back to {cache.shared} failed: {e}",
                  file=sys.stderr, flush=True)


def _run(cfg, stop) -> int:
    """Set-up, the loop, and the exit code (process groups torn down)."""
    from megatron_ham.training.checkpoint import CheckpointSaveError
    from megatron_ham.training.config import ConfigError
    from megatron_ham.training.signals import EXIT_CONFIG, EXIT_OK, EXIT_REQUEUE, Preempted
    from megatron_ham.training.loop import setup, train
    from megatron_ham.training.safe_checkpoint import CheckpointError

    trainer = None
    try:
        trainer = setup(cfg, stop)
        code = train(trainer, stop)
    except Preempted as e:
        print(f"[train] {e}: nothing new to save; exit {EXIT_REQUEUE} (requeue)", flush=True)
        code = EXIT_REQUEUE
    except ConfigError as e:
        print(f"ham-train: config error: {e}", file=sys.stderr)
        code = EXIT_CONFIG
    except CheckpointError as e:
        print(f"ham-train: checkpoint error: {e}", file=sys.stderr)
        code = EXIT_CONFIG
    except CheckpointSaveError as e:
        print(f"ham-train: checkpoint save failed: {e}", file=sys.stderr)
        code = 1
    import torch.distributed as dist

    if dist.is_initialized():
        if code == EXIT_OK and trainer is not None:
            if stop.agreed(trainer.device):  # a signal after the last save: requeue all the same
                print(f"[train] signal during shutdown; exit {EXIT_REQUEUE} (requeue)", flush=True)
                code = EXIT_REQUEUE
            dist.barrier()
        dist.destroy_process_group()
    return EXIT_REQUEUE if code == EXIT_OK and stop.signum else code


if __name__ == "__main__":
    sys.exit(main())
