"""Images from a folder: one subfolder per class (labels follow sorted names), or a flat folder.

Every image goes through the ADM centre crop (Dhariwal & Nichol 2021, the preprocessing DiT and
most ImageNet diffusion papers use): halve with a box filter while the short side is at least twice
the target (fast and alias-free), resize bicubically so the short side equals the target, then crop
the centre square.

Channels: a folder whose images are all single-channel (grey: PIL modes ``L``, ``1``, ``LA``, ``I``, ``I;16``,
``F``) gives 1-channel samples; any colour image in it (RGB, RGBA, palette, CMYK ...) makes every sample RGB,
grey images then repeated on the three channels. Pass ``mode="RGB"`` or ``mode="L"`` to choose (it also skips
reading the images' headers at start, which the automatic choice does until it meets a colour image).

Example:
    >>> ds = ImageFolderDataset("data/pets", resolution=64)   # doctest: +SKIP
    >>> x, y = ds[0]; x.shape                                 # doctest: +SKIP
    torch.Size([3, 64, 64])
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dfm.data.base import DFMDataset, to_model_range

__all__ = [
    "GREY_MODES",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "UnreadableImageError",
    "center_crop_adm",
    "find_images",
    "open_image",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
#: PIL modes of single-channel (grey) images, with or without alpha
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


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


class UnreadableImageError(ValueError):
    """An image file that cannot be opened or decoded (the message names it)."""


def open_image(path: Path, mode: str) -> Image.Image:
    """Open and fully decode ``path`` in PIL ``mode``; an :class:`UnreadableImageError` naming the file if not."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise UnreadableImageError(f"cannot read image {path}: {err}; delete or replace the file") from err


