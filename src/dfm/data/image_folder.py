"""Images from a folder: one subfolder per class (labels follow sorted names), or a flat folder.

Every image goes through the ADM centre crop (Dhariwal & Nichol 2021, the preprocessing DiT and
most ImageNet diffusion papers use): halve with a box filter while the short side is at least twice
the target (fast and alias-free), resize bicubically so the short side equals the target, then crop
the centre square.

Example:
    >>> ds = ImageFolderDataset("data/pets", resolution=64)   # doctest: +SKIP
    >>> x, y = ds[0]; x.shape                                 # doctest: +SKIP
    torch.Size([3, 64, 64])
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dfm.data.base import DFMDataset, to_model_range

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "center_crop_adm", "find_images", "open_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def find_images(directory: Path) -> list[Path]:
    """All image files below ``directory`` (recursively), sorted by path for a stable order."""
    return sorted(p for p in directory.rglob("*") if is_image(p))


def center_crop_adm(image: Image.Image, resolution: int) -> Image.Image:
    """Resize and crop ``image`` to ``resolution x resolution`` the way ADM does (see module doc)."""
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, resample=Image.Resampling.BICUBIC)
    left = (image.width - resolution) // 2
    top = (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def open_image(path: Path, mode: str) -> Image.Image:
    """Open and fully decode ``path`` in PIL ``mode``; a clear ``ValueError`` naming the file if not."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise ValueError(f"cannot read image {path}: {err}; delete or replace the file") from err


class ImageFolderDataset(DFMDataset):
    """A folder of images as ``(x float32 (C, R, R) in [-1, 1], y int64)`` items.

    Args:
        root: a folder with one subfolder per class (any depth below each), or a flat folder of
            images (every label 0).
        resolution: output height and width.
        random_flip: flip items left-right at random (ADM and DiT train with flips).
        mode: ``"RGB"`` (3 channels) or ``"L"`` (1 grey channel).
        upscale: allow images whose short side is below ``resolution`` (they are enlarged
            bicubically); off by default because blown-up images are almost always a data mistake.
        skip_bad: check every image up front and leave out unreadable or too-small ones with a
            warning, instead of failing with an error naming the file when it is first read.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int,
        random_flip: bool = True,
        mode: str = "RGB",
        upscale: bool = False,
        skip_bad: bool = False,
    ) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
        if not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution={resolution!r} must be a positive integer")
        if mode not in ("RGB", "L"):
            raise ValueError(f"mode={mode!r} is not supported; use 'RGB' or 'L'")
        self.root = root
        self.random_flip = random_flip
        self.mode = mode
        self.upscale = upscale
        self.sample_shape = (3 if mode == "RGB" else 1, resolution, resolution)

        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        loose = [p for p in root.iterdir() if is_image(p)]
        if class_dirs and loose:
            raise ValueError(
                f"{root} holds both images ({loose[0].name} ...) and subfolders ({class_dirs[0].name} ...); "
                "put every image in a class subfolder, or use a flat folder without subfolders"
            )
        self.samples: list[tuple[Path, int]] = []
        if class_dirs:
            self.class_names = [p.name for p in class_dirs]
            for label, directory in enumerate(class_dirs):
                self.samples += [(path, label) for path in find_images(directory)]
        else:
            self.class_names = [root.name]
            self.samples = [(path, 0) for path in sorted(loose)]
        self.num_classes = len(self.class_names)
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}")
        if skip_bad:
            self._drop_bad()

    def _check_size(self, path: Path, image: Image.Image) -> None:
        if not self.upscale and min(image.size) < self.resolution:
            raise ValueError(
                f"image {path} is {image.width}x{image.height}, smaller than resolution {self.resolution}; "
                "pass a smaller resolution, remove the image, or allow upscaling (upscale=True)"
            )

    def _drop_bad(self) -> None:
        good, bad = [], []
        for path, label in self.samples:
            try:
                with Image.open(path) as image:
                    self._check_size(path, image)
                    image.verify()
                good.append((path, label))
            except Exception as err:  # noqa: BLE001 - any failure means "skip this file"
                bad.append(f"{path.name} ({err.__class__.__name__})")
        if bad:
            warnings.warn(
                f"skipped {len(bad)} unreadable or too small image(s) in {self.root}: {', '.join(bad[:5])}"
                + (" ..." if len(bad) > 5 else ""),
                stacklevel=3,
            )
        if not good:
            raise ValueError(f"no readable images of at least {self.resolution} pixels in {self.root}")
        self.samples = good

    def __len__(self) -> int:
        return len(self.samples)

    def load(
        self, index: int, augment: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[index]
        try:
            image = open_image(path, self.mode)
        except ValueError as err:
            raise ValueError(f"{err} (or train with --skip-bad to leave out unreadable files)") from None
        self._check_size(path, image)
        array = np.asarray(center_crop_adm(image, self.resolution))
        x = to_model_range(torch.from_numpy(array.copy()))
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        if augment and self.random_flip and torch.rand((), generator=generator) < 0.5:
            x = x.flip(-1)
        return x.contiguous(), torch.tensor(label, dtype=torch.long)
