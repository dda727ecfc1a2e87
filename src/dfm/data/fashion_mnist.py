"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): 70,000 grey 28x28 clothing images in 10 classes.

The files are the four gzipped idx files that Zalando publishes. They are looked up in this order:

1. the ``root`` argument (the files directly in it, or in ``root/fashion-mnist``);
2. ``$DFM_DATA_DIR/fashion-mnist``;
3. ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package);
4. ``~/.cache/dfm/fashion-mnist``;
5. otherwise downloaded into ``root`` (or the cache directory) when ``download=True``.

Example:
    >>> ds = FashionMNIST(split="test")           # doctest: +SKIP
    >>> x, y = ds[0]; x.shape, x.min() >= -1      # doctest: +SKIP
    (torch.Size([1, 32, 32]), tensor(True))
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dfm.data.base import DFMDataset, random_hflip, to_model_range

__all__ = [
    "CLASS_NAMES",
    "FashionMNIST",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]

CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
#: Held-aside validation: the last 5,000 training images ("val") and the other 55,000 ("fit"). Settings are chosen
#: by training on "fit" and scoring against "val", so that the test split stays unseen until the final numbers.
VAL_SIZE = 5_000
SUBSPLITS = {"fit": slice(0, SPLIT_SIZES["train"] - VAL_SIZE), "val": slice(SPLIT_SIZES["train"] - VAL_SIZE, None)}
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path("~/.cache/dfm/fashion-mnist")

# idx magic: two zero bytes, a type code (0x08 = unsigned byte), then the number of dimensions.
_UBYTE = 0x08

# Decoded arrays per (resolved path, mtime, size): repeated loads in one process are free.
_MEMORY_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


