"""The tuning runs of benchmarks/photo_tuning.sh side by side: one line per run and evaluated checkpoint.

    python benchmarks/photo_tuning_table.py runs/photo-tune [--markdown]
    python benchmarks/photo_tuning_table.py runs/photo-tune --compare dfm-h192-xpred fm-h192-xpred [--markdown]
    python benchmarks/photo_tuning_table.py runs/photo-128a runs/photo-128b --compare p128p8-ov-dfm3 p128p8-ov-fm

Several folders are read as one (the seeds of a lane run side by side in separate folders: a run of the same name
in each is one run, its seeds together); a seed scored twice at one step is refused.

Reads every ``<run>/scores/*.json`` the bench wrote under the folder and prints the ImageNet-feature FD, the mean
SWD and the SWD of each pyramid level (finest first), and where the bench scored it the spread (sigma) of each level in
% of the reference's, sorted by method then FD. ``--compare A B``: the two runs'
mean (and spread over seeds) at each step both reached, and the ratio A / B of the means.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows(*roots: Path) -> list[dict]:
    out, seen = [], {}
    for root in roots:
        for path in sorted(root.glob("*/scores/*.json")):
            row = {"run": path.parent.parent.name, **json.loads(path.read_text())}
            key = (row["run"], row["seed"], row["step"], row.get("guidance", 1.0))
            if key in seen:
                raise SystemExit(f"{path} and {seen[key]} score the same run, seed, step and guidance: give one of "
                                 "their folders")  # fmt: skip
            seen[key] = path
            out.append(row)
    return sorted(out, key=lambda r: (r["method"], r["step"], r["seed"], r.get("fd_efficientnet-lite0", 0.0)))


def compare(table: list[dict], a: str, b: str, markdown: bool) -> list[str]:
    """Lines of the mean ± half-range over seeds of runs ``a`` and ``b`` at every step both have, and a / b."""
    keys = ["fd_efficientnet-lite0", "swd_mean"]
    levels = [
        {k for r in table if r["run"] == run for k in r if k.startswith("swd_") and k[4:].isdigit()} for run in (a, b)
    ]
    keys += sorted(levels[0] & levels[1], key=lambda k: -int(k[4:]))  # the SWD levels of both (runs of one size)

    def stats(run: str, step: int) -> tuple[int, dict[str, tuple[float, float]]]:
        rs = [r for r in table if r["run"] == run and r["step"] == step]
        out = {}
        for k in keys:
            v = [r[k] for r in rs]
            out[k] = (sum(v) / len(v), (max(v) - min(v)) / 2)
        return len(rs), out

    steps = sorted({r["step"] for r in table if r["run"] == a} & {r["step"] for r in table if r["run"] == b})
    if not steps:
        raise SystemExit(f"--compare: no step scored in both {a} and {b}")
    names = ["FD", "SWD mean", *[f"SWD {k[4:]}" for k in keys[2:]]]
    lines = ["| step | run (seeds) | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(keys)]
    for step in steps:
        (na, sa), (nb, sb) = stats(a, step), stats(b, step)
        for run, n, st in ((a, na, sa), (b, nb, sb)):
            cells = [f"{m:.1f} ± {h:.1f}" if n > 1 else f"{m:.1f}" for m, h in (st[k] for k in keys)]
            lines.append(f"| {step} | {run} ({n}) | " + " | ".join(cells) + " |")
        lines.append(f"| {step} | ratio | " + " | ".join(f"**{sa[k][0] / sb[k][0]:.2f}**" for k in keys) + " |")
    if not markdown:
        lines = [ln.strip("|").replace(" | ", "  ").replace("**", "") for ln in lines if not ln.startswith("|---")]
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="*", default=["runs/photo-tune"], metavar="root",
                   help="bench folders (several are read as one: a lane's seeds run in separate folders)")  # fmt: skip
    p.add_argument("--markdown", action="store_true", help="a Markdown table (for docs/RESULTS.md)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two runs' means over seeds and their ratio A / B")
    args = p.parse_args()
    table = rows(*map(Path, args.roots))
    if not table:
        print(
            f"no scores under {' '.join(args.roots)} (*/scores): run benchmarks/photo_tuning.sh first", file=sys.stderr
        )
        return 1
    if args.compare:
        print("\n".join(compare(table, *args.compare, args.markdown)))
        return 0
    levels = sorted(
        {k for r in table for k in r if k.startswith("swd_") and k[4:].isdigit()}, key=lambda k: -int(k[4:])
    )
    # the detail each level holds (the bench's sigma metric, when it was scored): the samples' spread in % of the
    # reference's, finest first
    spreads = sorted(
        {k for r in table for k in r if k.startswith("sigma_") and k[6:].isdigit() and f"{k}_ref" in r},
        key=lambda k: -int(k[6:]),
    )
    head = ["run", "method", "seed", "step", "NFE", "FD", "SWD mean", *[f"SWD {k[4:]}" for k in levels],
            *[f"σ {k[6:]} %" for k in spreads]]  # fmt: skip
    lines = []
    for r in table:
        cells = [r["run"], r["method"], str(r["seed"]), str(r["step"]), str(r["nfe"]),
                 f"{r['fd_efficientnet-lite0']:.1f}", f"{r['swd_mean']:.1f}",
                 *[f"{r[k]:.1f}" if k in r else "-" for k in levels],
                 *[f"{100 * r[k] / r[f'{k}_ref']:.0f}" if k in r else "-" for k in spreads]]  # fmt: skip
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
