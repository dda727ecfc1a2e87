"""Where DFM's settings land against the target on both metrics at once: the FD ratio against the mean-SWD ratio.

    python benchmarks/plot_tradeoff.py --base runs/photo-tune/fm-h192-xpred-ov --step 3200 --target 0.8 \
        --out docs/images/photo64_tradeoff.png "as run=runs/photo-tune/dfm3-h192-xpred-ov" \
        "tau 0.8 / 0.9=runs/photo-sampler/dfm3-h192-xpred-ov-t8090" ...

Every point is a bench folder (``LABEL=DIR``, or ``LABEL=DIR@STEP`` for another step than ``--step``; a ``+`` joins
folders, e.g. the two seeds' folders of the 128 px runs), scored against the baseline's folders (``--base``, ``+``
joins likewise) seed by seed: the ratio of the ImageNet-feature FD and of the mean SWD to the baseline's *same seed*
at the same step, then the mean over the seeds both scored. Prints a Markdown table (per-seed ratios, and whether
every seed has both at or below the target) and plots the seeds' means as labelled points, each seed as a small dot,
with the target's corner shaded (below 1 on both axes DFM is better).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FD, SWD = "fd_efficientnet-lite0", "swd_mean"


def scores(spec: str) -> dict[tuple[int, int], dict]:
    """{(seed, step): score row} at guidance 1.0 of every ``scores/*.json`` in the ``+``-joined folders."""
    out = {}
    for folder in spec.split("+"):
        files = sorted(Path(folder).glob("scores/*.json"))
        if not files:
            raise SystemExit(f"no scores in {folder}/scores: give a folder `dfm bench quality` wrote")
        for file in files:
            row = json.loads(file.read_text())
            if row.get("guidance", 1.0) == 1.0 and FD in row and SWD in row:
                out[(row["seed"], row["step"])] = row
    return out


def ratios(point: dict, base: dict, step: int) -> dict[int, tuple[float, float]]:
    """{seed: (FD ratio, SWD ratio)} for every seed both scored at ``step``."""
    seeds = sorted(s for s, st in point if st == step and (s, step) in base)
    return {s: (point[s, step][FD] / base[s, step][FD], point[s, step][SWD] / base[s, step][SWD]) for s in seeds}


def parse_point(text: str, step: int) -> tuple[str, str, int]:
    label, sep, rest = text.partition("=")
    if not sep or not label or not rest:
        raise SystemExit(f"point {text!r}: expected LABEL=DIR or LABEL=DIR@STEP")
    folder, at, own = rest.partition("@")
    if at and not own.isdigit():
        raise SystemExit(f"point {text!r}: the step after @ must be a whole number")
    return label, folder, int(own) if at else step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("points", nargs="+", help="LABEL=DIR[+DIR][@STEP]")
    ap.add_argument("--base", required=True, help="the baseline's bench folder(s), + joined")
    ap.add_argument("--step", type=int, required=True, help="the step every point is scored at, unless it says @STEP")
    ap.add_argument("--target", type=float, default=0.8, help="the ratio both metrics aim for (default 0.8)")
    ap.add_argument("--title", default="DFM / Flow Matching: FD ratio against mean-SWD ratio")
    ap.add_argument("--out", help="the plot (PNG); without it only the table is printed")
    args = ap.parse_args()
    base = scores(args.base)
    table = []
    for text in args.points:
        label, folder, step = parse_point(text, args.step)
        per_seed = ratios(scores(folder), base, step)
        if not per_seed:
            raise SystemExit(f"{label}: no seed scored at step {step} by both {folder} and the base {args.base}")
        table.append((label, step, per_seed))
    print("| setting | step | seeds | FD / base | SWD / base | both <= target on every seed |")
    print("|---|---|---|---|---|---|")
    for label, step, per_seed in table:
        fd = " / ".join(f"{r[0]:.3f}" for r in per_seed.values())
        swd = " / ".join(f"{r[1]:.3f}" for r in per_seed.values())
        met = all(max(r) <= args.target for r in per_seed.values())
        print(f"| {label} | {step} | {','.join(map(str, per_seed))} | {fd} | {swd} | {'yes' if met else 'no'} |")
    if args.out:
        plot(table, args.target, args.title, Path(args.out))
    return 0


def plot(table: list, target: float, title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 5.4), dpi=110)
    xs = [r[0] for _, _, per in table for r in per.values()]
    ys = [r[1] for _, _, per in table for r in per.values()]
    lo_x, hi_x = min(xs + [target]) - 0.03, max(xs + [1.0]) + 0.03
    lo_y, hi_y = min(ys + [target]) - 0.05, max(ys + [1.0]) + 0.08
    ax.fill_between([lo_x, target], lo_y, target, color="tab:green", alpha=0.12, label=f"target: both <= {target}")
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, _, per) in enumerate(table):
        c, m = colors[i % len(colors)], "os^D"[i // len(colors) % 4]  # a new marker each time the colours repeat
        px, py = [r[0] for r in per.values()], [r[1] for r in per.values()]
        ax.scatter(px, py, s=12, color=c, marker=m, alpha=0.5)
        mx, my = sum(px) / len(px), sum(py) / len(py)
        ax.scatter([mx], [my], s=60, color=c, marker=m, edgecolor="black", zorder=3)
        ax.annotate(label, (mx, my), xytext=(6, 4), textcoords="offset points", fontsize=8)
    ax.set(xlim=(lo_x, hi_x), ylim=(lo_y, hi_y), title=title, xlabel="ImageNet-feature FD / baseline's (same seed)",
           ylabel="mean SWD / baseline's (same seed)")  # fmt: skip
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(out)
    print(f"plot: {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
