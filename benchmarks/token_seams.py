"""Token seams of trained runs: how much sharper their samples' edges are on the model's token grid (a mosaic).

    python benchmarks/token_seams.py --reference data/photos/64/fit \\
        "DFM=runs/photo-tune/dfm-h192-xpred" "Flow Matching=runs/photo-tune/fm-h192-xpred" ...

Each ``LABEL=FOLDER`` is a `dfm bench quality --out` folder (its seed ``--seed`` run) or a run folder. Each run draws
``--num-samples`` images with its own sampler settings (sampling seeds 0..n-1, EMA weights) and the script prints
:func:`dfm.eval.seam_ratio` at the period of the model's tokens in the final image (the last stage's patch size),
and for a multi-stage run also its first stage's preview at that stage's token period.

``--forced FOLDER`` asks where the seams are made: it starts the sampling from real images of FOLDER instead of
noise, part of the way along, and measures what the network adds from there (Heun, 10 steps, ``--forced-seed``):
Flow Matching from ``x_a = a X + (1 - a) n`` at each signal level a of ``--signals``, Pyramidal Flow's last stage
from its training start point ``s Up(X_coarse) + (1 - s) n`` (its coarse stage left out). Other methods: not
measured. The reference row is the
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
from dfm.sampling import ode_step


def run_folder(folder: Path, seed: int) -> Path:
    """``folder`` itself when it is a run, else the seed's run of a bench --out folder."""
    if (folder / "config.json").is_file():
        return folder
    runs = sorted(folder.glob(f"runs/*-s{seed}"))
    if len(runs) != 1:
        raise FileNotFoundError(f"{folder} is neither a run nor a bench folder with one run of seed {seed}")
    return runs[0]


def load_spread(spec: str, count: int) -> torch.Tensor:
    """At most ``count`` images spread over a set (:meth:`~dfm.eval.images.ImageSet.spread`), in [-1, 1]."""
    return load_images(spec).spread(count).images.float() / 127.5 - 1


def token_periods(gen: Generator) -> list[int]:
    """Pixels per token side at each stage's own resolution."""
    cfg = getattr(gen.network, "config", None)
    if cfg is None or not hasattr(cfg, "stage_patch_size"):
        raise ValueError("the run's network does not say its patch size (a DFMDiT does)")
    return [int(cfg.stage_patch_size(s)) for s in range(gen.stages)]


@torch.no_grad()
def forced(gen: Generator, real: torch.Tensor, signals: list[float], seed: int, period: int, steps: int = 10
           ) -> list[tuple]:  # fmt: skip
    """(start, seam ratio) of samplings started from ``real`` (in [-1, 1]) part of the way (see the module doc)."""
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(seed))
    b, method = len(real), gen.config.method.name

    def integrate(velocity, x, t0: float, t1: float) -> torch.Tensor:
        grid = torch.linspace(t0, t1, steps + 1).tolist()
        for i in range(steps):
            (x,), _ = ode_step(velocity, [x], grid[i], grid[i + 1], [grid[i + 1] - grid[i]], "heun",
                               ends_clean=i == steps - 1 and t1 >= 1.0)  # fmt: skip
        return x

    if method == "fm":
        velocity = lambda xs, t: gen.model(xs, torch.full((b, 1), float(t)), None, None)  # noqa: E731
        return [(f"signal {a:g}", seam_ratio(integrate(velocity, a * real + (1 - a) * noise, a, 1.0), period))
                for a in signals]  # fmt: skip
    if method == "pyramidal":
        path = gen.sampler.path
        levels = path.decomposition.decompose(real)
        last = len(levels) - 1
        start, _ = path.endpoints(levels, last, noise)
        zeros = [torch.zeros_like(lv) for lv in levels[:-1]]
        times, stage = torch.zeros(b, len(levels)), torch.full((b,), last, dtype=torch.long)

        def velocity(xs, tau):
            lo, hi = path.window(last)
            times[:, last] = lo + tau * (hi - lo)
            return [gen.model([*zeros, xs[0]], times, None, stage)[last]]  # a velocity in the local time τ

        end = integrate(velocity, start, 0.0, 1.0)
        return [(f"last stage from s = {path.start_coef(last):.3f}", seam_ratio(end, period))]
    return []


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("panels", nargs="+", metavar="LABEL=FOLDER")
    p.add_argument("--reference", help="real images (a folder of PNGs, .npz or fashion-mnist) for the reference row")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="training seed of the run to use (bench folders)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--forced", metavar="FOLDER", help="also start from real images of FOLDER part of the way")
    p.add_argument("--signals", default="0.333,0.9,0.97", help="signal levels a of the forced starts (Flow Matching)")
    p.add_argument("--forced-seed", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows, forced_rows = [], []
    starts = load_spread(args.forced, args.num_samples) if args.forced else None
    if args.reference:
        real = load_spread(args.reference, 2048)
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
        if starts is not None:
            signals = [float(v) for v in args.signals.split(",")]
            forced_rows += [(label, *row) for row in forced(gen, starts, signals, args.forced_seed, periods[-1])]
    print("| run | resolution | token period per stage | seam ratio, final | seam ratio, first stage's preview |")
    print("|---|---|---|---|---|")
    for label, res, periods, final, first in rows:
        shown = "8 (as the models')" if periods is None else ", ".join(map(str, periods))
        print(f"| {label} | {res} | {shown} | {final:.2f} | {'' if first is None else f'{first:.2f}'} |")
    if forced_rows:
        print(f"\nStarted from {len(starts)} real images of {args.forced}:\n")
        print("| run | start | seam ratio, final |\n|---|---|---|")
        for label, start, ratio in forced_rows:
            print(f"| {label} | {start} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
