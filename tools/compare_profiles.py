#!/usr/bin/env python
"""Two profiles of tools/profile_step.py side by side: where a change moved a step's time.

    python tools/profile_step.py recipes/transformer_800m.yaml --top 40 --out after.json
    (the same from the baseline's tree, e.g. a `git archive` of it:) ... --out before.json
    python tools/compare_profiles.py before.json after.json [--items 20]

Prints, in ms per sequence (ms per step / the step's global batch, so profiles of different
global batches compare; the optimizer runs once per step): every category of the two tables,
the GPU-busy time and, where both have it, the unprofiled step, with after - before and the
change in per cent; then the kernels (CPU: operators) whose time changed most. A kernel is only
compared where both profiles list it among their category's biggest items (profile_step.py
--top N keeps N per category): one listed on one side only is shown with "-" on the other, as
"not among the biggest", not as zero. Exit status 2 with the file and key at fault when a file is
not a profile_step.py summary.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Tuple

#: the keys of profile_step.py's summary this tool reads
NEEDED = ("categories", "busy_ms_per_step", "global_batch_size")


class ProfileError(ValueError):
    """A file that is not a profile_step.py summary (the message names the file and the key)."""


def load(path: str) -> dict:
    try:
        with open(path) as f:
            s = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ProfileError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(s, dict):
        raise ProfileError(f"{path}: not a profile_step.py summary (a JSON object is expected)")
    for k in NEEDED:
        if k not in s:
            raise ProfileError(f"{path}: not a profile_step.py summary: no key {k!r}")
    if not isinstance(s["global_batch_size"], int) or s["global_batch_size"] < 1:
        raise ProfileError(f"{path}: global_batch_size must be a positive integer, got {s['global_batch_size']!r}")
    for i, r in enumerate(s["categories"]):
        for k in ("category", "ms_per_step", "top"):
            if not isinstance(r, dict) or k not in r:
                raise ProfileError(f"{path}: categories[{i}] has no key {k!r}")
    return s


def per_sequence(s: dict) -> Tuple[Dict[str, float], Dict[Tuple[str, str], float]]:
    """(ms per sequence by category, with "GPU busy" and "step (unprofiled)" where known;
    ms per sequence of each listed item by (category, name))."""
    n = s["global_batch_size"]
    cats = {r["category"]: r["ms_per_step"] / n for r in s["categories"]}
    cats["GPU busy" if s.get("timeline", "cuda") == "cuda" else "in operators (CPU)"] = s["busy_ms_per_step"] / n
    if s.get("unprofiled_step_ms") is not None:
        cats["step (unprofiled)"] = s["unprofiled_step_ms"] / n
    items = {(r["category"], name): ms / n for r in s["categories"] for name, ms in r["top"]}
    return cats, items


def _row(label: str, a, b, width: int) -> str:
    fa = "-" if a is None else f"{a:.2f}"
    fb = "-" if b is None else f"{b:.2f}"
    if a is None or b is None:
        return f"{label:<{width}} {fa:>10} {fb:>10}"
    pct = f"{100 * (b - a) / a:+.1f}%" if a else ""
    return f"{label:<{width}} {fa:>10} {fb:>10} {b - a:>+10.2f} {pct:>8}"


def compare(before: dict, after: dict, items: int = 15) -> str:
    ca, ia = per_sequence(before)
    cb, ib = per_sequence(after)
    lines = [f"ms per sequence (before: global batch {before['global_batch_size']}, "
             f"after: {after['global_batch_size']})",
             f"{'category':<24} {'before':>10} {'after':>10} {'after-bef':>10} {'change':>8}"]
    for c in list(ca) + [c for c in cb if c not in ca]:
        lines.append(_row(c, ca.get(c), cb.get(c), 24))
    keys = set(ia) | set(ib)
    moved: List[Tuple[float, Tuple[str, str]]] = []
    for k in keys:  # listed on both sides: by how much it moved; on one side: by its size
        d = abs(ib[k] - ia[k]) if k in ia and k in ib else ia.get(k, ib.get(k))
        moved.append((d, k))
    moved.sort(key=lambda t: (-t[0], t[1]))
    lines += ["", f"the {min(items, len(moved))} items that moved most ('-': not among that profile's biggest)",
              f"{'category / item':<72} {'before':>10} {'after':>10} {'after-bef':>10} {'change':>8}"]
    for _, (cat, name) in moved[:items]:
        lines.append(_row(f"{cat} / {name}"[:72], ia.get((cat, name)), ib.get((cat, name)), 72))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", help="profile_step.py --out JSON of the baseline")
    ap.add_argument("after", help="profile_step.py --out JSON of the change")
    ap.add_argument("--items", type=int, default=15, help="kernels / operators to list (default 15)")
    args = ap.parse_args(argv)
    if args.items < 0:
        ap.error(f"--items must be >= 0, got {args.items}")
    try:
        before, after = load(args.before), load(args.after)
    except ProfileError as e:
        print(f"compare_profiles: {e}", file=sys.stderr)
        return 2
    print(compare(before, after, args.items))
    return 0


if __name__ == "__main__":
    sys.exit(main())
