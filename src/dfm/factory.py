"""Build the pieces of a run (decomposition, objective, schedule, model) from a :class:`~dfm.config.RunConfig`."""

from __future__ import annotations

import math
from collections.abc import Sequence

from dfm.config import MethodConfig, RunConfig
from dfm.decomposition import Decomposition, Standardized, build_decomposition
from dfm.objective import DFMObjective
from dfm.schedule import StageSchedule


def make_decomposition(method: MethodConfig, standardized: bool = True) -> Decomposition:
    """The run's decomposition; wrapped in :class:`Standardized` when ``method.standardize`` is on."""
    name = "identity" if method.method == "fm" else method.decomposition
    decomposition = build_decomposition(name, method.stages, method.factors, method.temporal_factors, method.resample)
    if standardized and method.standardize:
        if method.level_std is None:
            raise ValueError("method.standardize is on but method.level_std is unset: estimate it from data first")
        decomposition = Standardized(decomposition, method.level_std)
    return decomposition


def make_objective(method: MethodConfig, decomposition: Decomposition) -> DFMObjective:
    return DFMObjective(
        decomposition,
        stage_probs=method.stage_probs,
        main_loc=method.main_loc,
        main_scale=method.main_scale,
        prev_loc=method.prev_loc,
        prev_scale=method.prev_scale,
        tied=method.tied,
    )


def make_schedule(
    method: MethodConfig, steps: Sequence[int] | None = None, thresholds: Sequence[float] | None = None
) -> StageSchedule:
    return StageSchedule(tuple(steps or method.steps), tuple(method.thresholds if thresholds is None else thresholds))


def stage_factors(method: MethodConfig) -> tuple[int, ...]:
    """Resolution factor of every stage relative to the finest, coarse to fine (what the model needs)."""
    if method.method == "fm" or method.stages == 1:
        return (1,)
    factors = method.factors or (2,) * (method.stages - 1)
    if isinstance(factors, int):
        factors = (factors,) * (method.stages - 1)
    return tuple(math.prod(factors[i:]) for i in range(len(factors))) + (1,)


def make_model(cfg: RunConfig, sample_shape: Sequence[int], num_classes: int):
    """The DFM-DiT named by ``cfg.model`` sized for the data; the trainer does label dropout itself."""
    from dfm.models import create_model

    overrides = dict(cfg.model.overrides)
    overrides.update(
        input_size=tuple(sample_shape[1:]),
        in_channels=int(sample_shape[0]),
        num_classes=num_classes,
        stage_factors=stage_factors(cfg.method),
        class_dropout=0.0,
    )
    return create_model(cfg.model.name, **overrides)
