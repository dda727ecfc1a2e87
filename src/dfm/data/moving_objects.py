"""Moving Fashion-MNIST: a small synthetic video dataset made on the fly.

Each clip shows ``objects`` Fashion-MNIST items gliding at constant speed across a black frame and
bouncing off its walls (the Moving MNIST recipe of Srivastava et al. 2015 with clothes). Clip ``i``
is generated from its own seed, derived from ``(seed, i)``, so it is identical every time it is
read and no frames are stored. The label of a clip is the class of its first object.

Items are ``(x float32 (1, T, H, W) in [-1, 1], y int64)``. Items are scaled with the frame: at the
default 64x64 they keep their native 28x28, at 32x32 they are 14x14.

Example:
    >>> ds = MovingFashionMNIST(num_clips=1000, frames=8, size=32)    # doctest: +SKIP
    >>> x, y = ds[0]; x.shape                                         # doctest: +SKIP
    torch.Size([1, 8, 32, 32])
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dfm.data.base import DFMDataset
from dfm.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist

__all__ = ["MovingFashionMNIST", "Trajectory"]


@dataclass(frozen=True)
class Trajectory:
    """Where the objects of one clip are.

    Attributes:
        image_indices: index of each object's image in the Fashion-MNIST split, ``(objects,)``.
        positions: top-left corner ``(row, col)`` of each object in each frame, integer pixels,
            ``(T, objects, 2)``; always within ``[0, size - object_size]``.
        object_size: side of the (square) object in pixels.
    """

    image_indices: np.ndarray
    positions: np.ndarray
    object_size: int


class MovingFashionMNIST(DFMDataset):
    """Clips of Fashion-MNIST items that move and bounce inside a larger frame.

    Args:
        num_clips: length of the dataset (clips are made on demand, so any number costs nothing).
        frames: frames per clip ``T``.
        size: frame height and width.
        objects: items per clip.
        seed: base seed; clip ``i`` uses a generator seeded with ``(seed, i)``.
        split: which Fashion-MNIST split the items come from (``"train"`` or ``"test"``).
        object_size: side of each item; default ``round(size * 28 / 64)`` (native at 64x64).
        speed: range of speeds in pixels per frame at 64x64, scaled with ``size``.
        root, download: where to find Fashion-MNIST (see ``load_fashion_mnist``).
    """

    def __init__(
        self,
        num_clips: int,
        frames: int = 16,
        size: int = 64,
        objects: int = 1,
        seed: int = 0,
        split: str = "train",
        object_size: int | None = None,
        speed: tuple[float, float] = (2.0, 4.0),
        root: str | os.PathLike | None = None,
        download: bool = False,
    ) -> None:
        if num_clips < 1:
            raise ValueError(f"num_clips={num_clips} must be at least 1")
        if frames < 1:
            raise ValueError(f"frames={frames} must be at least 1")
        if objects < 1:
            raise ValueError(f"objects={objects} must be at least 1")
        object_size = round(size * 28 / 64) if object_size is None else object_size
        if not 1 <= object_size <= size:
            raise ValueError(
                f"object_size={object_size} does not fit in a {size}x{size} frame; use 1..{size} (or a larger size)"
            )
        if not 0 <= speed[0] <= speed[1]:
            raise ValueError(f"speed={speed} must be a range (low, high) with 0 <= low <= high")
        self.num_clips = num_clips
        self.seed = seed
        self.split = split
        self.objects = objects
        self.object_size = object_size
        self.speed = (speed[0] * size / 64, speed[1] * size / 64)
        self.images, self.labels = load_fashion_mnist(root, split, download)
        self.num_classes = len(CLASS_NAMES)
        self.class_names = list(CLASS_NAMES)
        self.sample_shape = (1, frames, size, size)

    def __len__(self) -> int:
        return self.num_clips

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.num_clips:
            raise IndexError(f"clip index {index} is out of range for {self.num_clips} clips")
        return np.random.default_rng((self.seed, index))

    def trajectory(self, index: int) -> Trajectory:
        """The image choice and per-frame positions of clip ``index`` (no rendering)."""
        rng = self._rng(index)
        frames, size = self.sample_shape[1], self.sample_shape[-1]
        room = float(size - self.object_size)
        image_indices = rng.integers(0, self.images.shape[0], size=self.objects)
        position = rng.uniform(0.0, room, size=(self.objects, 2))
        angle = rng.uniform(0.0, 2 * np.pi, size=self.objects)
        # A step longer than the room could jump past a wall and back; cap it so one reflection suffices.
        speed = np.minimum(rng.uniform(*self.speed, size=self.objects), room)
        velocity = np.stack([np.sin(angle), np.cos(angle)], axis=1) * speed[:, None]
        positions = np.empty((frames, self.objects, 2))
        for t in range(frames):
            positions[t] = position
            position = position + velocity
            low, high = position < 0, position > room
            position = np.where(low, -position, np.where(high, 2 * room - position, position))
            velocity = np.where(low | high, -velocity, velocity)
        positions = np.clip(np.rint(positions), 0, room).astype(np.int64)
        return Trajectory(image_indices=image_indices, positions=positions, object_size=self.object_size)

    def _objects(self, image_indices: np.ndarray) -> torch.Tensor:
        sprites = self.images[torch.from_numpy(image_indices)].to(torch.float32).div(255.0).unsqueeze(1)
        if self.object_size != sprites.shape[-1]:
            sprites = F.interpolate(
                sprites, size=(self.object_size,) * 2, mode="bilinear", align_corners=False, antialias=True
            ).clamp_(0.0, 1.0)
        return sprites[:, 0]  # (objects, s, s) in [0, 1]

    def load(
        self, index: int, augment: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        track = self.trajectory(index)
        sprites = self._objects(track.image_indices)
        frames, size, s = self.sample_shape[1], self.sample_shape[-1], self.object_size
        video = torch.zeros(frames, size, size)
        for t in range(frames):
            for k, (row, col) in enumerate(track.positions[t]):
                window = video[t, row : row + s, col : col + s]
                torch.maximum(window, sprites[k], out=window)  # overlapping items: the brighter wins
        x = video.mul_(2.0).sub_(1.0).unsqueeze(0)  # (1, T, H, W)
        return x, self.labels[int(track.image_indices[0])].clone()
