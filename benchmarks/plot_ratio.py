"""DFM against Flow Matching along training: the ratio of their Fréchet distances at every evaluated step.

Reads the ``results.json`` of one or more ``dfm bench quality`` runs (rows at guidance 1.0, averaged over seeds),
prints a Markdown table of both methods' distances and their ratio per step, and plots the ratio against steps
(1.0 = parity; below 1 DFM is better).

Run: ``python benchmarks/plot_ratio.py runs/bench-budget/results.json --out docs/images/ratio.png``, or, to compare
several DFM runs each against its own Flow Matching run (one line each, one panel per Fréchet distance):
``python benchmarks/plot_ratio.py --pair "32 px=runs/a,runs/a-fm" --pair "64 px=runs/b,runs/b-fm" --out r.png``.
A side of a pair may join several bench folders with ``+`` (the same runs trained to other budgets in other
folders: ``--pair "64 px=runs/x/dfm+runs/y/dfm,runs/x/fm+runs/y/fm"``). Every metric of the Fréchet distances and
the mean SWD that both sides scored gets a panel; ``--target`` draws the ratio a study aims for.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

METRICS = ("fd_efficientnet-lite0", "fd_fashion-cnn", "swd_mean")
TITLES = {
    "fd_efficientnet-lite0": "ImageNet-feature FD (EfficientNet-Lite0)",
    "fd_fashion-cnn": "domain FD (Fashion-MNIST CNN)",
    "swd_mean": "mean SWD of the pyramid levels",
}


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


def _table(data: dict, dfm: str, fm: str, label: str = "") -> dict[str, list[tuple[int, float]]]:
    """Print one Markdown row per metric and step; return {metric: [(step, ratio)]} over the steps both have."""
    ratios = {}
    for metric, by in data.items():
        steps = sorted(set(by.get(dfm, {})) & set(by.get(fm, {})))
        ratios[metric] = [(s, by[dfm][s] / by[fm][s]) for s in steps]
        for s, r in ratios[metric]:
            print(f"| {label + ' | ' if label else ''}{metric} | {s} | {by[dfm][s]:.1f} | {by[fm][s]:.1f} | {r:.3f} |")
    return ratios


def _pair(text: str) -> tuple[str, str, str]:
    label, sep, dirs = text.partition("=")
    parts = dirs.split(",")
    if not sep or not label or len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"--pair {text!r}: expected LABEL=DFM_DIR,FM_DIR")
    return label, parts[0], parts[1]


def _folders(side: str) -> list[str]:
    """One side of a pair: bench folders joined by +, each of which must exist."""
    dirs = side.split("+")
    missing = [d for d in dirs if not Path(d).is_dir()]
    if missing:
        raise SystemExit(f"--pair: {', '.join(missing)} is not a bench output folder (give dfm bench quality's --out)")
    return dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="*", help="results.json files of dfm bench quality, or its --out directories")
    parser.add_argument(
        "--pair",
        type=_pair,
        action="append",
        default=[],
        metavar="LABEL=DFM_DIR,FM_DIR",
        help="a DFM bench output and the Flow Matching one it is compared with (repeatable)",
    )
    parser.add_argument("--dfm", default="DFM", help="variant name of DFM (default DFM)")
    parser.add_argument("--fm", default="Flow Matching", help="variant name of Flow Matching")
    parser.add_argument("--out", help="PNG of the ratio against steps")
    parser.add_argument("--title", default="DFM / Flow Matching")
    parser.add_argument("--target", type=float, default=0.9, help="ratio drawn as a dotted line (default 0.9)")
    args = parser.parse_args()
    if bool(args.results) == bool(args.pair):
        parser.error("give either results files / directories or --pair LABEL=DFM_DIR,FM_DIR (not both)")

    series: dict[str, dict[str, list[tuple[int, float]]]] = {}  # {label: {metric: [(step, ratio)]}}
    if args.pair:
        print("| run | metric | step | DFM | Flow Matching | DFM / FM |")
        print("|---|---|---|---|---|---|")
        for label, dfm_dir, fm_dir in args.pair:
            dfm, fm = collect(_folders(dfm_dir), args.dfm, args.fm), collect(_folders(fm_dir), args.dfm, args.fm)
            data = {m: {args.dfm: dfm.get(m, {}).get(args.dfm, {}), args.fm: fm.get(m, {}).get(args.fm, {})}
                    for m in METRICS}  # fmt: skip
            series[label] = _table(data, args.dfm, args.fm, label)
            if not any(series[label].values()):
                raise SystemExit(f"--pair {label}: no step scored for both {args.dfm!r} in {dfm_dir} and "
                                 f"{args.fm!r} in {fm_dir} at guidance 1.0")  # fmt: skip
    else:
        data = collect(args.results, args.dfm, args.fm)
        if not data:
            raise SystemExit(f"no rows of {args.dfm!r} and {args.fm!r} at guidance 1.0 in {args.results}")
        print("| metric | step | DFM | Flow Matching | DFM / FM |")
        print("|---|---|---|---|---|")
        series[""] = _table(data, args.dfm, args.fm)
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        metrics = [m for m in METRICS if any(r.get(m) for r in series.values())]
        if args.pair:  # one panel per metric, one line per pair
            fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6), dpi=120, squeeze=False)
            for ax, metric in zip(axes[0], metrics, strict=True):
                for label, ratios in series.items():
                    points = ratios.get(metric, [])
                    ax.plot([s for s, _ in points], [r for _, r in points], marker="o", label=label)
                ax.set_title(f"{args.title}: {TITLES.get(metric, metric)}", fontsize=9)
            axes[0][0].legend(fontsize=7)
        else:  # one panel, one line per metric
            fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
            axes = [[ax]]
            for metric, points in series[""].items():
                ax.plot([s for s, _ in points], [r for _, r in points], marker="o", label=metric)
            ax.set_title(args.title)
            ax.legend(fontsize=8)
        for ax in axes[0]:
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.axhline(args.target, color="tab:green", lw=0.8, ls=":")
            ax.set_xlabel("optimiser steps")
            ax.set_ylabel("ratio DFM / FM (lower: DFM better)")
        fig.tight_layout()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out)
        print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
