"""The report of ``dfm bench quality``: a Markdown table (mean ± sample std over seeds) and plots against training
steps and guidance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dfm.bench.variants import HEADLINE, QualitySettings


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _fmt(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    m, s = _mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def summarize(rows: list[dict], settings: QualitySettings, runs: dict[str, dict]) -> dict[str, Any]:
    final = settings.steps
    prefixes = ("fd_", "swd_", "sigma_", "class_accuracy", "temporal_change_gap")
    metric_keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith(prefixes)))
    table = []
    for variant in settings.variants:
        for g in settings.guidance:
            sel = [r for r in rows if r["variant"] == variant.name and r["step"] == final and r["guidance"] == g]
            table.append({"variant": variant.name, "guidance": g, "n": len(sel),
                          **{k: [r[k] for r in sel if k in r] for k in metric_keys}})  # fmt: skip
    return {"table": table, "metric_keys": metric_keys, "runs": runs}


def markdown(
    summary: dict[str, Any], settings: QualitySettings, command: str, hardware: str, overrides: list[str]
) -> str:
    keys = summary["metric_keys"]
    lines = [f"Command: `{command}`", f"Hardware: {hardware}", "",
             f"Training: preset `{settings.preset}` + {overrides or 'no overrides'}, "
             f"{settings.steps} optimiser steps per run, seeds {list(settings.seeds)}; "
             f"{settings.num_samples} samples per evaluation (classes = seed mod the class count), reference: "
             + {"test": "the test split of the preset's data",
                "val": "the held-aside images (Fashion-MNIST: 5,000 of its training images; a dfm data set: its val "
                       "split), which training left out",
                "fit": "a fixed random draw of the training split (the dfm data set's fit crops)"}[settings.reference]
             + f" ({settings.num_reference or 'all'} images or clips).",
             "", "| variant | guidance | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]  # fmt: skip
    for row in summary["table"]:
        cells = [_fmt(row[k], 3 if k.startswith(("class_accuracy", "temporal")) else 1) for k in keys]
        lines.append(f"| {row['variant']} | {row['guidance']} | " + " | ".join(cells) + " |")
    lines += ["", "| run | method | train wall time (s) | training FLOPs |", "|---|---|---|---|"]
    for name, info in summary["runs"].items():
        lines.append(f"| {name} | {info['method']} | {info['train_seconds']:.0f} | {info['train_flops']:.3g} |")
    lines.append("")
    lines.append(
        "Mean ± sample standard deviation over seeds. Lower is better except class_accuracy, and sigma_<res> "
        "(the spread of a level of the samples), which is best at sigma_<res>_ref (the reference's)."
    )
    return "\n".join(lines) + "\n"


def headline_metric(rows: list[dict]) -> str:
    """The first Fréchet distance of the rows (``fd_efficientnet-lite0``, or its per-frame twin for videos)."""
    keys = [k for k in rows[0] if k.startswith("fd_")] if rows else []
    return HEADLINE if HEADLINE in keys or not keys else keys[0]


def plot(rows: list[dict], settings: QualitySettings, out: Path, metric: str = HEADLINE) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for kind in ("steps", "guidance"):
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
        for variant in settings.variants:
            xs, ms, ss = [], [], []
            points = settings.eval_steps if kind == "steps" else settings.guidance
            for p in points:
                sel = [r[metric] for r in rows if r["variant"] == variant.name and metric in r and (
                    (r["step"] == p and r["guidance"] == 1.0) if kind == "steps"
                    else (r["step"] == settings.steps and r["guidance"] == p))]  # fmt: skip
                if sel:
                    m, s = _mean_std(sel)
                    xs.append(p)
                    ms.append(m)
                    ss.append(s)
            if xs:
                ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=variant.name)
        ax.set_xlabel("training steps" if kind == "steps" else "classifier-free guidance")
        ax.set_ylabel(metric)
        ax.set_title("quality vs training steps (guidance 1.0)" if kind == "steps" else "quality vs guidance (final)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{metric.replace(':', '_')}_vs_{kind}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
