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

from megatron_ham.safe_names import check_name

from .config import ConfigError, load_config, read_yaml_file


def _one_line(value, where: str) -> str:
    """A string printed as ONE line of the arguments (ham.sbatch reads them with mapfile)."""
    if not isinstance(value, str) or any(c in value for c in "\n\r\0"):
        raise ConfigError(f"{where}: expected a string without line breaks or NUL, got {value!r}")
    return value


def load_sweep(path: str) -> List[List[str]]:
    """Every run's ham-train arguments, validated. Raises ConfigError naming the sweep file, the
    run and the key (a run name is one path component: no '..', '/', line break, leading '-')."""
    doc = read_yaml_file(path, "sweep") or {}
    if not isinstance(doc, dict) or "recipe" not in doc or not isinstance(doc.get("runs"), list):
        raise ConfigError(f"{path}: a sweep needs 'recipe' and a list 'runs'")
    unknown = sorted(set(doc) - {"recipe", "runs", "output_root"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown} (valid: recipe, runs, output_root)")
    root = doc.get("output_root", "runs")
    if not isinstance(root, str) or not root:
        raise ConfigError(f"{path}: output_root must be a directory name, got {root!r}")
    _one_line(root, f"{path}: output_root")
    recipe = _one_line(doc["recipe"], f"{path}: recipe")
    if not os.path.isabs(recipe):
        recipe = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), recipe))
    out = []
    seen = set()
    for i, run in enumerate(doc["runs"]):
        if not isinstance(run, dict) or "name" not in run:
            raise ConfigError(f"{path}: runs[{i}] needs a 'name'")
        try:
            name = check_name(run["name"], f"{path}: runs[{i}].name")  # <output_root>/<name>/checkpoints
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if name in seen:
            raise ConfigError(f"{path}: runs[{i}].name {name!r} is used by an earlier run (same checkpoint dir)")
        seen.add(name)
        extra = sorted(set(run) - {"name", "overrides"})
        if extra:
            raise ConfigError(f"{path}: runs[{i}] ({name}): unknown key(s) {extra} (valid: name, overrides)")
        ov = run.get("overrides", []) or []
        if not isinstance(ov, list):
            raise ConfigError(f"{path}: runs[{i}] ({name}).overrides must be a list of 'key=value' strings")
        ov = [_one_line(o, f"{path}: runs[{i}] ({name}).overrides[{k}]") for k, o in enumerate(ov)]
        args = [recipe, f"name={name}", f"checkpoint.dir={root}/{name}/checkpoints", *ov]
        try:
            load_config(args[0], args[1:])  # validate now, not at 3am on the cluster
        except ConfigError as e:
            raise ConfigError(f"{path}: runs[{i}] ({name}): {e}") from None
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
        try:
            i = int(argv[1])
        except ValueError:
            raise ConfigError(f"{argv[0]}: index {argv[1]!r} is not a number") from None
        if not 0 <= i < len(runs):
            raise ConfigError(f"{argv[0]}: index {i} out of range (0..{len(runs) - 1})")
    except (ConfigError, ValueError) as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    print("\n".join(runs[i]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
