"""I3D (Kinetics-400) video features for the Fréchet video distance (FVD, Unterthiner et al., 2018).

FVD is the Fréchet distance between Gaussians fitted to the 400-d I3D logits of real and generated
clips. The community-standard network is the TF-Hub I3D exported to TorchScript
(`i3d_torchscript.pt`, used by StyleGAN-V and later video papers); we load that file as is, since
its behaviour, not its parameter names, defines the metric.

Preprocessing, applied frame by frame: bilinear resize to 224x224 (no antialiasing), x -> 2x - 1;
the clip is then passed as (N, 3, T, 224, 224) with the file's own rescaling and resizing disabled.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..weights import WeightsSpec, resolve_weights, sha256_file
from .base import FeatureExtractor, FeatureOutput, Preprocessing, register_extractor

__all__ = ["I3D", "I3D_WEIGHTS"]

I3D_WEIGHTS = WeightsSpec(
    filename="i3d_torchscript.pt",
    url="https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1",
    env_var="DFM_I3D_WEIGHTS",
)


class I3D(FeatureExtractor):
    """Wraps a detector called as `detector(x, rescale=False, resize=False, return_features=True)`."""

    name = "i3d"
    feature_dim = 400
    preprocessing = Preprocessing(size=224, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
    takes_video = True

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    @torch.no_grad()
    def forward(self, videos: torch.Tensor) -> FeatureOutput:
        """videos: uint8 (N, C, T, H, W) with C in {1, 3} -> features (N, 400)."""
        if videos.ndim != 5:
            raise ValueError(f"i3d takes videos of shape (N, C, T, H, W), got {tuple(videos.shape)}")
        n, c, t, h, w = videos.shape
        device = next(self.detector.parameters()).device
        frames = videos.to(device).permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
        x = self.preprocessing(frames).reshape(n, t, 3, 224, 224).permute(0, 2, 1, 3, 4)  # (N, 3, T, 224, 224)
        features = self.detector(x, rescale=False, resize=False, return_features=True)
        return FeatureOutput(features.reshape(n, -1).float())


@register_extractor("i3d", "I3D Kinetics-400 TorchScript (FVD)", I3D_WEIGHTS.env_var)
def build_i3d(weights: str | Path | None = None, download: bool = True) -> I3D:
    path = resolve_weights("i3d", I3D_WEIGHTS, weights, download)
    with warnings.catch_warnings():
        # TorchScript is deprecated in recent torch, but it is the format the standard FVD network ships in.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            detector = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(
                f"i3d: {path} is not a TorchScript file ({first}); pass the TorchScript I3D "
                f"({I3D_WEIGHTS.filename}) with --weights i3d=PATH"
            ) from None
        model = I3D(detector)
    model.weights_path, model.weights_sha256 = str(path), sha256_file(path)
    return model
