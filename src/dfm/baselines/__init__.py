"""The two non-trivial baselines of the DFM paper (method.md section 7), built on the same DiT backbone.

- :mod:`dfm.baselines.cascade` (a package: model, objective, sampler): two flow-matching models, low resolution
  then full resolution conditioned on the upsampled first result through concatenated tokens
  (:class:`CascadeModel`, :class:`CascadeObjective`, :class:`CascadeSampler`).
- :mod:`dfm.baselines.pyramidal` (a package: path, objective, sampler): Pyramidal Flow (Jin et al. 2024), one model
  over a Gaussian pyramid with per-stage time windows and re-noising at every jump (:class:`PyramidalObjective`,
  :class:`PyramidalSampler`).

Flow Matching, the third baseline, is the one-stage case of :class:`dfm.DFMObjective` and needs nothing here.
Each module registers its method (:class:`Cascade`, :class:`Pyramidal`) in :mod:`dfm.methods`, with its own
settings (:class:`CascadeOptions`, :class:`PyramidalOptions`, given as ``-o method.options.KEY=VALUE``).
Both objectives have the trainer's interface (``num_stages``, ``draw(level_shapes, generator=..., step=...)``,
``draw[lo:hi]``, ``loss(model, x, y, draw=...)`` with ``.loss``, ``.stage_losses``, ``.stage_counts``), and both
samplers the contract of :class:`dfm.sampling.Sampler`.
"""

from dfm.baselines.cascade import (
    Cascade,
    CascadeDraw,
    CascadeModel,
    CascadeObjective,
    CascadeOptions,
    CascadePreconditioned,
    CascadeSampler,
    CascadeSwitch,
    init_stage2_from_stage1,
)
from dfm.baselines.conditioned_dit import ConditionedDiT
from dfm.baselines.pyramidal import (
    GaussianPyramid,
    Pyramidal,
    PyramidalDataPrediction,
    PyramidalDraw,
    PyramidalObjective,
    PyramidalOptions,
    PyramidalPath,
    PyramidalSampler,
    block_noise,
    pyramidal_coefficients,
)

__all__ = [
    "Cascade",
    "CascadeDraw",
    "CascadeModel",
    "CascadeObjective",
    "CascadeOptions",
    "CascadePreconditioned",
    "CascadeSampler",
    "CascadeSwitch",
    "ConditionedDiT",
    "GaussianPyramid",
    "Pyramidal",
    "PyramidalDataPrediction",
    "PyramidalDraw",
    "PyramidalObjective",
    "PyramidalOptions",
    "PyramidalPath",
    "PyramidalSampler",
    "block_noise",
    "init_stage2_from_stage1",
    "pyramidal_coefficients",
]
