"""What the bench's numbers mean on a `dfm data` set: its metrics on real images, clean and damaged.

    python benchmarks/metric_calibration.py --preset cpu-photo --num 1000 --out runs/calibration

Scores, against the same reference the bench uses (``--reference val``: the held-aside split, a fixed random draw of
its crops), sets of real images with the same count as the bench's samples: the test split as it is (the floor a
perfect model reaches with this many images from photographs it never saw), the training split, and the test split
with added Gaussian pixel noise, blurred, and downsampled then upsampled (detail removed). Prints a table, writes
``calibration.json``, ``calibration.md`` and ``calibration.png`` (one example image per row) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dfm.bench.quality import ensure_references, reference_images
from dfm.bench.variants import BENCH_PRESETS, QualitySettings
from dfm.eval import EvalConfig, SWDConfig, evaluate
from dfm.eval.images import ImageSet
from dfm.visual import image_grid


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (N, C, H, W) floats, separable, reflect padding."""
    radius = max(1, int(3 * sigma + 0.5))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(x)
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _down_up(x: torch.Tensor, factor: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    low = F.interpolate(x, scale_factor=1 / factor, mode="area")
    return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)


def conditions(test: torch.Tensor, fit: torch.Tensor) -> dict[str, torch.Tensor]:
    """Name -> uint8 (N, C, H, W) images: the test crops as they are and damaged, and the training crops."""
    x = test.float()
    rng = torch.Generator().manual_seed(0)
    out = {"test (clean)": test, "fit (training crops)": fit}
    for sigma in (4, 8, 16, 32):  # intensity levels out of 255
        out[f"noise σ={sigma}/255"] = x + sigma * torch.randn(x.shape, generator=rng)
    for sigma in (0.5, 1.0, 2.0):
        out[f"blur σ={sigma} px"] = _blur(x, sigma)
    for factor in (2, 4):
        out[f"down-up {factor}x (bicubic)"] = _down_up(x, factor)
    return {k: v.round().clamp(0, 255).to(torch.uint8) for k, v in out.items()}


def _load(npz: str, count: int) -> torch.Tensor:
    arr = np.load(npz)["arr_0"][:count]  # (N, H, W, C) uint8
    if len(arr) < count:
        raise ValueError(f"{npz} holds {len(arr)} images, fewer than --num {count}")
    return torch.from_numpy(arr).movedim(-1, 1).contiguous()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu-photo", help="a bench preset whose data set is a `dfm data` set")
    p.add_argument("--num", type=int, default=1000, help="images per set (the bench's --num-samples)")
    p.add_argument("-o", "--override", action="append", default=[], help="data override, e.g. data.dataset=...")
    p.add_argument("--out", default="runs/calibration")
    p.add_argument("--cache", default=str(Path("~/.cache/dfm/bench").expanduser()))
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = BENCH_PRESETS[args.preset]
    base = dict(preset=preset["preset"], metrics=preset["metrics"], num_samples=args.num, num_reference=None,
                overrides=(*preset.get("overrides", ()), *args.override))  # fmt: skip
    cache, out = Path(args.cache), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    val = QualitySettings(**base, reference="val")
    refs = ensure_references(cache, val, {})
    # the test and training crops, drawn as the bench draws its reference (a fixed random draw per split)
    test = _load(reference_images(cache, QualitySettings(**{**base, "num_reference": args.num}, reference="test")),
                 args.num)  # fmt: skip
    fit_settings = QualitySettings(**{**base, "num_reference": args.num}, reference="fit")
    fit = _load(reference_images(cache, fit_settings), args.num)
    config = EvalConfig(metrics=val.metrics, num_reference=args.num, download=False, progress=False,
                        swd=SWDConfig(min_resolution=8))  # fmt: skip
    rows, examples = [], []
    for name, images in conditions(test, fit).items():
        tic = time.perf_counter()
        scores = evaluate(ImageSet(images, None, {"kind": "calibration", "count": len(images)}), refs, config)["scores"]
        rows.append({"condition": name, **scores})
        examples.append(images[:4].float() / 127.5 - 1)
        swd = "  ".join(f"{k[4:]}:{v:6.1f}" for k, v in scores.items() if k.startswith("swd_") and k != "swd_mean")
        print(f"{name:24s} FD {scores['fd_efficientnet-lite0']:7.1f}  SWD mean {scores['swd_mean']:6.1f}  ({swd})"
              f"  [{time.perf_counter() - tic:.0f}s]", flush=True)  # fmt: skip
    (out / "calibration.json").write_text(json.dumps({"preset": args.preset, "num": args.num, "rows": rows},
                                                     indent=1) + "\n")  # fmt: skip
    levels = [k for k in rows[0] if k.startswith("swd_") and k != "swd_mean"]
    lines = ["| images scored | FD (EfficientNet-Lite0) | SWD mean | " + " | ".join(f"SWD {k[4:]} px" for k in levels)
             + " |", "|---|---|---|" + "---|" * len(levels)]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['condition']} | {r['fd_efficientnet-lite0']:.1f} | {r['swd_mean']:.1f} | "
                     + " | ".join(f"{r[k]:.1f}" for k in levels) + " |")  # fmt: skip
    (out / "calibration.md").write_text("\n".join(lines) + "\n")
    grid = image_grid(torch.cat(examples), nrow=4, scale=2)
    Image.fromarray(grid).save(out / "calibration.png")
    names = ", ".join(r["condition"] for r in rows)
    print(f"written to {out}/calibration.{{json,md,png}} (rows of the picture: {names})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
