"""How much busier a model's samples are along the image border than inside: the border contrast.

    python benchmarks/border_contrast.py --step 1600 --res 128 --real data/photos/128/fit \\
        "Flow Matching=runs/photo-tune/p128p8-fm" "Flow Matching, overlapping head=runs/photo-tune/p128p8-ov-fm"

For each run, the sample grid it saved at ``--step`` (its seed-0 run's ``samples/step_<step>.png``, cut into its ``res``
x ``res`` images), and for ``--real`` 500 images spread over a set (`dfm.eval.images.load_images`): the mean absolute
difference between horizontal neighbours in the ``--strip`` outermost rows at the top and bottom, divided by the same
mean over the rows at least twice as far in. Real crops score a little below 1 (borders of random crops are no busier
than their middles); an output head that leaves its border pixels to one token's window scores well above it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dfm.eval.images import load_images

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photo_pictures import sheet  # noqa: E402


def grid_images(path: Path, res: int) -> list[np.ndarray]:
    """The ``res`` x ``res`` images of a sample grid (cells separated by a constant padding, found from its width)."""
    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    height, width, _ = a.shape
    pad = next((p for p in range(6) if (width - p) % (res + p) == 0 and (height - p) % (res + p) == 0), None)
    if pad is None:
        raise SystemExit(f"{path} ({width}x{height}) is not a grid of {res} px images: give the run's --res")
    rows, cols = (height - pad) // (res + pad), (width - pad) // (res + pad)
    return [
        a[pad + r * (res + pad) :][:res, pad + c * (res + pad) :][:, :res] for r in range(rows) for c in range(cols)
    ]


def border_contrast(images: list[np.ndarray], strip: int = 4) -> float:
    """Mean |x[i, j+1] - x[i, j]| over the ``strip`` outermost rows at the top and bottom, over that of the rows at
    least ``2 strip`` in."""
    border, inner = [], []
    for im in images:
        if im.shape[0] <= 4 * strip:
            raise SystemExit(f"images of {im.shape[0]} px are too small for a border strip of {strip}")
        d = np.abs(np.diff(im, axis=1)).mean(-1)
        border.append(np.concatenate([d[:strip], d[-strip:]]).mean())
        inner.append(d[2 * strip : -2 * strip].mean())
    return float(np.mean(border) / np.mean(inner))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", metavar="LABEL=FOLDER", help="a dfm bench quality --out folder or a run folder")
    p.add_argument("--step", type=int, required=True, help="the saved sample grid's training step")
    p.add_argument("--res", type=int, required=True, help="the images' size in pixels")
    p.add_argument("--real", help="real images of that size (a folder of PNGs, .npz; 500 spread over the set)")
    p.add_argument("--strip", type=int, default=4, help="border rows scored (default 4: half an 8 px patch)")
    args = p.parse_args(argv)
    if not args.runs and args.real is None:
        p.error("give LABEL=FOLDER runs and/or --real DIR")
    print("| images | border contrast |\n|---|---|")
    if args.real is not None:
        try:
            real = load_images(args.real).spread(500).images  # (N, C, H, W) uint8
        except ValueError as err:
            raise SystemExit(f"--real {args.real}: {err}") from None
        real = list(real.permute(0, 2, 3, 1).double().numpy())
        print(f"| real ({args.real}) | {border_contrast(real, args.strip):.2f} |")
    for spec in args.runs:
        label, sep, folder = spec.partition("=")
        if not sep:
            raise SystemExit(f"{spec!r}: expected LABEL=FOLDER")
        try:
            path = sheet(Path(folder), args.step, 0)
        except FileNotFoundError as err:
            raise SystemExit(str(err)) from None
        images = grid_images(path, args.res)
        print(f"| {label} | {border_contrast(images, args.strip):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
