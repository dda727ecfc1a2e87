"""Videos from a folder: clips stored as folders of frames, or as video files.

Layout: either ``root/<clip>/`` for unlabelled clips, or ``root/<class>/<clip>/`` with one
subfolder per class (labels follow sorted names). A clip is a folder of frame images (PNG/JPG ...,
read in name order) or a video file (``.mp4``, ``.gif`` ...). Video files are decoded with the
optional ``imageio`` (``pip install "dfm[video]"``; ``.mp4`` also needs ``imageio-ffmpeg``).

Each item takes ``frames`` frames (every ``stride``-th) from a random start when augmenting, from the
first frame otherwise; every frame gets the ADM centre crop. Items are
``(x float32 (C, T, R, R) in [-1, 1], y int64)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dfm.data.base import DFMDataset, to_model_range
from dfm.data.image_folder import center_crop_adm, is_image, open_image

__all__ = ["VIDEO_EXTENSIONS", "VideoFolderDataset", "require_imageio"]

VIDEO_EXTENSIONS = (".mp4", ".gif", ".webm", ".avi", ".mov", ".mkv")


def require_imageio() -> Any:
    """Import and return ``imageio.v3``, or fail with the command that installs it."""
    try:
        import imageio.v3 as iio
    except ImportError as err:
        raise ImportError(
            'decoding video files needs the optional dependency imageio; install it with pip install "dfm[video]"'
        ) from err
    return iio


def _is_video_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS and not path.name.startswith(".")


def _frame_files(directory: Path) -> list[Path]:
    # .gif counts as a video here, so that a class folder of GIF clips is not taken for one clip
    return sorted(p for p in directory.iterdir() if is_image(p) and p.suffix.lower() not in VIDEO_EXTENSIONS)


def _is_clip(path: Path) -> bool:
    return _is_video_file(path) or (path.is_dir() and bool(_frame_files(path)))


def _entries(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if not p.name.startswith(".") and (p.is_dir() or _is_clip(p)))


class VideoFolderDataset(DFMDataset):
    """A folder of clips as ``(x float32 (C, T, R, R) in [-1, 1], y int64)`` items.

    Args:
        root: folder of clips, or of class subfolders of clips (see the module doc).
        frames: frames per item ``T``.
        resolution: output height and width of every frame.
        stride: take every ``stride``-th frame.
        random_offset: with augmentation on, start at a random frame (else at the first).
        random_flip: flip whole clips left-right at random.
        mode: ``"RGB"`` or ``"L"``.
        upscale: allow frames smaller than ``resolution`` (enlarged bicubically).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        frames: int,
        resolution: int,
        stride: int = 1,
        random_offset: bool = True,
        random_flip: bool = False,
        mode: str = "RGB",
        upscale: bool = False,
    ) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"video folder {root} does not exist or is not a directory")
        if frames < 1 or stride < 1:
            raise ValueError(f"frames={frames} and stride={stride} must both be at least 1")
        if mode not in ("RGB", "L"):
            raise ValueError(f"mode={mode!r} is not supported; use 'RGB' or 'L'")
        self.root = root
        self.stride = stride
        self.random_offset = random_offset
        self.random_flip = random_flip
        self.mode = mode
        self.upscale = upscale
        self.sample_shape = (3 if mode == "RGB" else 1, frames, resolution, resolution)

        entries = _entries(root)
        clips = [p for p in entries if _is_clip(p)]
        if clips and len(clips) != len(entries):
            odd = next(p for p in entries if not _is_clip(p))
            raise ValueError(
                f"{root} mixes clips ({clips[0].name} ...) with folders that hold no frames ({odd.name}); "
                "use root/<clip>/ or root/<class>/<clip>/ throughout"
            )
        self.samples: list[tuple[Path, int]] = []
        if clips:
            self.class_names = [root.name]
            self.samples = [(p, 0) for p in clips]
        else:
            self.class_names = [p.name for p in entries]
            for label, directory in enumerate(entries):
                self.samples += [(p, label) for p in _entries(directory) if _is_clip(p)]
        self.num_classes = len(self.class_names)
        if not self.samples:
            raise ValueError(
                f"no clips found in {root}: expected folders of frames ({', '.join(('.png', '.jpg'))} ...) "
                f"or video files ({', '.join(VIDEO_EXTENSIONS)})"
            )
        if any(p.is_file() for p, _ in self.samples):
            require_imageio()

    def __len__(self) -> int:
        return len(self.samples)

    def _read_frames(self, clip: Path, start: int, count: int) -> list[Image.Image]:
        if clip.is_dir():
            files = _frame_files(clip)
            return [open_image(files[i], self.mode) for i in range(start, start + count * self.stride, self.stride)]
        iio = require_imageio()
        try:
            video = iio.imread(clip, index=None)
        except Exception as err:  # imageio raises plugin-specific errors
            raise ValueError(f"cannot decode video {clip}: {err}; re-encode or remove it") from err
        picked = video[start : start + count * self.stride : self.stride]
        return [Image.fromarray(np.asarray(frame)).convert(self.mode) for frame in picked]

    def num_frames(self, index: int) -> int:
        """How many frames clip ``index`` has (decodes video files)."""
        clip = self.samples[index][0]
        if clip.is_dir():
            return len(_frame_files(clip))
        return int(require_imageio().improps(clip, index=None).shape[0])

    def load(
        self, index: int, augment: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        clip, label = self.samples[index]
        frames, resolution = self.sample_shape[1], self.sample_shape[-1]
        span = (frames - 1) * self.stride + 1
        available = self.num_frames(index)
        if available < span:
            raise ValueError(
                f"clip {clip} has {available} frames but {frames} frames with stride {self.stride} need "
                f"{span}; lower --frames/stride or remove the clip"
            )
        start = 0
        if augment and self.random_offset and available > span:
            start = int(torch.randint(0, available - span + 1, (), generator=generator))
        images = self._read_frames(clip, start, frames)
        out = []
        for image in images:
            if not self.upscale and min(image.size) < resolution:
                raise ValueError(
                    f"frames of {clip} are {image.width}x{image.height}, smaller than resolution {resolution}; "
                    "pass a smaller resolution or allow upscaling (upscale=True)"
                )
            array = np.asarray(center_crop_adm(image, resolution))
            frame = to_model_range(torch.from_numpy(array.copy()))
            out.append(frame.unsqueeze(0) if frame.ndim == 2 else frame.permute(2, 0, 1))
        x = torch.stack(out, dim=1)  # (C, T, R, R)
        if augment and self.random_flip and torch.rand((), generator=generator) < 0.5:
            x = x.flip(-1)
        return x.contiguous(), torch.tensor(label, dtype=torch.long)
