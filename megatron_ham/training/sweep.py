"""Sweep files: one recipe, several named runs with their own overrides (Slurm job arrays).

    recipe: ../ham_800m.yaml          # relative to the sweep file
    output_root: runs                 # optional; run i writes <output_root>/<name>/checkpoints
    runs:
      - name: ham-800m-kv10
        overrides: [model.kv_fraction=0.10]

`python -m megatron_ham.training.sweep FILE --count` prints the number of runs;
`python -m megatron_ham.training.sweep FILE INDEX` prints run INDEX's ham-train arguments, one
per line: the recipe path, then `name=...`, `checkpoint.dir=<output_root>/<name>/checkpoints`, then the
run's overrides (slurm/ham.sbatch reads them with mapfile). Every run is validated.
"""
from __future__ import annotations

import os
import sys
from typing import List

from .config import ConfigError, load_config, read_yaml_file


def load_sweep(path: str) -> List[List[str]]:
    doc = read_yaml_file(path, "sweep") or {}
    if not isinstance(doc, dict) or "recipe" not in doc or not isinstance(doc.get("runs"), list):
        raise ConfigError(f"{path}: a sweep needs 'recipe' and a list 'runs'")
    unknown = sorted(set(doc) - {"recipe", "runs", "output_root"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown} (valid: recipe, runs, output_root)")
    root = doc.get("output_root", "runs")
    if not isinstance(root, str) or not root:
        raise ConfigError(f"{path}: output_root must be a directory name, got {root!r}")
    recipe = doc["recipe"]
    if not os.path.isabs(recipe):
        recipe = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), recipe))
    out = []
    for i, run in enumerate(doc["runs"]):
        if not isinstance(run, dict) or not isinstance(run.get("name"), str):
            raise ConfigError(f"{path}: runs[{i}] needs a 'name'")
        extra = sorted(set(run) - {"name", "overrides"})
        if extra:
            raise ConfigError(f"{path}: runs[{i}]: unknown key(s) {extra} (valid: name, overrides)")
        ov = run.get("overrides", []) or []
        if not isinstance(ov, list) or not all(isinstance(o, str) for o in ov):
            raise ConfigError(f"{path}: runs[{i}].overrides must be a list of 'key=value' strings")
        args = [recipe, f"name={run['name']}", f"checkpoint.dir={root}/{run['name']}/checkpoints", *ov]
        load_config(args[0], args[1:])  # validate now, not at 3am on the cluster
        out.append(args)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print("usage: python -m megatron_ham.training.sweep SWEEP.yaml (--count | INDEX)", file=sys.stderr)
        return 2
    try:
        runs = load_sweep(argv[0])
        if argv[1] == "--count":
            print(len(runs))
            return 0
        i = int(argv[1])
        if not 0 <= i < len(runs):
            raise ConfigError(f"{argv[0]}: index {i} out of range (0..{len(runs) - 1})")
    except (ConfigError, ValueError) as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    print("\n".join(runs[i]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
