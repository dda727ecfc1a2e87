"""DFM against Flow Matching along training, from sampler sweeps (``benchmarks/sampler_sweep.sh``) at several steps.

Each sweep directory holds one folder per sampler setting with ``sampling.json`` (which checkpoint was sampled)
and ``fd_<reference>.json``. A pair ``LABEL=DFM_SETTING/FM_SETTING`` is one line: the ratio of the two settings'
Fréchet distances at every sweep's training step. Prints a Markdown table and plots one panel per distance.

Run: ``python benchmarks/plot_sweep_ratio.py runs/study/sampler64-* --pair "Heun=dfm-heun-15-5/fm-heun-20"
--pair "Euler=dfm-30-10/fm-40" --reference fashion-mnist-test --out docs/images/ratio.png``
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

METRICS = ("fd_efficientnet-lite0", "fd_fashion-cnn")
TITLES = {"fd_efficientnet-lite0": "ImageNet-feature FD (EfficientNet-Lite0)", "fd_fashion-cnn": "domain FD"}


def _step(setting_dir: Path) -> int:
    checkpoint = json.loads((setting_dir / "sampling.json").read_text()).get("checkpoint") or ""
    match = re.search(r"step_(\d+)$", checkpoint.rstrip("/"))
    if not match:
        raise SystemExit(f"{setting_dir}/sampling.json names no step_N checkpoint: sample with an explicit step")
    return int(match.group(1))


def collect(sweeps: list[str], pairs: list[tuple[str, str, str]], reference: str) -> dict:
    """{label: {step: {metric: DFM / FM}}} over the sweeps holding both settings of a pair (others skipped)."""
    out: dict = {label: {} for label, _, _ in pairs}
    for sweep in map(Path, sweeps):
        for label, dfm, fm in pairs:
            files = [sweep / name / f"fd_{reference}.json" for name in (dfm, fm)]
            if not all(f.is_file() for f in files):
                continue
            steps = {_step(sweep / dfm), _step(sweep / fm)}
            if len(steps) != 1:
                raise SystemExit(f"{sweep}: {dfm} and {fm} sampled different steps {sorted(steps)}")
            a, b = (json.loads(f.read_text())["scores"] for f in files)
            out[label][steps.pop()] = {m: a[m] / b[m] for m in METRICS if m in a and m in b}
    return out


def table(ratios: dict) -> str:
    lines = ["| pair | step | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for label, by_step in ratios.items():
        for step in sorted(by_step):
            cells = [f"{by_step[step][m]:.3f}" if m in by_step[step] else "-" for m in METRICS]
            lines.append(f"| {label} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(ratios: dict, out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5.2 * len(METRICS), 3.8), sharey=True)
    for ax, metric in zip(axes, METRICS):
        for label, by_step in ratios.items():
            steps = [s for s in sorted(by_step) if metric in by_step[s]]
            ax.plot(steps, [by_step[s][metric] for s in steps], marker="o", label=label)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(0.9, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("training steps")
        ax.set_title(TITLES[metric], fontsize=10)
    axes[0].set_ylabel("DFM / Flow Matching (below 1: DFM better)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", nargs="+", help="sweep directories (one per training step)")
    p.add_argument("--pair", action="append", required=True, help="LABEL=DFM_SETTING/FM_SETTING (repeatable)")
    p.add_argument("--reference", default="fashion-mnist-test", help="the fd_<reference>.json to read")
    p.add_argument("--title", default="", help="figure title")
    p.add_argument("--out", default=None, help="PNG to write (default: print the table only)")
    args = p.parse_args(argv)
    pairs = []
    for text in args.pair:
        label, _, rest = text.partition("=")
        dfm, _, fm = rest.partition("/")
        if not (label and dfm and fm):
            p.error(f"--pair {text!r}: give LABEL=DFM_SETTING/FM_SETTING, e.g. Heun=dfm-heun-15-5/fm-heun-20")
        pairs.append((label, dfm, fm))
    ratios = collect(args.sweeps, pairs, args.reference)
    if not any(ratios.values()):
        p.error(f"no sweep holds both settings of any pair with fd_{args.reference}.json")
    print(table(ratios))
    if args.out:
        plot(ratios, args.out, args.title)
        print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
