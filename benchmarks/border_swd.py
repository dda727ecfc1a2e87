"""The multi-scale SWD of trained runs with and without the image border: is a change in the SWD made at the border?

    python benchmarks/border_swd.py --step 4800 --margin 8 \\
        --reference ~/.cache/dfm/bench/ref_data_fit-2fec75d7_64px_Nonef_n1000_mixed.npz \\
        "DFM=runs/photo-tune/dfm3-h192-xpred-ov" "Flow Matching=runs/photo-tune/fm-h192-xpred-ov"

Each ``LABEL=FOLDER`` is a `dfm bench quality --out` folder (its seed ``--seed`` run) or a run folder. Each run draws
``--num-samples`` images from its checkpoint ``--step`` as the bench does (EMA weights, sampling seeds 0..n-1, the
run's sampler settings), kept in ``<run>/border_swd/step_<step>_n<n>.npz`` so that a second call only scores (and
``dfm eval score`` can read them). The script prints the SWD (x 1e3, per level and mean,
:func:`dfm.eval.sliced_wasserstein_distance` with the bench's settings) of the whole images against the first n
images of ``--reference`` (the bench's own reference file reproduces its numbers), and of the same images with
``--margin`` pixels cut from every side of both sets. One thread by default, to run beside a bench lane.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from dfm.eval import SWDConfig, sliced_wasserstein_distance
from dfm.eval.images import load_images
from dfm.generate import Generator
from dfm.visual import to_uint8

sys.path.insert(0, str(Path(__file__).resolve().parent))
from token_seams import run_folder  # noqa: E402


def samples(run: Path, step: int, count: int, batch: int = 50, shift: float | None = None) -> torch.Tensor:
    """``count`` uint8 (N, C, H, W) samples of checkpoint ``step``, drawn once and kept in the run folder (an
    ADM-style .npz, as `dfm sample --npz` writes: ``dfm eval score`` reads it); ``shift``: with that
    ``sampler.shift`` instead of the run's sampler's (kept in a file of its own)."""
    tag = "" if shift is None else f"_shift{shift:g}"
    path = run / "border_swd" / f"step_{step:08d}_n{count}{tag}.npz"
    if path.is_file():
        return load_images(path).images
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    if not ckpt.is_dir():
        steps = sorted(int(c.name[5:]) for c in run.glob("checkpoints/step_*"))
        raise SystemExit(f"{run} has no checkpoint of step {step}: its steps are {steps}")
    gen = Generator.from_run(run, checkpoint=ckpt)
    seeds = list(range(count))
    labels = gen.labels(seeds)
    images = gen.generate(seeds, labels, gen.settings(guidance=1.0, shift=shift), batch_size=batch).images
    pixels = to_uint8(gen.crop(images))  # (N, H, W, C), the npz's layout
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    extra = {} if labels is None else {"labels": np.asarray(labels)}
    np.savez(tmp, arr_0=pixels, **extra)
    tmp.replace(path)
    return torch.from_numpy(pixels).movedim(-1, 1)


def cut(images: torch.Tensor, margin: int) -> torch.Tensor:
    """The images without ``margin`` pixels on every side."""
    if margin == 0:
        return images
    if 2 * margin >= min(images.shape[-2:]):
        raise SystemExit(f"--margin {margin} leaves nothing of {tuple(images.shape[-2:])} images")
    return images[..., margin:-margin, margin:-margin]


def swd_rows(fake: torch.Tensor, real: torch.Tensor, margin: int, min_resolution: int = 8) -> dict[str, dict]:
    """{"whole": scores, "inside": scores}: the SWD of the whole images and of their insides."""
    config = SWDConfig(min_resolution=min_resolution)
    return {
        "whole": sliced_wasserstein_distance(fake, real, config),
        "inside": sliced_wasserstein_distance(cut(fake, margin), cut(real, margin), config),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=FOLDER", help="a dfm bench quality --out folder or a run folder")
    p.add_argument("--step", type=int, required=True, help="the checkpoint's training step")
    p.add_argument("--reference", required=True, help="real images (.npz, folder): the first --num-samples are used")
    p.add_argument("--margin", type=int, default=8, help="pixels cut from every side for the inside's SWD (default 8)")
    p.add_argument("--seed", type=int, default=0, help="which seed's run of a bench folder (default 0)")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shift", type=float, help="sample with this sampler.shift (SD3's time shift of the grid)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    real = load_images(args.reference).images[: args.num_samples]
    if len(real) < args.num_samples:
        raise SystemExit(f"{args.reference} holds {len(real)} images, fewer than --num-samples {args.num_samples}")
    print(f"SWD x 1e3 at step {args.step}, {args.num_samples} samples; inside = {args.margin} px cut from every side")
    for spec in args.runs:
        label, sep, folder = spec.partition("=")
        if not sep:
            raise SystemExit(f"{spec!r}: write LABEL=FOLDER")
        fake = samples(run_folder(Path(folder), args.seed), args.step, args.num_samples, shift=args.shift)
        for part, scores in swd_rows(fake, real, args.margin).items():
            levels = "  ".join(f"{k[4:]}: {v:6.1f}" for k, v in scores.items())
            print(f"{label:24s} {part:6s} {levels}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
