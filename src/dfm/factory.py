"""Build the pieces of a run (decomposition, objective, schedule, model) from a :class:`~dfm.config.RunConfig`."""

from __future__ import annotations

from collections.abc import Sequence

from dfm.config import MethodConfig, RunConfig
from dfm.decomposition import Decomposition, Standardized
from dfm.methods import get_method, stage_factors
from dfm.schedule import StageSchedule

__all__ = ["make_decomposition", "make_model", "make_objective", "make_schedule", "stage_factors"]


def make_decomposition(method: MethodConfig, standardized: bool = True) -> Decomposition:
    """The run's decomposition; wrapped in :class:`Standardized` when ``method.standardize`` is on."""
    decomposition = get_method(method.method).decomposition(method)
    if standardized and method.standardize:
        if method.level_std is None:
            raise ValueError("method.standardize is on but method.level_std is unset: estimate it from data first")
        decomposition = Standardized(decomposition, method.level_std)
    return decomposition


def make_objective(method: MethodConfig, decomposition: Decomposition, total_steps: int | None = None):
    """The training objective of the run's method (DFM and Flow Matching, or one of dfm.baselines)."""
    return get_method(method.method).objective(method, decomposition, total_steps)


def make_schedule(
    method: MethodConfig, steps: Sequence[int] | None = None, thresholds: Sequence[float] | None = None
) -> StageSchedule:
    return StageSchedule(tuple(steps or method.steps), tuple(method.thresholds if thresholds is None else thresholds))


def make_model(cfg: RunConfig, sample_shape: Sequence[int], num_classes: int):
    """The DFM-DiT named by ``cfg.model`` sized for the data; the trainer does label dropout itself.

    ``model.backbone=flux|sd3``: the transformer of the diffusers directory ``model.pretrained`` converted to the
    method's stages (:func:`dfm.adapters.load_adapter`; one stage for ``fm``: the transformer unchanged), with
    LoRA and gradient checkpointing as configured."""
    method = cfg.method
    if cfg.model.backbone != "dit":
        from dfm.adapters import load_adapter

        mc = cfg.model
        return load_adapter(mc.pretrained, stage_factors(method), mc.guidance, mc.lora_rank, mc.lora_alpha,
                            mc.gradient_checkpointing, kind=mc.backbone)  # fmt: skip
    if method.precondition and method.data_std is None:
        raise ValueError(
            "method.precondition is on but method.data_std is unset: the trainer measures it from the data "
            "(or set it, one std per stage, with -o method.data_std=...)"
        )
    spec = get_method(method.method)
    in_network = spec.network_preconditioned(method)
    settings = dict(cfg.model.overrides)
    settings.update(
        input_size=tuple(sample_shape[1:]),
        in_channels=int(sample_shape[0]),
        num_classes=num_classes,
        stage_factors=stage_factors(method),
        precondition=in_network,
        data_std=method.data_std if in_network else None,
    )
    return spec.model(cfg, settings)
