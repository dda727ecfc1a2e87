"""Decomposable Flow Matching (DFM): progressive coarse-to-fine generation with one model.

Time convention for the whole package: t = 0 is pure noise, t = 1 is data (see :mod:`dfm.objective`).
Stage indices in tensors are 0-based: index 0 is the coarsest stage (stage 1 of the paper).
"""

from dfm.decomposition import (
    DCTBands,
    Decomposition,
    HaarWavelet,
    Identity,
    LaplacianPyramid,
    Standardized,
    build_decomposition,
    estimate_level_std,
)
from dfm.objective import DFMObjective, LossOutput, PathDraw, PathSample, default_stage_probs
from dfm.sampling import SampleOutput, initial_noise, sample
from dfm.schedule import StageSchedule

__version__ = "0.1.0"

__all__ = [
    "DCTBands",
    "Decomposition",
    "DFMObjective",
    "HaarWavelet",
    "Identity",
    "LaplacianPyramid",
    "LossOutput",
    "PathDraw",
    "PathSample",
    "SampleOutput",
    "StageSchedule",
    "Standardized",
    "build_decomposition",
    "default_stage_probs",
    "estimate_level_std",
    "initial_noise",
    "sample",
]
