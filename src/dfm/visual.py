"""Pictures: image grids, coarse-to-fine progressions, GIFs and loss curves (all written atomically)."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


def to_uint8(x: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8; videos (N, C, T, H, W) -> (N, T, H, W, C)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(1, -1).numpy()


def display_scale(size: int, target: int = 96) -> int:
    """Integer zoom so that small images (Fashion-MNIST's 32 px) are visible in a grid."""
    return max(1, target // max(size, 1))


def image_grid(
    images: Tensor, nrow: int | None = None, pad: int = 2, pad_value: float = 1.0, scale: int | None = None
) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one (H', W', C) uint8 array, ``nrow`` images per row.

    Small images are enlarged by an integer factor (nearest neighbour, ``scale=None`` picks it) for display.
    """
    scale = display_scale(images.shape[-1]) if scale is None else scale
    if scale > 1:
        images = F.interpolate(images.detach().float().cpu(), scale_factor=scale, mode="nearest")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, top : top + h, left : left + w] = images[i].detach().float().cpu()
    return to_uint8(canvas[None])[0]


def grid_columns(n: int, num_classes: int = 0) -> int:
    """Columns of a near-square grid of ``n`` images. With 2 to 16 classes (labels ``seed % num_classes``) the
    count is a multiple of the number of classes, so that every column holds one class."""
    side = max(1, math.ceil(math.sqrt(n)))
    if 1 < num_classes <= 16:
        side = max(num_classes, round(side / num_classes) * num_classes)
    return max(1, min(side, n))


def upsample_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour upsampling for display (shows the true resolution of a preview)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.float(), size=tuple(size), mode="nearest")


def progression_grid(previews: Sequence[Tensor], final: Tensor, max_rows: int = 10) -> np.ndarray:
    """One row per sample: the preview after each stage (upsampled for display), then the final image."""
    size = final.shape[-2:]
    cols = [upsample_to(p[:max_rows], size) for p in previews]
    if not previews or previews[-1].shape != final.shape or not torch.equal(previews[-1], final):
        cols.append(final[:max_rows].float())
    n = cols[0].shape[0]
    tiles = torch.stack(cols, dim=1).reshape(n * len(cols), *final.shape[1:])
    return image_grid(tiles, nrow=len(cols))


def _atomic_save(path: Path, save) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    save(tmp)
    os.replace(tmp, path)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    _atomic_save(path, lambda p: img.save(p, format="PNG"))
    return path


def save_gif(frames: Sequence[np.ndarray], path: str | Path, duration_ms: int = 120, hold_last: int = 4) -> Path:
    """Animated GIF from (H, W, C) uint8 frames; the last frame is held ``hold_last`` times longer."""
    path = Path(path)
    imgs = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
    durations = [duration_ms] * (len(imgs) - 1) + [duration_ms * hold_last]
    _atomic_save(
        path,
        lambda p: imgs[0].save(p, format="GIF", save_all=True, append_images=imgs[1:], duration=durations, loop=0),
    )
    return path


def read_metrics(metrics_file: str | Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``. A torn last line (a crash or a full disk mid-write) is dropped
    with a warning; a bad line elsewhere is an error that names the file and the line."""
    path = Path(metrics_file)
    lines = [(i, line) for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    rows = []
    for i, line in lines:
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if i == lines[-1][0]:
                warnings.warn(f"{path}: dropped a torn last line {i} ({err})", stacklevel=2)
                break
            raise ValueError(f"{path} line {i} is not a JSON object ({err}): fix or delete that line") from None
        rows.append(row)
    return rows


def plot_losses(metrics_file: str | Path, out: str | Path) -> Path | None:
    """Loss curve (total and per stage) from a run's ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_file) if "loss" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, [r["loss"] for r in rows], label="loss", lw=1.5)
    for s in range(len(rows[0].get("stage_loss", []))):
        ax.plot(steps, [r["stage_loss"][s] for r in rows], label=f"stage {s + 1}", lw=1, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    _atomic_save(out, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return out
