"""ham-train: pretrain a megatron-ham model from a recipe.

    ham-train RECIPE.yaml [key=value ...]          (also: python -m megatron_ham.train ...)
    torchrun --nproc-per-node 8 -m megatron_ham.train recipes/ham_800m.yaml train.lr=3e-4
    srun --ntasks-per-node 8 python -m megatron_ham.train recipes/ham_800m.yaml   (slurm/)

Overrides are dotted keys of the recipe schema (docs/training.md). Process layout comes from
RANK/WORLD_SIZE/LOCAL_RANK (torchrun) or SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (srun).
Exit codes: 0 done, 1 error, 2 bad recipe/override, 75 preempted (checkpoint saved; requeue).
"""
from __future__ import annotations

import argparse
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
    from megatron_ham.training.loop import setup, train

    try:
        trainer = setup(cfg)
    except ConfigError as e:
        print(f"ham-train: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    code = train(trainer)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
