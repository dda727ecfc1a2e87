"""Feature extractor interface, input preprocessing, and the name -> extractor registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Preprocessing", "FeatureExtractor", "EXTRACTORS", "register_extractor", "build_extractor"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How uint8 images (N, C, H, W) become network input.

        x = resize(x / 255, size, interpolation) ;  x = (x - mean) / std   per channel

    `channels` converts grey <-> RGB first (RGB -> grey is the ITU-R 601 luma). `pil_like` makes the
    resize behave like PIL's on uint8 images (what torchvision transforms on PIL images do): clip to
    [0, 1] (bicubic overshoots) and round to the 256 uint8 levels. With `antialias=True`, torch's
    bicubic kernel is PIL's (a = -0.5), so the result matches PIL to about one grey level.
    """

    size: int
    interpolation: str = "bilinear"
    antialias: bool = False
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    channels: int = 3
    pil_like: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and self.channels == 1:
            x = (x * x.new_tensor([0.299, 0.587, 0.114])[None, :, None, None]).sum(1, keepdim=True)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            align = False if self.interpolation in ("bilinear", "bicubic") else None
            x = F.interpolate(
                x, size=(self.size, self.size), mode=self.interpolation, align_corners=align, antialias=self.antialias
            )
        if self.pil_like:
            x = (x.clamp(0.0, 1.0) * 255.0).round() / 255.0
        mean = x.new_tensor(self.mean)[None, :, None, None]
        std = x.new_tensor(self.std)[None, :, None, None]
        return (x - mean) / std


@dataclass
class FeatureOutput:
    features: torch.Tensor  # (N, feature_dim)
    logits: torch.Tensor | None = None  # (N, num_classes) where the network has a classifier


class FeatureExtractor(nn.Module):
    """A frozen network that maps uint8 images (N, C, H, W) to features (and logits if it has them).

    Subclasses set `name`, `feature_dim`, `num_classes` and `preprocessing`, and implement
    `features_and_logits(x)` on preprocessed input.
    """

    name: str = ""
    feature_dim: int = 0
    num_classes: int | None = None
    preprocessing: Preprocessing
    weights_path: str | None = None
    weights_sha256: str | None = None
    takes_video: bool = False  # inputs are clips (N, C, T, H, W) rather than images
    # Convolutional networks run about 2x faster on CPU in channels-last layout (oneDNN's depthwise and 1x1
    # kernels); the features agree with NCHW to float rounding.
    channels_last: bool = False

    def features_and_logits(self, x: torch.Tensor) -> FeatureOutput:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> FeatureOutput:
        device = next(self.parameters()).device
        x = self.preprocessing(images.to(device))
        if self.channels_last:  # the weights are converted once, by build_extractor
            x = x.contiguous(memory_format=torch.channels_last)
        return self.features_and_logits(x)

    def describe(self) -> dict:
        """The protocol entry for this extractor: name, weights, preprocessing, feature dim."""
        return {
            "name": self.name,
            "feature_dim": self.feature_dim,
            "weights": self.weights_path,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing.to_dict(),
        }


@dataclass(frozen=True)
class ExtractorEntry:
    builder: Callable[..., FeatureExtractor]
    description: str
    env_var: str | None = None
    extra: dict = field(default_factory=dict)


EXTRACTORS: dict[str, ExtractorEntry] = {}


def register_extractor(name: str, description: str, env_var: str | None = None):
    def wrap(builder: Callable[..., FeatureExtractor]) -> Callable[..., FeatureExtractor]:
        EXTRACTORS[name] = ExtractorEntry(builder, description, env_var)
        return builder

    return wrap


def build_extractor(
    name: str, weights: str | Path | None = None, device: str | torch.device = "cpu", download: bool = True
) -> FeatureExtractor:
    """Build a registered extractor with its weights, frozen, in eval mode, on `device`."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; choose one of {', '.join(sorted(EXTRACTORS))}")
    extractor = EXTRACTORS[name].builder(weights=weights, download=download)
    extractor.requires_grad_(False)
    if extractor.channels_last:
        extractor.to(memory_format=torch.channels_last)
    return extractor.eval().to(device)
