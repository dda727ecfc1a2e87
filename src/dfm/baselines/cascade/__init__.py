"""The cascaded baseline of the DFM paper (method.md section 7): two flow-matching models with one backbone.

Time convention of the package: t = 0 is pure noise, t = 1 is data.

- **Stage 1** generates the low resolution ``low = down(X)`` (the DFM pyramid's filter, bilinear by default)
  with plain Flow Matching: ``x_t = t low + (1 - t) ε``, target ``low - ε``. Its patch is the fine patch divided
  by the factor, so it has the same token count as stage 2's generated half.
- **Stage 2** generates X with plain Flow Matching, conditioned on ``up(cond)`` through the concatenated tokens
  of :class:`~dfm.baselines.conditioned_dit.ConditionedDiT`. Conditioning-noise augmentation::

      cond = t_c · low + (1 - t_c) · ε_c,    t_c ~ LogitNormal(cond_loc, cond_scale) = LogitNormal(1.5, 1)

  (noised at low resolution, then upsampled; t_c enters through its own timestep embedder). At inference the
  stage-1 sample is used with ``t_c = 1 - cond_noise``, ``cond_noise = 0.025``.
- **Training split**: stage 1 trains for the first ``switch_step`` optimiser steps (about 80% of them), then
  stage 2 is initialised from the stage-1 weights (every tensor whose name and shape match; the patch embeddings
  and the head are "lifted" from patch p/f to p, see :func:`init_stage2_from_stage1`) and trains for the rest.
  Both models live in one :class:`CascadeModel`, so checkpoints, EMA and resume need nothing new; the method's
  training callback :class:`CascadeSwitch` does the switch in the model and its EMA.
- **Sampling**: 20 + 20 Euler steps by default; classifier-free guidance on both stages; the stage-1 result
  (at low resolution) is the preview.

Both stages draw their times from LogitNormal(main_loc, main_scale) = LogitNormal(0, 1), as the Flow Matching
baseline does.

Preconditioning: each stage's network on its own path, with the data std of its level
(:class:`CascadePreconditioned`).

Modules: :mod:`~dfm.baselines.cascade.model` (the two models, IO, weight surgery and preconditioning),
:mod:`~dfm.baselines.cascade.objective` (training), :mod:`~dfm.baselines.cascade.sampler` (sampling); this
module holds the method's registry entry (:class:`Cascade`, with its settings :class:`CascadeOptions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from dfm.baselines.cascade.model import (
    CASCADE_CONFIG,
    MODEL_TYPE,
    CascadeModel,
    CascadePreconditioned,
    init_stage2_from_stage1,
)
from dfm.baselines.cascade.objective import CascadeDraw, CascadeObjective, CascadePathSample, CascadeSwitch
from dfm.baselines.cascade.sampler import CascadeSampler
from dfm.config import MethodConfig, RunConfig
from dfm.decomposition import Decomposition, downsample
from dfm.methods import Method, TrainingCallback, register_method, stage_factors, staged_baseline

__all__ = [
    "CASCADE_CONFIG",
    "MODEL_TYPE",
    "Cascade",
    "CascadeDraw",
    "CascadeModel",
    "CascadeObjective",
    "CascadeOptions",
    "CascadePathSample",
    "CascadePreconditioned",
    "CascadeSampler",
    "CascadeSwitch",
    "init_stage2_from_stage1",
]


@dataclass
class CascadeOptions:
    """The cascade's own settings (``-o method.options.KEY=VALUE``)."""

    stage1_fraction: float = 0.8  #: share of the optimiser steps that train stage 1 (paper: ~80%)
    switch_step: int | None = None  #: first stage-2 step; None = round(stage1_fraction * train.steps), then saved
    cond_loc: float = 1.5  #: conditioning level t_c ~ LogitNormal(cond_loc, cond_scale) (paper: 1.5, 1)
    cond_scale: float = 1.0
    cond_noise: float = 0.025  #: 1 - t_c at inference (paper: 0.025)


class Cascade(Method):
    """Two models, low resolution then full resolution conditioned on the first's upsampled result."""

    name = "cascade"
    description = "a two-model cascade: low resolution, then full resolution conditioned on it"
    Options = CascadeOptions
    decided_at_start = ("switch_step",)
    unused_parameters = True  # it trains one of its two models at a time
    supports_fsdp = False  # it copies weights between its models at the switch
    predictions = ("velocity",)  # its own preconditioning (CascadePreconditioned)
    uses_stage_probs = False  # its schedule is method.options.stage1_fraction / switch_step
    uses_thresholds = CascadeSampler.uses_thresholds  # its sampler's (each stage runs its own grid)

    def validate(self, cfg: RunConfig) -> None:
        m = cfg.method
        if m.stages != 2:
            raise ValueError("method cascade has two stages (low resolution, then full): set method.stages=2")
        if m.standardize or m.decomposition != "laplacian":
            raise ValueError("method cascade has its own pyramid: leave method.decomposition and standardize alone")
        if m.loss_weighting != "velocity":
            raise ValueError("method cascade trains with the velocity loss: set method.loss_weighting=velocity")

    def num_data_std(self, m: MethodConfig) -> int:
        return 2  # its low-resolution model, then the full one

    def from_dfm(self, cfg: RunConfig) -> RunConfig:
        return staged_baseline(cfg, self.name)

    def objective(self, m: MethodConfig, decomposition: Decomposition, total_steps: int | None = None) -> Any:
        opts = self.options(m)
        switch = opts.switch_step
        if switch is None:
            if total_steps is None:
                raise ValueError("the cascade needs method.options.switch_step or the total number of steps")
            switch = round(opts.stage1_fraction * total_steps)
        return CascadeObjective(
            switch, stage_factors(m)[0], m.resample, m.main_loc, m.main_scale, opts.cond_loc, opts.cond_scale
        )

    def decide_at_start(self, m: MethodConfig, objective: Any) -> None:
        m.options["switch_step"] = objective.switch_step

    def callbacks(self, m: MethodConfig, objective: Any) -> list[TrainingCallback]:
        return [CascadeSwitch(objective.switch_step)]

    def measure_data_std(self, m: MethodConfig, decomposition: Decomposition, x: Tensor) -> tuple[float, ...]:
        f = stage_factors(m)[0]
        low = downsample(x, (*x.shape[2:-2], x.shape[-2] // f, x.shape[-1] // f), m.resample)
        return float(low.float().std()), float(x.float().std())

    def network(self, cfg: RunConfig, sample_shape: Sequence[int], num_classes: int) -> nn.Module:
        # stage 2 is the one-stage model; stage 1 is derived from it
        settings = {**self.network_settings(cfg, sample_shape, num_classes), "stage_factors": (1,)}
        config = self.dit_config(cfg, settings)
        return CascadeModel.from_config(config, stage_factors(cfg.method)[0], cfg.method.resample)

    def preconditioned(self, network: Any, m: MethodConfig) -> Any:
        return CascadePreconditioned(network, m.data_std)

    def load_network(self, path: Path, cfg: RunConfig, format1: bool = False) -> nn.Module:
        return CascadeModel.from_pretrained(path, format1=format1)

    def sampler(self, m: MethodConfig) -> CascadeSampler:
        return CascadeSampler(stage_factors(m)[0], m.resample, self.options(m).cond_noise)


register_method(Cascade())
