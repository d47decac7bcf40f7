"""Submit-time checks: the recipe (or every run of a sweep) validates and every data path it
names exists, so a typo fails at `slurm/submit.sh`, not hours later in the queue.

    python -m megatron_ham.training.submit_check RECIPE.yaml [key=value ...]
    python -m megatron_ham.training.submit_check --sweep SWEEP.yaml [key=value ...]

Checked: the config (as ham-train loads it), then data.blend and the IndexedDatasets it lists,
data.prefixes, data.tokenizer, local webdataset shards, and that data.urls holds no `pipe:` URL
unless data.allow_pipe_urls is set. HAM_SKIP_PATH_CHECK=1 skips the path part (data that only
exists on the compute nodes). Exit codes: 0 ok, 2 with a message naming the key and the path.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional


def check(argv: List[str]) -> List[str]:
    """Validate; returns one line per run checked. Raises ConfigError."""
    from .config import ConfigError, load_config
    from .data import check_data_paths

    if argv[:1] == ["--sweep"]:
        if len(argv) < 2:
            raise ConfigError("--sweep needs a sweep file")
        from .sweep import load_sweep

        runs = [a + argv[2:] for a in load_sweep(argv[1])]
    elif argv:
        runs = [argv]
    else:
        raise ConfigError("usage: python -m megatron_ham.training.submit_check (RECIPE.yaml | --sweep SWEEP.yaml) "
                          "[key=value ...]")
    done = []
    for args in runs:
        cfg = load_config(args[0], args[1:])
        if os.environ.get("HAM_SKIP_PATH_CHECK") != "1":
            try:
                check_data_paths(cfg)
            except ConfigError as e:
                raise ConfigError(f"run {cfg.name!r}: {e}") from None
        done.append(f"{cfg.name}: ok ({cfg.data.backend} data, checkpoints in {cfg.checkpoint.dir})")
    return done


def main(argv: Optional[List[str]] = None) -> int:
    from .config import ConfigError

    try:
        for line in check(list(sys.argv[1:] if argv is None else argv)):
            print(f"[submit-check] {line}", file=sys.stderr)
    except ConfigError as e:
        print(f"ham-train: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
