"""Token seams of trained runs: how much sharper their samples' edges are on the model's token grid (a mosaic).

    python benchmarks/token_seams.py --reference data/photos/64/fit \\
        "DFM=runs/photo-tune/dfm-h192-xpred" "Flow Matching=runs/photo-tune/fm-h192-xpred" ...

Each ``LABEL=FOLDER`` is a `dfm bench quality --out` folder (its seed ``--seed`` run) or a run folder. Each run draws
``--num-samples`` images with its own sampler settings (sampling seeds 0..n-1, EMA weights) and the script prints
:func:`dfm.eval.seam_ratio` at the period of the model's tokens in the final image (the last stage's patch size),
and for a multi-stage run also its first stage's preview at that stage's token period. The reference row is the
same ratio on up to 2,048 real images spread over the set (1 for pictures without a grid). One thread by
default, to run beside a bench lane.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dfm.eval import seam_ratio
from dfm.eval.images import load_images
from dfm.generate import Generator


def run_folder(folder: Path, seed: int) -> Path:
    """``folder`` itself when it is a run, else the seed's run of a bench --out folder."""
    if (folder / "config.json").is_file():
        return folder
    runs = sorted(folder.glob(f"runs/*-s{seed}"))
    if len(runs) != 1:
        raise FileNotFoundError(f"{folder} is neither a run nor a bench folder with one run of seed {seed}")
    return runs[0]


def token_periods(gen: Generator) -> list[int]:
    """Pixels per token side at each stage's own resolution."""
    cfg = getattr(gen.network, "config", None)
    if cfg is None or not hasattr(cfg, "stage_patch_size"):
        raise ValueError("the run's network does not say its patch size (a DFMDiT does)")
    return [int(cfg.stage_patch_size(s)) for s in range(gen.stages)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("panels", nargs="+", metavar="LABEL=FOLDER")
    p.add_argument("--reference", help="real images (a folder of PNGs, .npz or fashion-mnist) for the reference row")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="training seed of the run to use (bench folders)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    if args.reference:
        real = load_images(args.reference).images
        real = real[torch.linspace(0, len(real) - 1, min(len(real), 2048)).long()].float() / 127.5 - 1  # spread out
        rows.append(("real images", real.shape[-1], None, seam_ratio(real, 8), None))
    for item in args.panels:
        label, sep, folder = item.rpartition("=")
        if not sep or not label:
            p.error(f"{item!r}: give LABEL=FOLDER")
        try:
            gen = Generator.from_run(run_folder(Path(folder), args.seed))
            periods = token_periods(gen)
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
        out = gen.generate(range(args.num_samples), progress=True)
        images = gen.crop(out.images)
        first = seam_ratio(out.previews[0], periods[0]) if gen.stages > 1 else None
        rows.append((label, images.shape[-1], periods, seam_ratio(images, periods[-1]), first))
    print("| run | resolution | token period per stage | seam ratio, final | seam ratio, first stage's preview |")
    print("|---|---|---|---|---|")
    for label, res, periods, final, first in rows:
        shown = "8 (as the models')" if periods is None else ", ".join(map(str, periods))
        print(f"| {label} | {res} | {shown} | {final:.2f} | {'' if first is None else f'{first:.2f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
