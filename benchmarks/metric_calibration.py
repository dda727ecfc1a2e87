"""What the bench's numbers mean on a `dfm data` set: its metrics on real images, clean and damaged.

    python benchmarks/metric_calibration.py --preset cpu-photo --reference fit --num 1000 --out runs/calibration

Scores real images against the reference the bench uses (``--reference``, a fixed random draw of that split's
crops), as many as the bench's samples. ``--reference fit`` (a draw of the training crops): other crops of the
training photographs (the floor a model reaches that draws from the training distribution), the same with added
Gaussian pixel noise, blurred, downsampled then upsampled (detail removed), and as a mosaic (a random offset per
8x8 tile and channel: the token seams of a patch-8 model), and the held-out splits (photographs never seen).
``--reference val``: the test split as it is and damaged, and training crops. Prints a table, writes
``calibration.json``, ``calibration.md`` and ``calibration.png`` (one labelled column per set, its first three images)
under ``--out``; ``--picture-only`` draws the picture alone (the sets are deterministic), without scoring; ``--only
TEXT`` scores only the sets whose name holds TEXT (and the clean one). Every set also gets its token-seam ratio on
the 8-pixel grid (:func:`dfm.eval.seam_ratio`, no network).
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
from PIL import Image, ImageDraw

from dfm.bench.quality import draw_order, ensure_references, split_folder
from dfm.bench.variants import BENCH_PRESETS, QualitySettings
from dfm.checkpoint import atomic_write_text
from dfm.data import build_dataset
from dfm.eval import EvalConfig, SWDConfig, evaluate, seam_ratio
from dfm.eval.images import ImageSet
from dfm.presets import get_preset
from dfm.resolve import apply_overrides
from dfm.visual import save_png


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


def conditions(base: torch.Tensor, name: str, others: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Name -> uint8 (N, C, H, W) images: ``base`` as it is and damaged, then ``others`` as they are."""
    x = base.float()
    rng = torch.Generator().manual_seed(0)
    out = {name: base}
    for sigma in (4, 8, 16, 32):  # intensity levels out of 255
        out[f"noise σ={sigma}/255"] = x + sigma * torch.randn(x.shape, generator=rng)
    for sigma in (0.5, 1.0, 2.0):
        out[f"blur σ={sigma} px"] = _blur(x, sigma)
    for factor in (2, 4):
        out[f"down-up {factor}x (bicubic)"] = _down_up(x, factor)
    for sigma in (4, 8, 16):  # a mosaic: one offset per 8x8 tile and channel, as a patch-8 model's seams
        n, c, h, w = x.shape
        offsets = sigma * torch.randn((n, c, h // 8, w // 8), generator=rng)
        out[f"tiles σ={sigma}/255"] = x + offsets.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    out = {k: v.round().clamp(0, 255).to(torch.uint8) for k, v in out.items()}
    return {**out, **others}


def _short(name: str) -> str:
    """A column label: "noise σ=8/255" -> "noise 8", "down-up 2x (bicubic)" -> "down-up 2x", "val (...)" -> "val"."""
    name = name.split(" (")[0].replace("σ=", "").replace("/255", "").replace(" px", "")
    return name.split(",")[0]


def picture(sets: dict[str, torch.Tensor], path: Path, rows: int = 3) -> None:
    """One column per set (its first ``rows`` images, 1:1), the set's short name above it."""
    names = list(sets)
    size = next(iter(sets.values())).shape[-1]
    pitch, top = size + 4, 14
    canvas = Image.new("RGB", (pitch * len(names) + 4, top + pitch * rows + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        x = 4 + j * pitch
        draw.text((x, 1), _short(name), fill="black")
        for i, image in enumerate(sets[name][:rows]):
            canvas.paste(Image.fromarray(image.permute(1, 2, 0).numpy()), (x, top + 4 + i * pitch))
    save_png(np.asarray(canvas), path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu-photo", help="a bench preset whose data set is a `dfm data` set")
    p.add_argument("--num", type=int, default=1000, help="images per set (the bench's --num-samples)")
    p.add_argument("--reference", choices=["fit", "val"], default="fit", help="the bench's --reference")
    p.add_argument("-o", "--override", action="append", default=[], help="data override, e.g. data.dataset=...")
    p.add_argument("--out", default="runs/calibration")
    p.add_argument("--cache", default=str(Path("~/.cache/dfm/bench").expanduser()))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--picture-only", action="store_true", help="write calibration.png alone (no scoring)")
    p.add_argument("--only", help="score only the sets whose name holds this text (and the clean one), e.g. tiles")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = BENCH_PRESETS[args.preset]
    base = dict(preset=preset["preset"], metrics=preset["metrics"], num_samples=args.num, num_reference=None,
                overrides=(*preset.get("overrides", ()), *args.override))  # fmt: skip
    cache, out = Path(args.cache), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = QualitySettings(**base, reference=args.reference)

    data = apply_overrides(get_preset(settings.preset), list(settings.overrides)).data
    folder = split_folder(data.dataset)
    if folder is None:
        raise ValueError("calibration needs a data set built with splits (dfm data): give -o data.dataset=.../fit")

    def split(name: str, offset: int = 0) -> torch.Tensor:  # a draw of a split, as the bench draws its reference
        ds = build_dataset(str(folder / name), resolution=data.resolution, train=False)
        order = draw_order(len(ds))[offset : offset + args.num]
        if len(order) < args.num:
            raise ValueError(f"the {name} split holds {len(ds)} images: too few for --num {args.num} (offset {offset})")
        x, _ = ds.get_batch(order, augment=False)
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    if args.reference == "fit":  # other crops of the training photographs: after the reference's in the same draw
        sets = conditions(
            split("fit", offset=args.num),
            "fit, other crops (clean)",
            {"val (unseen photographs)": split("val"), "test (unseen photographs)": split("test")},
        )
    else:
        sets = conditions(split("test"), "test (clean)", {"fit (training crops)": split("fit")})
    if args.only:
        clean = next(iter(sets))
        sets = {k: v for k, v in sets.items() if k == clean or args.only in k}
    if args.picture_only:
        picture(sets, out / "calibration.png")
        print(f"written {out}/calibration.png")
        return 0
    refs = ensure_references(cache, settings, {})
    config = EvalConfig(metrics=settings.metrics, num_reference=args.num, download=False, progress=False,
                        swd=SWDConfig(min_resolution=8))  # fmt: skip
    rows = []
    for name, images in sets.items():
        tic = time.perf_counter()
        scores = evaluate(ImageSet(images, None, {"kind": "calibration", "count": len(images)}), refs, config)["scores"]
        scores["seam_ratio_8"] = seam_ratio(images.float(), 8)
        rows.append({"condition": name, **scores})
        swd = "  ".join(f"{k[4:]}:{v:6.1f}" for k, v in scores.items() if k.startswith("swd_") and k != "swd_mean")
        print(f"{name:24s} FD {scores['fd_efficientnet-lite0']:7.1f}  SWD mean {scores['swd_mean']:6.1f}  ({swd})"
              f"  seams {scores['seam_ratio_8']:.2f}  [{time.perf_counter() - tic:.0f}s]", flush=True)  # fmt: skip
    summary = {"preset": args.preset, "num": args.num, "reference": args.reference, "rows": rows}
    atomic_write_text(out / "calibration.json", json.dumps(summary, indent=1) + "\n")
    levels = [k for k in rows[0] if k.startswith("swd_") and k != "swd_mean"]
    lines = ["| images scored | FD (EfficientNet-Lite0) | SWD mean | " + " | ".join(f"SWD {k[4:]} px" for k in levels)
             + " | seam ratio (8 px) |", "|---|---|---|" + "---|" * len(levels) + "---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['condition']} | {r['fd_efficientnet-lite0']:.1f} | {r['swd_mean']:.1f} | "
                     + " | ".join(f"{r[k]:.1f}" for k in levels) + f" | {r['seam_ratio_8']:.2f} |")  # fmt: skip
    atomic_write_text(out / "calibration.md", "\n".join(lines) + "\n")
    picture(sets, out / "calibration.png")
    names = ", ".join(r["condition"] for r in rows)
    print(f"written to {out}/calibration.{{json,md,png}} (columns of the picture: {names})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
