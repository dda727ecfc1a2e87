"""Reading image sets for evaluation: PNG folders, ADM-style `.npz` files and named datasets.

Every loader returns `ImageSet(images uint8 (N, C, H, W), labels int64 (N,) or None, source dict)`.
Labels of PNG folders come from file names containing `class<K>` or `label<K>` (as `dfm sample --png`
writes them: `seed000123_class7.png`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dfm.checkpoint import load_error_reason
from dfm.data.fashion_mnist import load_fashion_mnist as _load_fashion_mnist

__all__ = ["ImageSet", "load_images", "load_fashion_mnist", "read_sampling_settings"]

_LABEL_PATTERN = re.compile(r"(?:class|label)[_-]?(\d+)", re.IGNORECASE)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W), or videos (N, C, T, H, W)
    labels: torch.Tensor | None = None  # int64 (N,)
    source: dict = field(default_factory=dict)
    prompts: list[str] | None = None  # text prompts of text-conditioned samples

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, count: int | None) -> ImageSet:
        """The first `count` images (all if None); asking for more than exist is an error."""
        if count is None or count == len(self):
            return self
        if count > len(self):
            raise ValueError(f"asked for {count} images but {self.source.get('path', 'the set')} holds {len(self)}")
        labels = None if self.labels is None else self.labels[:count]
        prompts = None if self.prompts is None else self.prompts[:count]
        return ImageSet(self.images[:count], labels, {**self.source, "count": count}, prompts)

    def spread(self, count: int) -> ImageSet:
        """At most ``count`` images evenly spaced over the set (all of them if it holds no more): a fair draw from a
        set stored in order, such as many crops of one photograph after another."""
        if count >= len(self):
            return self
        index = torch.linspace(0, len(self) - 1, count).long()
        labels = None if self.labels is None else self.labels[index]
        prompts = None if self.prompts is None else [self.prompts[i] for i in index.tolist()]
        return ImageSet(self.images[index], labels, {**self.source, "count": count, "spread": True}, prompts)


def _to_nchw(array: np.ndarray, where: str) -> torch.Tensor:
    """(N, H, W[, C]) images -> (N, C, H, W); (N, T, H, W, C) videos -> (N, C, T, H, W)."""
    if array.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8 in [0, 255], got dtype {array.dtype}")
    if array.ndim == 5 and array.shape[-1] in (1, 3):
        return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 4, 1, 2, 3).contiguous()
    if array.ndim == 3:  # (N, H, W) greyscale
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"{where}: expected images of shape (N, H, W, 1 or 3), got {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


def load_fashion_mnist(root: str | Path | None = None, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as (uint8 (N, 28, 28), int64 (N,)) from `dfm.data` (never downloads here)."""
    return _load_fashion_mnist(root=root, split=split)


def _load_folder(path: Path) -> ImageSet:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no PNG/JPEG images in folder {path}")
    arrays, labels = [], []
    for file in files:
        try:
            with Image.open(file) as image:
                mode = "L" if image.mode in ("L", "I;16", "1") else "RGB"
                arrays.append(np.asarray(image.convert(mode)))
        except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for damaged files
            raise ValueError(f"cannot read image {file}: {err}; delete or replace the file") from None
        match = _LABEL_PATTERN.search(file.stem)
        labels.append(int(match.group(1)) if match else None)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images in {path} have different shapes {sorted(shapes)}; all samples must share one size")
    has_labels = all(label is not None for label in labels)
    return ImageSet(
        _to_nchw(np.stack(arrays), str(path)),
        torch.tensor(labels, dtype=torch.int64) if has_labels else None,
        {"kind": "folder", "path": str(path), "count": len(files)},
    )


def read_npz(path: str | Path, expected: str = "an .npz of arrays (numpy.savez)") -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` file ``path``, read without unpickling anything (``allow_pickle=False``); a
    ``ValueError`` naming the file and what was ``expected`` when it is not such a file or is damaged."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array (an .npy file), not named arrays")
        with data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise
    except Exception as err:  # pickled data, object arrays, not a zip, a truncated member...: not what we read
        raise ValueError(
            f"cannot read {path}: it is not an .npz file of plain arrays, or it is damaged "
            f"({load_error_reason(err)}); pass {expected}"
        ) from None


def _load_npz(path: Path) -> ImageSet:
    data = read_npz(path, "images as an .npz with key arr_0 (uint8 NHWC), e.g. written by dfm sample --npz")
    if "arr_0" not in data:
        raise ValueError(f"{path} has no 'arr_0' key (keys: {sorted(data.keys())}); expected ADM-style samples")
    images = _to_nchw(data["arr_0"], str(path))
    labels = torch.from_numpy(data["labels"].astype(np.int64).reshape(-1)) if "labels" in data else None
    prompts = [str(p) for p in data["prompts"]] if "prompts" in data else None
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{path} holds {len(images)} images but {len(labels)} labels: give one label per image")
    return ImageSet(images, labels, {"kind": "npz", "path": str(path), "count": len(images)}, prompts)


def load_images(spec: str | Path) -> ImageSet:
    """Load a folder of images, an ADM `.npz` (key arr_0, uint8 NHWC or videos NTHWC, optional `labels`),
    or a dataset.

    Datasets: `fashion-mnist` (= `fashion-mnist:train`), `fashion-mnist:test`, or `fashion-mnist:val` (the 5,000
    training images that `fashion-mnist:fit` runs hold aside).
    """
    text = str(spec)
    if text.startswith("fashion-mnist"):
        _, _, split = text.partition(":")
        images, labels = load_fashion_mnist(split=split or "train")
        return ImageSet(
            images[:, None],
            labels,
            {"kind": "dataset", "name": "fashion-mnist", "split": split or "train", "count": len(images)},
        )
    path = Path(spec)
    if path.is_dir() or (path.suffix == ".npz" and path.is_file()):
        image_set = _load_folder(path) if path.is_dir() else _load_npz(path)
        if len(image_set) == 0:
            raise ValueError(f"{path} holds no images: nothing to score")
        return image_set
    raise ValueError(
        f"cannot read images from {text!r}: give a folder of PNGs, an .npz with key arr_0, "
        "or 'fashion-mnist[:train|:test|:val]'"
    )


def read_sampling_settings(spec: str | Path) -> dict | None:
    """The `sampling.json` that `dfm sample` writes beside its outputs, if any.

    Looked for in a samples folder and its parent (`out/images/*.png` -> `out/sampling.json`), or
    beside an `.npz` (`out/samples.npz` -> `out/sampling.json`).
    """
    path = Path(spec)
    candidates = (
        [path / "sampling.json", path.parent / "sampling.json"] if path.is_dir() else [path.parent / "sampling.json"]
    )
    for candidate in candidates:
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None
