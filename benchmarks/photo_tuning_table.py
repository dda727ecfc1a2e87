"""The tuning runs of benchmarks/photo_tuning.sh side by side: one line per run and evaluated checkpoint.

    python benchmarks/photo_tuning_table.py runs/photo-tune [--markdown]

Reads every ``<run>/scores/*.json`` the bench wrote under the folder and prints the ImageNet-feature FD, the mean
SWD and the SWD of each pyramid level (finest first), sorted by method then FD.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows(root: Path) -> list[dict]:
    out = []
    for path in sorted(root.glob("*/scores/*.json")):
        row = json.loads(path.read_text())
        out.append({"run": path.parent.parent.name, **row})
    return sorted(out, key=lambda r: (r["method"], r["step"], r["seed"], r.get("fd_efficientnet-lite0", 0.0)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", default="runs/photo-tune")
    p.add_argument("--markdown", action="store_true", help="a Markdown table (for docs/RESULTS.md)")
    args = p.parse_args()
    table = rows(Path(args.root))
    if not table:
        print(f"no scores under {args.root}/*/scores: run benchmarks/photo_tuning.sh first", file=sys.stderr)
        return 1
    levels = sorted(
        {k for r in table for k in r if k.startswith("swd_") and k[4:].isdigit()}, key=lambda k: -int(k[4:])
    )
    head = ["run", "method", "seed", "step", "NFE", "FD", "SWD mean", *[f"SWD {k[4:]}" for k in levels]]
    lines = []
    for r in table:
        cells = [r["run"], r["method"], str(r["seed"]), str(r["step"]), str(r["nfe"]), f"{r['fd_efficientnet-lite0']:.1f}",
                 f"{r['swd_mean']:.1f}", *[f"{r[k]:.1f}" if k in r else "-" for k in levels]]  # fmt: skip
        lines.append(cells)
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for cells in lines:
            print("| " + " | ".join(cells) + " |")
    else:
        widths = [max(len(c) for c in col) for col in zip(head, *lines)]
        for cells in [head, *lines]:
            print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
