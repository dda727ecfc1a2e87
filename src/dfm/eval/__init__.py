"""Evaluation: Fréchet distances (FDD, FID, ...), Inception Score, precision/recall, SWD, and `dfm eval`.

The math lives in `frechet`, `inception_score`, `precision_recall`, `swd` and `seams`; the networks in
`extractors`; `evaluate` ties them to a recorded protocol and `cli` exposes it. See docs/evaluation.md.
"""

from .clip_score import clip_score, load_clip
from .evaluate import EvalConfig, build_reference, evaluate
from .extractors import EXTRACTORS, build_extractor
from .frechet import FeatureStats, frechet_distance, sqrtm_psd
from .inception_score import inception_score
from .precision_recall import precision_recall
from .reference import ReferenceStats, load_reference, save_reference
from .seams import seam_ratio
from .swd import SWDConfig, sliced_wasserstein_distance

__all__ = [
    "EXTRACTORS",
    "EvalConfig",
    "FeatureStats",
    "ReferenceStats",
    "SWDConfig",
    "build_extractor",
    "build_reference",
    "clip_score",
    "evaluate",
    "frechet_distance",
    "inception_score",
    "load_clip",
    "load_reference",
    "precision_recall",
    "save_reference",
    "seam_ratio",
    "sliced_wasserstein_distance",
    "sqrtm_psd",
]
