"""Files that ``dfm sample`` writes: grids, per-seed PNGs, an npz for ``dfm eval``, GIF/MP4 clips, progressions.

Every file is written to a temporary name and renamed into place, so an interrupted run never leaves a half-written
output under the final name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from dfm.visual import image_grid, progression_grid, save_gif, save_png, to_uint8, upsample_to

__all__ = ["crop_border", "save_json", "save_mp4", "write_outputs"]


def crop_border(x: Tensor, p: int) -> Tensor:
    """Drop ``p`` pixels on every side of the last two dimensions (the data set's padding)."""
    return x[..., p : x.shape[-2] - p, p : x.shape[-1] - p] if p else x


def _write_pngs(native: Tensor, seeds: Sequence[int], labels: Sequence[int] | None, folder: Path) -> str:
    folder.mkdir(exist_ok=True)
    arr = to_uint8(native)
    for i, seed in enumerate(seeds):
        label = f"_class{labels[i]}" if labels is not None else ""
        save_png(arr[i], folder / f"seed{seed:06d}{label}.png")
    return str(folder)


def _write_npz(images: Tensor, seeds: Sequence[int], labels: Sequence[int] | None, path: Path) -> str:
    """uint8 images (videos: whole clips (N, T, H, W, C), what `dfm eval` needs for FVD and per-frame scores)."""
    payload = {"arr_0": to_uint8(images), "seeds": np.asarray(seeds, dtype=np.int64)}
    if labels is not None:
        payload["labels"] = np.asarray(labels, dtype=np.int64)
    tmp = path.with_name(f".samples.tmp{os.getpid()}.npz")
    np.savez(tmp, **payload)
    os.replace(tmp, path)
    return str(path)


def _write_video(images: Tensor, previews: list[Tensor], count: int, out: Path, mp4: bool, progression: bool):
    written = {}
    gif_frames = [image_grid(images[:16, :, f], nrow=4) for f in range(images.shape[2])]
    written["gif"] = str(save_gif(gif_frames, out / "video.gif"))
    if mp4:
        written["mp4"] = str(save_mp4(gif_frames, out / "video.mp4"))
    if progression and len(previews) > 1:
        # Per frame: every stage's preview clip (enlarged) beside the final clip.
        rows = min(count, 8)
        frames = [
            progression_grid([p[:rows, :, f] for p in previews], images[:rows, :, f], max_rows=rows)
            for f in range(images.shape[2])
        ]
        written["progression_gif"] = str(save_gif(frames, out / "progression.gif"))
    return written


def _write_progression(images: Tensor, previews: list[Tensor], count: int, out: Path) -> dict[str, str]:
    """Coarse-to-fine pictures: a PNG with every stage's preview beside the result, and a GIF that steps through."""
    rows = min(count, 10)
    written = {"progression": str(save_png(progression_grid(previews, images, max_rows=rows), out / "progression.png"))}
    size = images.shape[-2:]
    frames = [image_grid(upsample_to(p[:16], size), nrow=min(4, rows)) for p in previews]
    frames.append(image_grid(images[:16].float(), nrow=min(4, rows)))
    written["progression_gif"] = str(save_gif(frames, out / "progression.gif", duration_ms=600))
    return written


def write_outputs(
    images: Tensor,
    previews: list[Tensor],
    seeds: Sequence[int],
    labels: Sequence[int] | None,
    out: Path,
    grid: bool = True,
    pngs: bool = False,
    npz: bool = False,
    progression: bool = True,
    class_names: Sequence[str] | None = None,
    nrow: int | None = None,
    mp4: bool = False,
    crop: int = 0,
) -> dict[str, str]:
    """Write the requested outputs of ``dfm sample``; returns {kind: path}. PNGs and the npz drop ``crop``
    pixels on every side (the data set's padding, :class:`dfm.run.DataSpec`); the grids keep them. For
    videos the npz holds the whole clips (N, T, H, W, C), the grid and the PNGs the middle frame, the GIF/MP4 all
    frames."""
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    video = images.dim() == 5
    stills = images[:, :, images.shape[2] // 2] if video else images
    if grid:
        written["grid"] = str(save_png(image_grid(stills[:256], nrow=nrow), out / "grid.png"))
    if pngs:
        written["images"] = _write_pngs(crop_border(stills, crop), seeds, labels, out / "images")
    if npz:
        written["npz"] = _write_npz(crop_border(images, crop), seeds, labels, out / "samples.npz")
    if video:
        written.update(_write_video(images, previews, len(seeds), out, mp4, progression))
    elif progression and len(previews) > 1:
        written.update(_write_progression(images, previews, len(seeds), out))
    return written


def save_mp4(frames: Sequence[np.ndarray], path: Path, fps: int = 8) -> Path:
    """MP4 through the optional imageio + imageio-ffmpeg packages (``pip install "dfm[video]"``)."""
    try:
        import imageio.v2 as imageio
    except ImportError as err:
        raise ImportError('MP4 output needs imageio and imageio-ffmpeg: pip install "dfm[video]"') from err
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.mp4")
    try:
        imageio.mimwrite(
            tmp, [f if f.shape[-1] == 3 else np.repeat(f, 3, axis=-1) for f in frames], fps=fps, macro_block_size=1
        )
    except (ValueError, RuntimeError, ImportError) as err:
        tmp.unlink(missing_ok=True)
        raise ImportError('MP4 output needs the ffmpeg backend: pip install "dfm[video]"') from err
    os.replace(tmp, path)
    return path


def save_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
