"""Side-by-side sample sheets of bench runs: the grid each run saved at one step, under its label.

    python benchmarks/photo_pictures.py --step 1600 --out docs/images/photo64_samples.png \\
        "Flow Matching, preset=runs/photo-tune/fm-h128" "DFM, preset=runs/photo-tune/dfm-h128"

Each ``LABEL=FOLDER`` names a `dfm bench quality --out` folder (its seed-0 run) or a run folder; the panel is that
run's ``samples/step_<step>.png`` (the EMA model's images from the same sampling seeds in every run, so runs of one
method start from the same noise). ``--rows`` keeps the first rows of each grid. ``LABEL=FOLDER@STEP`` shows that
panel at its own step (budgets side by side; ``--step`` is then the default of the others). ``--draw`` draws a
grid the run did not save (a bench run saves one at its last step only) from its checkpoint at that step, with the
trainer's seeds, sampler and precision, into the run's ``samples/`` where the trainer would have put it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dfm.visual import save_png


def sheet(folder: Path, step: int, seed: int, draw: bool = False) -> Path:
    """The sample grid of ``folder`` (a bench --out folder or one run) at ``step``; with ``draw``, drawn from the
    run's checkpoint at ``step`` when the run did not save it."""
    runs = [folder, *sorted(folder.glob(f"runs/*-s{seed}"))]
    for run in runs:
        path = run / "samples" / f"step_{step:08d}.png"
        if path.is_file():
            return path
    checkpoint = f"checkpoints/step_{step:08d}"
    saved = next((run for run in runs if (run / checkpoint).is_dir()), None)  # the run that can draw it
    if draw and saved is not None:
        return drawn(saved, saved / checkpoint, step)
    hint = f" (--draw draws it from {checkpoint})" if saved is not None else ""
    raise FileNotFoundError(f"no samples/step_{step:08d}.png of seed {seed} under {folder}{hint}: is the run finished?")


def drawn(run: Path, checkpoint: Path, step: int) -> Path:
    """The grid the trainer would have saved at ``step``: its EMA weights there, seeds 0..n-1, the run's sampler."""
    from dfm.generate import Generator, write_sample_grid

    generator = Generator.from_run(run, checkpoint=checkpoint)
    train = generator.config.train
    print(f"drawing {run}/samples/step_{step:08d}.png from {checkpoint}", file=sys.stderr)
    return write_sample_grid(generator, run / "samples", step, train.num_sample_images, precision=train.precision)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("panels", nargs="+", metavar="LABEL=FOLDER")
    p.add_argument("--step", type=int, help="the step of every panel without its own @STEP")
    p.add_argument("--seed", type=int, default=0, help="training seed of the run to show (bench folders)")
    p.add_argument("--rows", type=int, default=3, help="rows of each run's grid to keep")
    p.add_argument("--cell", type=int, default=66, help="pixel pitch of the saved grids (image + gap)")
    p.add_argument("--wrap", type=int, default=0, help="panels per row (default: all in one row)")
    p.add_argument("--out", required=True)
    p.add_argument("--draw", action="store_true", help="draw a grid a run did not save from its checkpoint there")
    args = p.parse_args()
    panels = []
    for item in args.panels:
        label, sep, folder = item.rpartition("=")
        if not sep or not label:
            p.error(f"{item!r}: give LABEL=FOLDER")
        step = args.step
        base, at, own = folder.rpartition("@")
        if at and own.isdigit():
            folder, step = base, int(own)
        if step is None:
            p.error(f"{item!r}: give the panel's step (LABEL=FOLDER@STEP) or --step")
        try:
            grid = Image.open(sheet(Path(folder), step, args.seed, args.draw)).convert("RGB")
        except (FileNotFoundError, ValueError) as e:  # no grid; a checkpoint that does not fit its run
            p.error(str(e))
        keep = min(grid.height, args.rows * args.cell)
        panels.append((label, grid.crop((0, 0, grid.width, keep))))
    pad, text_h = 10, 16
    per_row = args.wrap or len(panels)
    cell_w = max(g.width for _, g in panels) + pad
    cell_h = max(g.height for _, g in panels) + text_h + pad
    rows = -(-len(panels) // per_row)
    out = Image.new("RGB", (cell_w * min(per_row, len(panels)) + pad, cell_h * rows + pad), "white")
    draw = ImageDraw.Draw(out)
    for k, (label, grid) in enumerate(panels):
        x, y = pad + (k % per_row) * cell_w, pad // 2 + (k // per_row) * cell_h
        draw.text((x, y), label, fill="black")
        out.paste(grid, (x, y + text_h))
    width, height = out.size
    save_png(np.asarray(out), args.out)  # atomic: a half-written picture never replaces the last one
    print(f"written {args.out} ({width}x{height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
