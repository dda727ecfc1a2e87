"""Datasets for ``dfm``: Fashion-MNIST, image and video folders, pre-encoded VAE latents, and a
synthetic moving-objects video set, all behind one entry point, ``build_dataset``.

Every dataset yields ``(x, y)`` with ``x`` float32 in model space (``(C, H, W)`` images or
``(C, T, H, W)`` videos) and ``y`` an int64 label, and describes itself with ``num_classes``,
``channels``, ``resolution``, ``sample_shape``, ``class_names``, ``needs_vae`` and ``vae_path``
(see ``dfm.data.base.DFMDataset``).

Example:
    >>> train = build_dataset("fashion-mnist")                 # doctest: +SKIP
    >>> train.sample_shape, train.num_classes                  # doctest: +SKIP
    ((1, 32, 32), 10)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dfm.data.base import DFMDataset, random_hflip
from dfm.data.fashion_mnist import FashionMNIST, load_fashion_mnist
from dfm.data.image_folder import ImageFolderDataset
from dfm.data.latents import LatentDataset, is_latent_dir, read_latent_info
from dfm.data.moving_objects import MovingFashionMNIST
from dfm.data.video_folder import VideoFolderDataset

__all__ = [
    "BUILTIN_DATASETS",
    "DFMDataset",
    "FashionMNIST",
    "ImageFolderDataset",
    "LatentDataset",
    "MovingFashionMNIST",
    "VideoFolderDataset",
    "build_dataset",
    "is_image_folder",
    "load_fashion_mnist",
    "random_hflip",
]

BUILTIN_DATASETS = ("fashion-mnist", "moving-fashion-mnist")


def _flip(random_flip: bool | None, default: bool, train: bool) -> bool:
    return train and (default if random_flip is None else random_flip)


def build_dataset(
    name_or_path: str | os.PathLike,
    resolution: int | None = None,
    train: bool = True,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    random_flip: bool | None = None,
    frames: int | None = None,
    num_clips: int | None = None,
    objects: int = 1,
    seed: int = 0,
    **kwargs: Any,
) -> DFMDataset:
    """Build the dataset the trainer asks for by name or path.

    Args:
        name_or_path: ``"fashion-mnist"`` (``"fashion-mnist:fit"``: without the 5,000 held-aside ``val``
            images), ``"moving-fashion-mnist"``, a latent directory written by
            ``dfm prepare`` (it holds ``latents.json``), a folder of clips when ``frames`` is given,
            or else a folder of images (class subfolders, or flat).
        resolution: output size (images: required for folders, 32 for Fashion-MNIST, 64 for moving
            Fashion-MNIST; latents: optional check against the image or latent resolution).
        train: training split with random augmentation; ``False`` gives the test split where one
            exists (Fashion-MNIST, latents with a ``test`` split) and turns augmentation off.
        data_dir: where Fashion-MNIST lives (see ``dfm.data.fashion_mnist``).
        download: download Fashion-MNIST when it is not found.
        random_flip: override the dataset's flip default (on for image folders, off elsewhere);
            flips only ever apply when ``train``.
        frames: frames per clip (videos).
        num_clips, objects, seed: moving Fashion-MNIST settings (default 10,000 train / 1,000 test
            clips).
        **kwargs: passed to the dataset class (e.g. ``upscale``, ``skip_bad``, ``mode``).
    """
    name = str(name_or_path)
    key, split = _parse_name(name, train)
    if key in ("fashion-mnist", "fashionmnist"):
        return FashionMNIST(
            root=data_dir,
            split=split,
            resolution=32 if resolution is None else resolution,
            random_flip=_flip(random_flip, False, train),
            download=download,
            **kwargs,
        )
    if key in ("moving-fashion-mnist", "moving-fashionmnist"):
        return MovingFashionMNIST(
            num_clips=num_clips or (10_000 if train else 1_000),
            frames=16 if frames is None else frames,
            size=64 if resolution is None else resolution,
            objects=objects,
            seed=seed,
            split=split,
            root=data_dir,
            download=download,
            **kwargs,
        )
    path = _existing_folder(name)
    if is_latent_dir(path):
        return _latent_dataset(path, resolution, split, train, random_flip, **kwargs)
    return _folder_dataset(path, resolution, frames, train, random_flip, **kwargs)


def is_image_folder(name_or_path: str | os.PathLike, frames: int | None = None) -> bool:
    """Whether :func:`build_dataset` reads ``name_or_path`` (with ``frames``) as a folder of images (so that it takes
    :class:`ImageFolderDataset`'s settings: ``upscale``, ``pad``, ``skip_bad``)."""
    key, _ = _parse_name(str(name_or_path), True)
    if key in ("fashion-mnist", "fashionmnist", "moving-fashion-mnist", "moving-fashionmnist") or frames is not None:
        return False
    path = Path(name_or_path).expanduser()
    return path.is_dir() and not is_latent_dir(path)


# The helpers' own parameters are positional-only, so that any name in ``kwargs`` reaches the dataset class.


def _parse_name(name: str, train: bool) -> tuple[str, str]:
    """(lower-case key, split): ``"fashion-mnist:fit"`` names its training split; else train or test."""
    key = name.lower().replace("_", "-")
    split = "train" if train else "test"
    if key.startswith(("fashion-mnist:", "fashionmnist:")):  # fashion-mnist:fit trains without the val images
        key, _, named_split = key.partition(":")
        split = named_split if train else split
    return key, split


def _existing_folder(name: str) -> Path:
    """``name`` as a folder; an error naming the built-ins when there is no such folder."""
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"dataset {name!r} is neither a built-in ({', '.join(BUILTIN_DATASETS)}) nor an existing "
            "folder; pass one of those names or a folder of images, clips or prepared latents"
        )
    return path


def _latent_dataset(
    path: Path, resolution: int | None, split: str, train: bool, random_flip: bool | None, /, **kwargs: Any
) -> LatentDataset:
    """A latent directory from ``dfm prepare``; ``resolution``, if given, must be its image or latent size."""
    info = read_latent_info(path)
    if resolution is not None and resolution not in (info.get("image_resolution"), info["latent_shape"][-1]):
        raise ValueError(
            f"resolution {resolution} does not match the latents in {path} (images "
            f"{info.get('image_resolution')}, latents {info['latent_shape'][-1]}); run `dfm prepare` "
            "at that resolution or drop the resolution setting"
        )
    # Without a test split, evaluation reads the training latents (the only ones there are).
    latent_split = split if split in info["splits"] else "train"
    return LatentDataset(
        path,
        split=latent_split,
        sample_posterior=train,
        random_flip=_flip(random_flip, False, train),
        **kwargs,
    )


def _folder_dataset(
    path: Path, resolution: int | None, frames: int | None, train: bool, random_flip: bool | None, /, **kwargs: Any
) -> DFMDataset:
    """A folder of clips when ``frames`` is given, else of images."""
    if resolution is None:
        raise ValueError(f"a resolution is needed for the folder {path}; pass --resolution")
    if frames is not None:
        return VideoFolderDataset(
            path,
            frames=frames,
            resolution=resolution,
            random_offset=train,
            random_flip=_flip(random_flip, False, train),
            **kwargs,
        )
    return ImageFolderDataset(path, resolution=resolution, random_flip=_flip(random_flip, True, train), **kwargs)