class IdxFormatError(ValueError):
    """An idx file is truncated, corrupt or not the kind expected."""


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Read an idx file of unsigned bytes with ``ndim`` dimensions (gzipped if it ends in ``.gz``).

    Raises ``IdxFormatError`` naming the file when the magic number, the number of dimensions or
    the payload size is wrong.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise IdxFormatError(f"cannot read idx file {path}: {err}; delete it and fetch it again") from err
    if len(data) < 4 + 4 * ndim:
        raise IdxFormatError(f"idx file {path} is truncated ({len(data)} bytes); delete it and fetch it again")
    zero, dtype, file_ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != _UBYTE or file_ndim != ndim:
        raise IdxFormatError(
            f"idx file {path} has magic {data[:4].hex()} but 0000080{ndim} (unsigned bytes, {ndim} dims) "
            "was expected; is it the right file?"
        )
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = data[4 + 4 * ndim :]
    expected = int(np.prod(shape))
    if len(payload) != expected:
        raise IdxFormatError(
            f"idx file {path} declares shape {shape} ({expected} bytes) but holds {len(payload)}; "
            "delete it and fetch it again"
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


def _has_split(directory: Path, split: str) -> bool:
    return all((directory / name).is_file() for name in FILES[split])


def _candidates(root: str | os.PathLike | None) -> list[Path]:
    if root is not None:
        root = Path(root).expanduser()
        return [root, root / "fashion-mnist"]
    found = []
    if os.environ.get("DFM_DATA_DIR"):
        found.append(Path(os.environ["DFM_DATA_DIR"]).expanduser() / "fashion-mnist")
    found += [DEBIAN_DIR, CACHE_DIR.expanduser()]
    return found


def find_fashion_mnist(root: str | os.PathLike | None = None, split: str = "train") -> Path | None:
    """The first directory in the lookup order that holds both files of ``split``, or ``None``."""
    _check_split(split)
    for directory in _candidates(root):
        if _has_split(directory, split):
            return directory
    return None


def _download(directory: Path, split: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in FILES[split]:
        target = directory / name
        if target.is_file():
            continue
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(URL + name, timeout=60) as response:
                out.write(response.read())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def _not_found_message(root: str | os.PathLike | None, split: str) -> str:
    where = ", ".join(str(p) for p in _candidates(root))
    return (
        f"Fashion-MNIST {split} files ({', '.join(FILES[split])}) not found in {where}; "
        "install them with `apt-get install dataset-fashion-mnist`, or put the .gz files in a folder "
        "and pass it as --data-dir (or set DFM_DATA_DIR), or pass download=True"
    )


def _check_split(split: str) -> None:
    if split not in FILES and split not in SUBSPLITS:
        raise ValueError(
            f"split={split!r} is not a Fashion-MNIST split; use 'train', 'test', or 'fit'/'val' (the training "
            f"split without / with only its last {VAL_SIZE} images)"
        )


def load_fashion_mnist(
    root: str | os.PathLike | None = None, split: str = "train", download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split as ``(images uint8 (N, 28, 28), labels int64 (N,))``.

    Splits: ``train`` (60,000), ``test`` (10,000), and the held-aside validation pair ``fit`` (the first 55,000
    training images) / ``val`` (the last 5,000, about 500 per class). The decoded tensors are cached in memory per
    process; treat them as read-only.
    """
    _check_split(split)
    if split in SUBSPLITS:
        images, labels = load_fashion_mnist(root, "train", download)
        return images[SUBSPLITS[split]], labels[SUBSPLITS[split]]
    directory = find_fashion_mnist(root, split)
    if directory is None:
        if not download:
            raise FileNotFoundError(_not_found_message(root, split))
        directory = Path(root).expanduser() if root is not None else CACHE_DIR.expanduser()
        try:
            _download(directory, split)
        except OSError as err:
            raise FileNotFoundError(f"download failed ({err}); " + _not_found_message(root, split)) from err
    image_path, label_path = (directory / name for name in FILES[split])
    key = tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in (image_path, label_path))
    if key not in _MEMORY_CACHE:
        images = read_idx(image_path, ndim=3)
        labels = read_idx(label_path, ndim=1)
        if images.shape[0] != labels.shape[0]:
            raise IdxFormatError(
                f"{image_path} holds {images.shape[0]} images but {label_path} holds {labels.shape[0]} "
                "labels; the two files do not belong together"
            )
        if labels.size and labels.max() >= len(CLASS_NAMES):
            raise IdxFormatError(f"{label_path} holds label {labels.max()}; Fashion-MNIST labels are 0..9")
        _MEMORY_CACHE[key] = (torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))
    return _MEMORY_CACHE[key]


def resize_images(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize a batch of 28x28 images in [-1, 1] to the dataset resolution.

    28: unchanged. 32: padded by 2 pixels of background (-1) on every side, so that the image splits
    into 2- and 3-stage pyramids and patches of 4. Any other size: the padded 32x32 image resized
    bilinearly (antialiased when shrinking), so that every resolution shows the same framing and a
    64x64 image is exactly an upsampled 32x32 one.
    """
    if resolution == 28:
        return x
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    if resolution == 32:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)


class FashionMNIST(DFMDataset):
    """Fashion-MNIST as ``(x float32 (1, R, R) in [-1, 1], y int64)`` items.

    Args:
        root: folder holding the idx files (see the module docstring for the lookup order).
        split: ``"train"`` (60,000 images), ``"test"`` (10,000), or ``"fit"`` / ``"val"`` (55,000 / 5,000: the
            training split with its last 5,000 images held aside for choosing settings).
        resolution: 32 (default, 28 padded with background), 28 (native), or another size (resized).
        random_flip: flip items left-right at random (off by default: clothes are not symmetric
            in every class, and the paper's small-scale experiments do not flip).
        download: fetch the files when they are nowhere to be found.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        resolution: int = 32,
        random_flip: bool = False,
        download: bool = False,
    ) -> None:
        if not isinstance(resolution, int) or resolution < 4:
            raise ValueError(f"resolution={resolution!r} is too small; use 28, 32 or another size >= 4")
        self.split = split
        self.images, self.labels = load_fashion_mnist(root, split, download)
        self.random_flip = random_flip
        self.num_classes = len(CLASS_NAMES)
        self.class_names = list(CLASS_NAMES)
        self.sample_shape = (1, resolution, resolution)
        # 28 px is native; other sizes are the 32 px image (28 padded by 2) resized: the border scales with it.
        self.padding = 0 if resolution == 28 or (2 * resolution) % 32 else 2 * resolution // 32
        self._tensors: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def _convert(self, images: torch.Tensor) -> torch.Tensor:
        return resize_images(to_model_range(images).unsqueeze(1), self.resolution)

    def load(
        self, index: int, augment: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._convert(self.images[index : index + 1])
        if augment and self.random_flip:
            x = random_hflip(x, generator)
        return x[0], self.labels[index]

    def get_batch(
        self, indices: torch.Tensor, generator: torch.Generator | None = None, augment: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.as_tensor(indices, dtype=torch.long)
        x = self._convert(self.images[indices])
        if augment and self.random_flip:
            x = random_hflip(x, generator)
        return x, self.labels[indices]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as one float tensor ``(N, 1, R, R)`` (computed once, then reused) and labels."""
        if self._tensors is None:
            self._tensors = self._convert(self.images)
        return self._tensors, self.labels
