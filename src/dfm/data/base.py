"""The interface every ``dfm`` dataset offers to the trainer.

Items are ``(x, y)``: ``x`` a float32 tensor in model space (pixels in [-1, 1], or normalised VAE
latents), shaped ``(C, H, W)`` for images and ``(C, T, H, W)`` for videos; ``y`` a scalar int64
class label. Besides ``__getitem__`` a dataset describes itself (``num_classes``, ``channels``,
``sample_shape`` ...) so that the trainer can build a model without knowing where data came from,
and offers ``get_batch`` (vectorised where the data sit in memory). Datasets that hold the whole
split as one tensor (Fashion-MNIST) also offer ``tensors()``; the others do not, on purpose: for
them it would mean decoding every file (folders) or freezing the random latent draw (latents).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

__all__ = ["DFMDataset", "random_hflip", "to_model_range"]


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels in [0, 255] to float32 in [-1, 1]: ``x / 127.5 - 1``."""
    return x.to(torch.float32).div_(127.5).sub_(1.0)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Flip each sample of a batch left-right with probability ``p`` (the last axis is width).

    Works for images ``(B, C, H, W)`` and videos ``(B, C, T, H, W)`` alike; returns a new tensor.
    """
    flip = torch.rand(x.shape[0], generator=generator) < p
    out = x.clone()
    if flip.any():
        out[flip] = x[flip].flip(-1)
    return out


class DFMDataset(Dataset):
    """Base class: a labelled dataset that describes its samples.

    Attributes set by subclasses:
        num_classes: number of class labels (labels are ``0 .. num_classes - 1``).
        class_names: one readable name per label.
        sample_shape: shape of one ``x``: ``(C, H, W)`` or ``(C, T, H, W)``.
        vae_path: where the VAE that decodes ``x`` lives (a directory or hub id), or ``None`` for
            pixel-space data.
        latent_shift, latent_scale: the normalisation ``x = (z - shift) * scale`` applied to VAE
            latents (``0`` and ``1`` for pixel data); decode with ``z = x / scale + shift``.
        padding: pixels of background the data set adds on every side of its images (0 by default); saved
            samples drop them again so that they compare with the real images at their native size.
    """

    num_classes: int
    class_names: list[str]
    sample_shape: tuple[int, ...]
    vae_path: str | None = None
    latent_shift: float = 0.0
    latent_scale: float = 1.0
    padding: int = 0

    @property
    def channels(self) -> int:
        """Channels of one sample (1 for grey images, 3 for RGB, the VAE's latent channels ...)."""
        return self.sample_shape[0]

    @property
    def resolution(self) -> int:
        """Spatial size (height = width) of one sample, in model space (latent pixels for latents)."""
        return self.sample_shape[-1]

    @property
    def frames(self) -> int | None:
        """Number of frames for video samples, ``None`` for images."""
        return self.sample_shape[1] if len(self.sample_shape) == 4 else None

    @property
    def is_video(self) -> bool:
        return len(self.sample_shape) == 4

    @property
    def needs_vae(self) -> bool:
        """True when samples are VAE latents that must be decoded to be seen."""
        return self.vae_path is not None

    def __len__(self) -> int:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def load(
        self, index: int, augment: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - every subclass defines it
        """Return item ``index``; ``augment=False`` turns off the dataset's random augmentation."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.load(index)

    def get_batch(
        self, indices: torch.Tensor, generator: torch.Generator | None = None, augment: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x (B, *sample_shape), y (B,))`` for ``indices``.

        The default stacks ``load``; subclasses whose data sit in memory override it with a
        vectorised version. Random augmentation (flips, latent sampling) draws from ``generator``.
        """
        items = [self.load(int(i), augment=augment, generator=generator) for i in indices]
        x = torch.stack([item[0] for item in items])
        y = torch.stack([torch.as_tensor(item[1], dtype=torch.long) for item in items])
        return x, y