class ImageFolderDataset(DFMDataset):
    """A folder of images as ``(x float32 (C, R, R) in [-1, 1], y int64)`` items.

    Args:
        root: a folder with one subfolder per class (any depth below each), or a flat folder of
            images (every label 0).
        resolution: output height and width.
        random_flip: flip items left-right at random (ADM and DiT train with flips).
        mode: ``"RGB"`` (3 channels), ``"L"`` (1 grey channel), or ``None`` (default): ``"L"`` when every image
            of the folder is single-channel, else ``"RGB"`` (see the module doc).
        upscale: allow images whose short side is below ``resolution`` (they are enlarged
            bicubically); off by default because blown-up images are almost always a data mistake.
        skip_bad: check every image up front by decoding it (in threads; JPEGs at reduced scale, which still
            reads all their data), and leave out unreadable or too-small ones with a warning naming them, instead
            of failing with an error naming the file when it is first read. The items are then fixed for the run,
            and the same at every start with the same files, so a resume draws the same batches.
        upscale_flag: how the user allows upscaling, for the too-small error (``"--upscale"`` for ``dfm prepare``);
            ``None``: the ``upscale=True`` argument.
        pad: pixels of background (black) added on every side of each image before it is resized and cropped, as
            the built-in Fashion-MNIST pads its 28x28 images to 32x32 (``pad=2``). The border in model pixels is
            :attr:`padding` (read from the first image: exact for folders of square images of one size), which
            saved samples crop again.
        pad_flag: how the user sets ``pad``, for the too-small error (``"-o data.pad"`` for ``dfm train``); ``None``:
            the ``pad`` argument.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int,
        random_flip: bool = True,
        mode: str | None = None,
        upscale: bool = False,
        skip_bad: bool = False,
        upscale_flag: str | None = None,
        pad: int = 0,
        pad_flag: str | None = None,
    ) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
        if not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution={resolution!r} must be a positive integer")
        if mode not in (None, "RGB", "L"):
            raise ValueError(f"mode={mode!r} is not supported; use 'RGB', 'L' or None (from the images)")
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ValueError(f"{pad_flag or 'pad'}={pad!r} must be a whole number of pixels >= 0")
        self.root = root
        self.random_flip = random_flip
        self.upscale = upscale
        self.skip_bad = skip_bad
        self.upscale_flag = upscale_flag
        self.pad = pad
        self.pad_flag = pad_flag
        self.sample_shape = (3, resolution, resolution)  # the channels follow the mode, below

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
        modes = self._drop_bad() if skip_bad else None
        if mode is None:
            mode = "L" if all(m in GREY_MODES for m in (modes or self._header_modes())) else "RGB"
        self.mode = mode
        self.sample_shape = (3 if mode == "RGB" else 1, resolution, resolution)
        self.padding = self._model_padding() if pad else 0

    def _model_padding(self) -> int:
        """The border ``pad`` becomes in model pixels, for the first image that opens: ``pad`` scaled from the padded
        image's short side to the resolution, when that is a whole number (else 0, as Fashion-MNIST at sizes that
        do not scale its 2-pixel border to whole pixels)."""
        for path, _ in self.samples:
            try:
                with Image.open(path) as image:
                    padded = min(image.size) + 2 * self.pad
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
                continue
            if padded < self.resolution and not self.upscale:
                return 0  # too small: reading it says so
            return self.pad * self.resolution // padded if (self.pad * self.resolution) % padded == 0 else 0
        return 0

    def _header_modes(self) -> Iterable[str]:
        """The PIL modes of the images, read from their headers only, lazily (the caller stops at a colour one);
        files that cannot be opened are passed over here (reading them fails with an error naming them)."""
        for path, _ in self.samples:
            try:
                with Image.open(path) as image:
                    mode = image.mode
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
                continue
            yield mode

    def _too_small(self, width: int, height: int) -> bool:
        return not self.upscale and min(width, height) + 2 * self.pad < self.resolution

    def _check_size(self, path: Path, image: Image.Image) -> None:
        if self._too_small(image.width, image.height):
            need = -(-(self.resolution - min(image.size)) // 2)  # the border that brings it to the resolution
            if self.pad_flag:
                remedy = (f"pass a smaller resolution, remove the image, allow upscaling with {self.upscale_flag}, or "
                          f"add a border with {self.pad_flag}={need}")  # fmt: skip
            elif self.upscale_flag:
                remedy = f"pass a smaller --resolution, remove the image, or allow upscaling with {self.upscale_flag}"
            else:
                remedy = f"pass a smaller resolution, remove the image, allow upscaling (upscale=True), or pad={need}"
            size = f"{image.width}x{image.height}" + (f" with a border of {self.pad}" if self.pad else "")
            raise ValueError(f"image {path} is {size}, smaller than resolution {self.resolution}; {remedy}")

    def _check(self, path: Path) -> tuple[str | None, str]:
        """``(mode, "")`` when ``path`` decodes (JPEGs at a reduced scale, which still reads all their data) and is
        large enough, else ``(None, why not)``."""
        try:
            with Image.open(path) as image:
                if self._too_small(image.width, image.height):
                    return None, f"{image.width}x{image.height}, smaller than {self.resolution}"
                mode = image.mode
                image.draft(mode, (self.resolution, self.resolution))  # JPEG only: decode at 1/2 .. 1/8 scale
                image.load()  # decodes: a truncated file fails here (Image.verify does not decode)
                return mode, ""
        except Exception as err:  # noqa: BLE001 - any failure means "skip this file"
            return None, f"{err.__class__.__name__}: {err}"

    def _drop_bad(self) -> list[str]:
        """Decode every image (in threads: decoding releases the GIL) and keep the readable, large enough ones;
        returns their modes."""
        workers = min(8, os.cpu_count() or 1, len(self.samples))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(self._check, [path for path, _ in self.samples]))
        good, bad, modes = [], [], []
        for (path, label), (mode, why) in zip(self.samples, results):
            if mode is None:
                bad.append(f"{path.relative_to(self.root)} ({why})")
            else:
                good.append((path, label))
                modes.append(mode)
        if bad:
            warnings.warn(
                f"skipped {len(bad)} unreadable or too small image(s) in {self.root}: {'; '.join(bad[:5])}"
                + (" ..." if len(bad) > 5 else ""),
                stacklevel=3,
            )
        if not good:
            raise ValueError(f"no readable images of at least {self.resolution} pixels in {self.root}")
        self.samples = good
        return modes

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, path: Path) -> torch.Tensor:
        """The image at ``path``, cropped, as uint8 ``(C, R, R)``; a ``ValueError`` naming the file if it cannot."""
        image = open_image(path, self.mode)
        self._check_size(path, image)
        if self.pad:
            image = ImageOps.expand(image, border=self.pad, fill=0)  # black, as Fashion-MNIST's background
        array = torch.from_numpy(np.asarray(center_crop_adm(image, self.resolution)).copy())
        return array.unsqueeze(0) if array.ndim == 2 else array.permute(2, 0, 1)

    def load(
        self, index: int, augment: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[index]
        try:
            pixels = self._read(path)
        except UnreadableImageError as err:
            if self.skip_bad:  # it was readable at the start: changed on disk since
                raise UnreadableImageError(f"{err} (it changed since the start of the run)") from None
            raise UnreadableImageError(f"{err} (or run with --skip-bad to leave out unreadable files)") from None
        x = to_model_range(pixels)
        if augment and self.random_flip and torch.rand((), generator=generator) < 0.5:
            x = x.flip(-1)
        return x.contiguous(), torch.tensor(label, dtype=torch.long)
