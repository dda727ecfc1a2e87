"""The report of ``dfm bench speed``: a Markdown table of both methods, their ratio and the paper's Table 2."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dfm.bench.measure import hardware_line
from dfm.models import DiTConfig


def _shape_text(config: DiTConfig) -> str:
    return "x".join(str(v) for v in (*config.input_size, config.in_channels))


def _rows(result: dict[str, Any]) -> Iterator[tuple[str, str, str, str, str]]:
    """(quantity, FM, DFM, DFM / FM, paper) rows of the table."""
    fm, dfm, r, paper = result["methods"]["fm"], result["methods"]["dfm"], result["ratios"], result["paper_table2"]
    batch = result["settings"]["batch"]

    def fmt(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    def paper_cell(key: str, unit: str = "") -> str:
        p = paper[key]
        return f"{p['dfm']:g}{unit} / {p['fm']:g}{unit} = {p['ratio']:.4f}"

    yield ("parameters", f"{fm['params'] / 1e6:.3f}M", f"{dfm['params'] / 1e6:.3f}M", f"{r['params']:.4f}",
           paper_cell("params_m", "M"))  # fmt: skip
    yield ("forward GFLOPs / sample (GMACs)", f"{fm['forward_gflops']:.4f} ({fm['forward_gmacs']:.4f})",
           f"{dfm['forward_gflops']:.4f} ({dfm['forward_gmacs']:.4f})", f"{r['forward_flops']:.5f}",
           paper_cell("gflops") + " (GMACs)")  # fmt: skip
    for key, name, unit, scale in (("train_step", "training step", "ms", 1e3), ("sample", "sampling", "s", 1.0)):
        field = "train_step_s" if key == "train_step" else "sample_s"
        what = f"{name} (batch {batch}), median {unit} [min-max]"
        if key == "sample":
            what = f"sampling {dfm['nfe']} NFE Euler (batch {batch}), median s [min-max]"
        cells = []
        for m in (fm, dfm):
            s = m[field]
            digits = ".1f" if unit == "ms" else ".3f"
            cells.append(f"{s['median'] * scale:{digits}} [{s['min'] * scale:{digits}}-{s['max'] * scale:{digits}}]")
        paper_key = "train_step_ms" if key == "train_step" else "sample_s"
        yield (what, cells[0], cells[1], f"{r[key + '_median']:.4f}", paper_cell(paper_key, " " + unit))
        yield (f"{name}, median of per-round ratios", "", "", f"{r[key + '_per_round']:.4f}", "")
    if result["settings"]["memory"]:
        for phase in ("train", "sample"):
            values = [(m["peak_memory_mib"] or {}).get(phase) for m in (fm, dfm)]
            name = "training step" if phase == "train" else "sampling"
            yield (f"peak memory, {name} (MiB)", fmt(values[0], ".1f"), fmt(values[1], ".1f"),
                   fmt(r[f"peak_memory_{phase}"], ".4f"), "")  # fmt: skip
    if result["device"].startswith("cuda"):
        for phase in ("train", "sample"):
            name = "training" if phase == "train" else "sampling"
            ips = [m[f"{phase}_images_per_s"] for m in (fm, dfm)]
            yield (f"{name} images/s", f"{ips[0]:.1f}", f"{ips[1]:.1f}", f"{ips[1] / ips[0]:.4f}", "")
    if result["peak_tflops"] is not None:
        for phase in ("train", "sample"):
            name = "training MFU (3 x forward FLOPs)" if phase == "train" else "sampling MFU (NFE x forward FLOPs)"
            values = [m[f"{phase}_mfu"] for m in (fm, dfm)]
            yield (f"{name} vs {result['peak_tflops']:g} TFLOPS", f"{100 * values[0]:.2f}%",
                   f"{100 * values[1]:.2f}%", f"{values[1] / values[0]:.4f}", "")  # fmt: skip


def markdown_report(result: dict[str, Any]) -> str:
    """The report as Markdown: command, hardware, setup, the side-by-side table and how memory was measured."""
    s = result["settings"]
    fm, dfm = result["methods"]["fm"], result["methods"]["dfm"]
    cfg = DiTConfig.from_dict(dfm["model"])
    hw = result["hardware"]
    load = ""
    if hw.get("load_average_1min") is not None and hw.get("load_average_1min_end") is not None:
        load = f" (1-min load average {hw['load_average_1min']} at the start, {hw['load_average_1min_end']} at the end)"
    mode = "torch.compile" if s["compile"] else "eager"
    lines = [
        f"Command: `{result['command']}`" if result["command"] else "",
        f"Hardware: {hardware_line(hw)}{load}",
        f"Date: {result['date']}",
        "",
        f"Setup: `{s['model']}` backbone, input {_shape_text(cfg)} -> {dfm['tokens']} tokens for both methods; "
        f"batch {s['batch']}; {s['precision']}; {mode}; DFM = {dfm['decomposition']}. Training step = decompose + "
        f"objective draw + forward + loss + backward + grad clip + AdamW, {s['warmup']} warm-up + {s['repeats']} "
        f"interleaved rounds. Sampling: Euler, DFM steps {tuple(dfm['schedule']['steps'])} with thresholds "
        f"{tuple(dfm['schedule']['thresholds'])} vs FM {fm['nfe']} steps ({dfm['nfe']} NFE each), "
        f"{min(s['warmup'], 1)} warm-up + {s['sample_repeats']} interleaved rounds.",
        "",
        f"| | {fm['label']} | {dfm['label']} | DFM / FM | paper DFM / FM (XL/2, 512 px, H100) |",
        "|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in _rows(result)),
        "",
    ]
    if result["memory_how"]:
        lines.append(f"Peak memory: {result['memory_how']}.")
    if result["peak_tflops"] is not None:
        lines.append(f"MFU against a dense bf16 peak of {result['peak_tflops']:g} TFLOPS.")
    lines.append(
        "Ratios are DFM / FM. The median of per-round ratios pairs the two methods' timings of the same round, "
        "which cancels most of the load changes of a shared machine; the ratio of medians does not."
    )
    if not result["command"]:
        lines = lines[1:]
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``speed.json`` and ``speed.md`` into the directory ``out``; return both paths."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / "speed.json", directory / "speed.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown_report(result))
    return json_path, md_path
