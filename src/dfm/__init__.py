"""Decomposable Flow Matching (DFM): progressive coarse-to-fine generation with one model.

Time convention for the whole package: t = 0 is pure noise, t = 1 is data (see :mod:`dfm.objective`).
Stage indices in tensors are 0-based: index 0 is the coarsest stage (stage 1 of the paper).

The names below are imported on first use, so that ``import dfm.config`` (plain data) does not load the rest.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "RunConfig": "dfm.config",
    "SamplerConfig": "dfm.config",
    "DCTBands": "dfm.decomposition",
    "Decomposition": "dfm.decomposition",
    "HaarWavelet": "dfm.decomposition",
    "Identity": "dfm.decomposition",
    "LaplacianPyramid": "dfm.decomposition",
    "Standardized": "dfm.decomposition",
    "build_decomposition": "dfm.decomposition",
    "estimate_level_std": "dfm.decomposition",
    "DFMObjective": "dfm.objective",
    "LossOutput": "dfm.objective",
    "PathDraw": "dfm.objective",
    "PathSample": "dfm.objective",
    "default_stage_probs": "dfm.objective",
    "SampleOutput": "dfm.sampling",
    "Sampler": "dfm.sampling",
    "StageSampler": "dfm.sampling",
    "initial_noise": "dfm.sampling",
    "StageSchedule": "dfm.schedule",
    "Run": "dfm.run",
    "Generator": "dfm.generate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dfm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
