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

from dfm.checkpoint import load_error_reason

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
        device = next((p.device for p in self.detector.parameters()), torch.device("cpu"))
        frames = videos.to(device).permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
        x = self.preprocessing(frames).reshape(n, t, 3, 224, 224).permute(0, 2, 1, 3, 4)  # (N, 3, T, 224, 224)
        where = getattr(self, "weights_path", "the detector")
        try:
            features = self.detector(x, rescale=False, resize=False, return_features=True)
        except (RuntimeError, TypeError, ValueError) as error:
            raise ValueError(
                f"i3d: {where} failed on a clip ({_first_line(error)}); it is not the I3D network: "
                f"pass the TorchScript I3D ({I3D_WEIGHTS.filename}) with --weights i3d=PATH"
            ) from None
        if not torch.is_tensor(features) or features.numel() != n * self.feature_dim:
            shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
            raise ValueError(f"i3d: {where} gave {shape} for {n} clip(s), not {self.feature_dim} features each; pass "
                             f"the TorchScript I3D ({I3D_WEIGHTS.filename}) with --weights i3d=PATH")  # fmt: skip
        return FeatureOutput(features.reshape(n, -1).float())


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


#: the arguments the FVD network's forward takes (StyleGAN-V's call)
I3D_ARGUMENTS = ("rescale", "resize", "return_features")


def _check_detector(detector: nn.Module, path: Path) -> None:
    """Refuse a TorchScript file whose forward does not take I3D's arguments (another network)."""
    schema = getattr(getattr(detector, "forward", None), "schema", None)
    if schema is None:
        return  # nothing to check against: the first clip tells
    names = [a.name for a in schema.arguments][1:]  # after self
    if not all(a in names for a in I3D_ARGUMENTS):
        raise ValueError(
            f"i3d: {path} is a TorchScript network, but not I3D (its forward takes {', '.join(names) or 'nothing'}, "
            f"not {', '.join(I3D_ARGUMENTS)}); pass the TorchScript I3D ({I3D_WEIGHTS.filename}) with "
            "--weights i3d=PATH"
        )


@register_extractor("i3d", "I3D Kinetics-400 TorchScript (FVD)", I3D_WEIGHTS.env_var)
def build_i3d(weights: str | Path | None = None, download: bool = True) -> I3D:
    path = resolve_weights("i3d", I3D_WEIGHTS, weights, download)
    with warnings.catch_warnings():
        # TorchScript is deprecated in recent torch, but it is the format the standard FVD network ships in.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            detector = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as error:
            raise ValueError(
                f"i3d: {path} is not a TorchScript file ({load_error_reason(error)}); pass the TorchScript I3D "
                f"({I3D_WEIGHTS.filename}) with --weights i3d=PATH"
            ) from None
        _check_detector(detector, path)
        model = I3D(detector)
    model.weights_path, model.weights_sha256 = str(path), sha256_file(path)
    return model
