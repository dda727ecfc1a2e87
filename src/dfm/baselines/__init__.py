"""The two non-trivial baselines of the DFM paper (method.md section 7), built on the same DiT backbone.

- :mod:`dfm.baselines.cascade` (a package: model, objective, sampler): two flow-matching models, low resolution
  then full resolution conditioned on the upsampled first result through concatenated tokens
  (:class:`CascadeModel`, :class:`CascadeObjective`, :func:`sample_cascade`).
- :mod:`dfm.baselines.pyramidal`: Pyramidal Flow (Jin et al. 2024), one model over a Gaussian pyramid with
  per-stage time windows and re-noising at every jump (:class:`PyramidalObjective`, :func:`sample_pyramidal`).

Flow Matching, the third baseline, is the one-stage case of :class:`dfm.DFMObjective` and needs nothing here.
Each module registers its method (:class:`Cascade`, :class:`Pyramidal`) in :mod:`dfm.methods`, with its own
settings (:class:`CascadeOptions`, :class:`PyramidalOptions`, given as ``-o method.options.KEY=VALUE``).
Both objectives have the trainer's interface (``num_stages``, ``draw(level_shapes, generator)``, ``draw[lo:hi]``,
``loss(model, x, y, draw=...)`` with ``.loss``, ``.stage_losses``, ``.stage_counts``).
"""

from dfm.baselines.cascade import (
    Cascade,
    CascadeDraw,
    CascadeModel,
    CascadeObjective,
    CascadeOptions,
    init_stage2_from_stage1,
    sample_cascade,
)
from dfm.baselines.common import StageLoss
from dfm.baselines.conditioned_dit import ConditionedDiT
from dfm.baselines.pyramidal import (
    GaussianPyramid,
    Pyramidal,
    PyramidalDraw,
    PyramidalObjective,
    PyramidalOptions,
    PyramidalPath,
    block_noise,
    sample_pyramidal,
)

__all__ = [
    "Cascade",
    "CascadeDraw",
    "CascadeModel",
    "CascadeObjective",
    "CascadeOptions",
    "ConditionedDiT",
    "GaussianPyramid",
    "Pyramidal",
    "PyramidalDraw",
    "PyramidalObjective",
    "PyramidalOptions",
    "PyramidalPath",
    "StageLoss",
    "block_noise",
    "init_stage2_from_stage1",
    "sample_cascade",
    "sample_pyramidal",
]
