"""Sampling from the cascade: stage 1 at low resolution, then stage 2 conditioned on it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dfm.config import SamplerConfig
from dfm.decomposition.base import _resize
from dfm.sampling import (
    Guidance,
    PreviewCallback,
    SampleOutput,
    Sampler,
    ode_step,
)
from dfm.schedule import stage_times


def _integrate(velocity, x: Tensor, times: Sequence[float], solver: str) -> Tensor:
    """Integrate dx/dt = velocity(x, t) over the grid ``times`` (from 0 to 1)."""
    for i, (t0, t1) in enumerate(zip(times[:-1], times[1:])):
        last = i == len(times) - 2
        (x,), _ = ode_step(lambda xs, t: [velocity(xs[0], t)], [x], t0, t1, [t1 - t0], solver, ends_clean=last)
    return x


class CascadeSampler(Sampler):
    """Stage 1 at low resolution, then stage 2 conditioned on ``up(t_c low + (1 - t_c) ε_c)``.

    Each stage integrates its own grid from 0 to 1 with ``settings.steps[stage]`` steps (paper: 20 + 20), uniform
    unless ``settings.time_shift`` or ``settings.shift`` warp it as they warp Flow Matching's
    (:func:`dfm.schedule.stage_times`); thresholds do not apply. A sample's stage-1, stage-2 and conditioning noise
    depend on its seed only.

    Args:
        factor: resolution factor between the stages (the model's).
        mode: the filter of ``up`` (the one the model was trained with).
        cond_noise: 1 - t_c of the conditioning image at inference (paper: 0.025).

    ``model(x, t, y, stage, cond, cond_t)`` is the cascade's velocity model (:class:`~dfm.baselines.CascadeModel`,
    or it preconditioned). The output's levels and previews are [stage-1 result, images].
    """

    grids = 2  # each model integrates to t = 1
    num_stages = 2

    uses_thresholds = False  # each stage integrates its own grid from 0 to 1

    def __init__(self, factor: int = 2, mode: str = "bilinear", cond_noise: float = 0.025) -> None:
        if not 0.0 <= cond_noise < 1.0:
            raise ValueError(f"cond_noise={cond_noise} must be in [0, 1)")
        self.factor, self.mode, self.cond_noise = int(factor), mode, float(cond_noise)

    def noise_shapes(self, shape: Sequence[int]) -> list[Sequence[int]]:
        """Stage 1's noise at low resolution, stage 2's at full resolution, the conditioning noise at low."""
        shape, factor = tuple(int(s) for s in shape), self.factor
        if shape[-2] % factor or shape[-1] % factor:
            raise ValueError(f"shape {shape} is not divisible by the cascade factor {factor}")
        low = (*shape[:-2], shape[-2] // factor, shape[-1] // factor)
        return [low, shape, low]

    def integrate(self, model: Any, noise: list[Tensor], shape: Sequence[int], guidance: Guidance,
                  settings: SamplerConfig, callback: PreviewCallback | None) -> SampleOutput:  # fmt: skip
        eps_low, eps_full, eps_cond = noise
        b = eps_full.shape[0]

        def guided(stage: int, x: Tensor, t: float, cond: Tensor | None = None, cond_t: Tensor | None = None) -> Tensor:
            # Both branches see the conditioning image; only the label differs.
            forward = lambda a, labels: [model(a[0], a[1], labels, stage, a[2], a[3])]  # noqa: E731
            t_batch = torch.full((b,), t, device=x.device)
            return guidance.velocity(forward, [x, t_batch, cond, cond_t], [guidance.scales[stage]])[0]

        size = tuple(eps_full.shape[2:])
        low = _integrate(lambda x, t: guided(0, x, t), eps_low, stage_times(0, settings, size),
                         settings.solver)  # fmt: skip
        if callback is not None:
            callback(0, low)
        t_c = 1.0 - self.cond_noise
        cond = _resize(t_c * low + (1 - t_c) * eps_cond, size, self.mode)
        cond_t = torch.full((b,), t_c, device=low.device)
        images = _integrate(lambda x, t: guided(1, x, t, cond, cond_t), eps_full,
                            stage_times(1, settings, size), settings.solver)  # fmt: skip
        if callback is not None:
            callback(1, images)
        return SampleOutput(images, [low, images], [low, images])
