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
    if method.method == "pyramidal":  # a Gaussian pyramid: downsampled images, not residuals
        from dfm.baselines import GaussianPyramid

        return GaussianPyramid(method.stages, method.factors)
    name = "identity" if method.method == "fm" else method.decomposition
    decomposition = build_decomposition(name, method.stages, method.factors, method.temporal_factors, method.resample)
    if standardized and method.standardize:
        if method.level_std is None:
            raise ValueError("method.standardize is on but method.level_std is unset: estimate it from data first")
        decomposition = Standardized(decomposition, method.level_std)
    return decomposition


def make_objective(method: MethodConfig, decomposition: Decomposition, total_steps: int | None = None):
    """The training objective: DFM (and Flow Matching), or one of the baselines of dfm.baselines."""
    if method.method == "cascade":
        from dfm.baselines import CascadeObjective

        switch = method.cascade_switch_step
        if switch is None:
            if total_steps is None:
                raise ValueError("the cascade needs method.cascade_switch_step or the total number of steps")
            switch = round(method.cascade_stage1_fraction * total_steps)
        return CascadeObjective(
            switch, stage_factors(method)[0], method.resample, method.main_loc, method.main_scale,
            method.cond_loc, method.cond_scale,
        )  # fmt: skip
    if method.method == "pyramidal":
        from dfm.baselines import PyramidalObjective

        return PyramidalObjective(make_pyramidal_path(method, decomposition), method.pyramid_time,
                                  method.main_loc, method.main_scale,
                                  method.data_std if method.precondition else None)  # fmt: skip
    return DFMObjective(
        decomposition,
        loss_weighting=method.loss_weighting,
        data_std=method.data_std,
        stage_probs=method.stage_probs,
        main_loc=method.main_loc,
        main_scale=method.main_scale,
        prev_loc=method.prev_loc,
        prev_scale=method.prev_scale,
        tied=method.tied,
    )


def make_pyramidal_path(method: MethodConfig, decomposition: Decomposition):
    from dfm.baselines import PyramidalPath

    return PyramidalPath(decomposition, method.pyramid_windows, method.pyramid_gamma)


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
    from dfm.models import create_config, create_model

    method = cfg.method
    if method.precondition and method.data_std is None:
        raise ValueError(
            "method.precondition is on but method.data_std is unset: the trainer measures it from the data "
            "(or set it, one std per stage, with -o method.data_std=...)"
        )
    # Pyramidal Flow's preconditioning belongs to its path (PyramidalPreconditioning), not to the network.
    in_network = method.precondition and method.method != "pyramidal"
    overrides = dict(cfg.model.overrides)
    overrides.update(
        input_size=tuple(sample_shape[1:]),
        in_channels=int(sample_shape[0]),
        num_classes=num_classes,
        stage_factors=stage_factors(method),
        class_dropout=0.0,
        precondition=in_network,
        data_std=method.data_std if in_network else None,
    )
    if method.method == "cascade":  # stage 2 is the one-stage model; stage 1 is derived from it
        from dfm.baselines import CascadeModel

        std = overrides["data_std"]
        overrides.update(stage_factors=(1,), data_std=std and std[1:])
        config = create_config(cfg.model.name, **overrides)
        return CascadeModel.from_config(config, stage_factors(method)[0], method.resample, std and std[0])
    return create_model(cfg.model.name, **overrides)
