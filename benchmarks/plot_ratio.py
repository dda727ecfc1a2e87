"""DFM against Flow Matching along training: the ratio of their Fréchet distances at every evaluated step.

Reads the ``results.json`` of one or more ``dfm bench quality`` runs (rows at guidance 1.0, averaged over seeds),
prints a Markdown table of both methods' distances and their ratio per step, and plots the ratio against steps
(1.0 = parity; below 1 DFM is better).

Run: ``python benchmarks/plot_ratio.py runs/bench-budget/results.json --out docs/images/ratio.png``
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

METRICS = ("fd_efficientnet-lite0", "fd_fashion-cnn")


def collect(files: list[str], dfm: str, fm: str) -> dict[str, dict[str, dict[int, float]]]:
    """{metric: {variant: {step: mean over seeds}}} at guidance 1.0 for the two variants."""
    values: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for file in files:
        path = Path(file)
        # a bench output directory: every score it holds (also those of earlier, shorter invocations)
        rows = ([json.loads(f.read_text()) for f in sorted((path / "scores").glob("*.json"))] if path.is_dir()
                else json.loads(path.read_text())["rows"])  # fmt: skip
        for row in rows:
            if row["guidance"] != 1.0 or row["variant"] not in (dfm, fm):
                continue
            for metric in METRICS:
                if metric in row:
                    values[metric][row["variant"]][int(row["step"])].append(float(row[metric]))
    return {m: {v: {s: statistics.mean(x) for s, x in steps.items()} for v, steps in by.items()}
            for m, by in values.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="results.json files of dfm bench quality, or its --out directories")
    parser.add_argument("--dfm", default="DFM", help="variant name of DFM (default DFM)")
    parser.add_argument("--fm", default="Flow Matching", help="variant name of Flow Matching")
    parser.add_argument("--out", help="PNG of the ratio against steps")
    parser.add_argument("--title", default="DFM / Flow Matching")
    args = parser.parse_args()

    data = collect(args.results, args.dfm, args.fm)
    if not data:
        raise SystemExit(f"no rows of {args.dfm!r} and {args.fm!r} at guidance 1.0 in {args.results}")
    print("| metric | step | DFM | Flow Matching | DFM / FM |")
    print("|---|---|---|---|---|")
    ratios = {}
    for metric, by in data.items():
        steps = sorted(set(by.get(args.dfm, {})) & set(by.get(args.fm, {})))
        ratios[metric] = [(s, by[args.dfm][s] / by[args.fm][s]) for s in steps]
        for s, r in ratios[metric]:
            print(f"| {metric} | {s} | {by[args.dfm][s]:.1f} | {by[args.fm][s]:.1f} | {r:.3f} |")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
        for metric, points in ratios.items():
            ax.plot([s for s, _ in points], [r for _, r in points], marker="o", label=metric)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("optimiser steps")
        ax.set_ylabel("FD ratio DFM / FM (lower: DFM better)")
        ax.set_title(args.title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out)
        print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
