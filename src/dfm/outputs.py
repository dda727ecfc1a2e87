"""Files that ``dfm sample`` writes: grids, per-seed PNGs, an npz for ``dfm eval``, GIF/MP4 clips, progressions.

Every file is written to a temporary name and renamed into place, so an interrupted run never leaves a half-written
output under the final name.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dfm.visual import image_grid, progression_grid, save_gif, save_png, to_uint8, upsample_to

__all__ = ["SampleWriter", "crop_border", "save_json", "save_mp4", "write_outputs"]


def crop_border(x: Tensor, p: int) -> Tensor:
    """Drop ``p`` pixels on every side of the last two dimensions (the data set's padding)."""
    return x[..., p : x.shape[-2] - p, p : x.shape[-1] - p] if p else x


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


class SampleWriter:
    """The outputs of ``dfm sample``, written shard by shard: per-seed PNGs and the npz stream to disk as the images
    come (so that any number of seeds needs bounded memory); the grid, the progression and the clips are drawn
    from the first images at :meth:`close`. Files stay under temporary names until they are complete.

    Args:
        out: the output folder.
        count: how many images will come (the npz's length, and what the disk check counts).
        native: the shape of one image without the data set's padding, (C, H, W) or (C, T, H, W).
        crop: the padding to drop for the PNGs and the npz (the grids keep it).
        grid, pngs, npz, progression, mp4: which outputs to write.
        nrow: columns of the grid.
    """

    KEEP = 256  #: images kept in memory for the grid and the progression

    def __init__(self, out: Path, count: int, native: Sequence[int] | None, crop: int = 0, *, grid: bool = True,
                 pngs: bool = False, npz: bool = False, progression: bool = True, mp4: bool = False,
                 nrow: int | None = None) -> None:  # fmt: skip
        self.out, self.count, self.crop, self.nrow = Path(out), int(count), int(crop), nrow
        self.grid, self.pngs, self.npz, self.progression, self.mp4 = grid, pngs, npz, progression, mp4
        self.kept_images: list[Tensor] = []
        self.kept_previews: list[list[Tensor]] = []
        self.kept = 0
        self.written = 0
        self.paths: dict[str, str] = {}
        self._npz = self._seeds = self._labels = None
        if native is not None:  # else (a latent run: decoded images of a size known once decoded) at the first add
            self._prepare(tuple(native))

    def _prepare(self, native: tuple[int, ...]) -> None:
        """Check that the outputs fit on the disk, then open the streams."""
        per_image = math.prod(native)
        need = (per_image + 16) * self.count * self.npz + (per_image + 120) * self.count * self.pngs
        free = shutil.disk_usage(self.out if self.out.exists() else _existing_parent(self.out)).free
        if need > 0.95 * free:
            raise ValueError(f"{self.count:,} images need about {need / 1e9:.3g} GB in {self.out}, which has "
                             f"{free / 1e9:.3g} GB free: ask for fewer seeds, drop --png/--npz, or choose another "
                             "--out")  # fmt: skip
        self.out.mkdir(parents=True, exist_ok=True)
        self.native = native
        if self.npz:
            self._start_npz((self.count, *native[1:], native[0]))

    def _start_npz(self, shape: tuple[int, ...]) -> None:
        tmp = self.out / f".samples.tmp{os.getpid()}.npz"
        self._npz_tmp = tmp
        self._zip = zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._npz = self._zip.open("arr_0.npy", "w", force_zip64=True)
        np.lib.format.write_array_header_2_0(self._npz, {"descr": "|u1", "fortran_order": False, "shape": shape})
        self._seeds = open(self.out / f".seeds.tmp{os.getpid()}", "wb")
        self._labels = open(self.out / f".labels.tmp{os.getpid()}", "wb")

    def add(self, images: Tensor, previews: Sequence[Tensor], seeds: Sequence[int],
            labels: Sequence[int] | None) -> None:  # fmt: skip
        """The next images (with their stages' previews), in seed order."""
        if not hasattr(self, "native"):
            self._prepare((images.shape[1], *crop_border(images[:1], self.crop).shape[2:]))
        video = images.dim() == 5
        stills = images[:, :, images.shape[2] // 2] if video else images
        if self.pngs:
            folder = self.out / "images"
            folder.mkdir(exist_ok=True)
            arr = to_uint8(crop_border(stills, self.crop))
            for i, seed in enumerate(seeds):
                label = f"_class{labels[i]}" if labels is not None else ""
                save_png(arr[i], folder / f"seed{int(seed):06d}{label}.png")
            self.paths["images"] = str(folder)
        if self._npz is not None:
            self._npz.write(to_uint8(crop_border(images, self.crop)).tobytes())
            self._seeds.write(np.asarray(seeds, dtype=np.int64).tobytes())
            if labels is not None:
                self._labels.write(np.asarray(labels, dtype=np.int64).tobytes())
            self._has_labels = labels is not None
        take = min(len(images), self.KEEP - self.kept)
        if take > 0:
            self.kept_images.append(images[:take])
            self.kept_previews = self.kept_previews or [[] for _ in previews]
            for stage, p in enumerate(previews):
                self.kept_previews[stage].append(p[:take])
            self.kept += take
        self.written += len(images)

    def close(self) -> dict[str, str]:
        """Finish every output; returns {kind: path}."""
        if self.written != self.count:
            raise RuntimeError(f"{self.written} images written, {self.count} announced")
        images = torch.cat(self.kept_images)
        previews = [torch.cat(p) for p in self.kept_previews]
        video = images.dim() == 5
        stills = images[:, :, images.shape[2] // 2] if video else images
        if self.grid:
            self.paths["grid"] = str(save_png(image_grid(stills, nrow=self.nrow), self.out / "grid.png"))
        if video:
            self.paths.update(_write_video(images, previews, self.count, self.out, self.mp4, self.progression))
        elif self.progression and len(previews) > 1:
            self.paths.update(_write_progression(images, previews, self.count, self.out))
        if self._npz is not None:
            self._npz.close()
            for name, handle in (("seeds", self._seeds), ("labels", self._labels)):
                handle.close()
                if name == "labels" and not getattr(self, "_has_labels", False):
                    os.unlink(handle.name)
                    continue
                with open(handle.name, "rb") as src, self._zip.open(f"{name}.npy", "w", force_zip64=True) as dst:
                    n = os.path.getsize(handle.name) // 8
                    np.lib.format.write_array_header_2_0(dst, {"descr": "<i8", "fortran_order": False,
                                                               "shape": (n,)})  # fmt: skip
                    shutil.copyfileobj(src, dst)
                os.unlink(handle.name)
            self._zip.close()
            os.replace(self._npz_tmp, self.out / "samples.npz")
            self.paths["npz"] = str(self.out / "samples.npz")
        return self.paths


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_outputs(images: Tensor, previews: list[Tensor], seeds: Sequence[int], labels: Sequence[int] | None,
                  out: Path, crop: int = 0, **outputs: Any) -> dict[str, str]:  # fmt: skip
    """All of ``dfm sample``'s outputs of a batch at once (:class:`SampleWriter`): PNGs and the npz drop ``crop``
    pixels on every side (the data set's padding); for videos the npz holds the whole clips (N, T, H, W, C), the
    grid and the PNGs the middle frame, the GIF/MP4 all frames."""
    writer = SampleWriter(out, len(images), None, crop, **outputs)
    writer.add(images, previews, seeds, labels)
    return writer.close()


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
