"""Sampling from the cascade: stage 1 at low resolution, then stage 2 conditioned on it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dfm.config import SamplerConfig
from dfm.decomposition.base import _resize
from dfm.sampling import (
    PreviewCallback,
    SampleOutput,
    Sampler,
    guided_velocity,
    initial_noise,
    ode_step,
    prepare_guidance,
)
from dfm.text import TextCondition


def _integrate(velocity, x: Tensor, steps: int, solver: str) -> Tensor:
    """Integrate dx/dt = velocity(x, t) from t = 0 to 1 on a uniform grid of ``steps`` steps."""
    for i in range(steps):
        t0, t1 = i / steps, (i + 1) / steps
        last = i == steps - 1
        (x,), _ = ode_step(lambda xs, t: [velocity(xs[0], t)], [x], t0, t1, [t1 - t0], solver, ends_clean=last)
    return x


class CascadeSampler(Sampler):
    """Stage 1 at low resolution, then stage 2 conditioned on ``up(t_c low + (1 - t_c) ε_c)``.

    Each stage integrates its own uniform grid from 0 to 1 with ``settings.steps[stage]`` steps (paper: 20 + 20);
    thresholds do not apply. A sample's stage-1, stage-2 and conditioning noise depend on its seed only.

    Args:
        factor: resolution factor between the stages (the model's).
        mode: the filter of ``up`` (the one the model was trained with).
        cond_noise: 1 - t_c of the conditioning image at inference (paper: 0.025).

    ``model(x, t, y, stage, cond, cond_t)`` is the cascade's velocity model (:class:`~dfm.baselines.CascadeModel`,
    or it preconditioned). The output's levels and previews are [stage-1 result, images].
    """

    grids = 2  # each model integrates to t = 1

    def __init__(self, factor: int = 2, mode: str = "bilinear", cond_noise: float = 0.025) -> None:
        if not 0.0 <= cond_noise < 1.0:
            raise ValueError(f"cond_noise={cond_noise} must be in [0, 1)")
        self.factor, self.mode, self.cond_noise = int(factor), mode, float(cond_noise)

    @torch.no_grad()
    def sample(
        self,
        model: Any,
        shape: Sequence[int],
        y: Tensor | TextCondition | None = None,
        *,
        settings: SamplerConfig,
        seeds: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        noise: Sequence[Tensor] | None = None,
        null_class: int | TextCondition | None = None,
        device: torch.device | str | None = None,
        callback: PreviewCallback | None = None,
    ) -> SampleOutput:
        settings.validate(2)
        factor, steps = self.factor, settings.steps
        shape = tuple(int(s) for s in shape)
        if shape[-2] % factor or shape[-1] % factor:
            raise ValueError(f"shape {shape} is not divisible by the cascade factor {factor}")
        low_shape = (*shape[:-2], shape[-2] // factor, shape[-1] // factor)
        b = shape[0]
        scales, null_class, y = prepare_guidance(model, y, b, settings.stage_guidance(2), null_class, device)
        if noise is None:
            noise = initial_noise([low_shape, shape, low_shape], seeds, generator, device)
        eps_low, eps_full, eps_cond = (n.to(device) for n in noise)

        def guided(stage: int, x: Tensor, t: float, cond: Tensor | None = None, cond_t: Tensor | None = None) -> Tensor:
            # Both branches see the conditioning image; only the label differs.
            forward = lambda a, labels: [model(a[0], a[1], labels, stage, a[2], a[3])]  # noqa: E731
            t_batch = torch.full((b,), t, device=x.device)
            return guided_velocity(forward, [x, t_batch, cond, cond_t], y, [scales[stage]], null_class)[0]

        low = _integrate(lambda x, t: guided(0, x, t), eps_low.float(), int(steps[0]), settings.solver)
        if callback is not None:
            callback(0, low)
        t_c = 1.0 - self.cond_noise
        cond = _resize(t_c * low + (1 - t_c) * eps_cond.float(), tuple(shape[2:]), self.mode)
        cond_t = torch.full((b,), t_c, device=low.device)
        images = _integrate(lambda x, t: guided(1, x, t, cond, cond_t), eps_full.float(), int(steps[1]),
                            settings.solver)  # fmt: skip
        if callback is not None:
            callback(1, images)
        return SampleOutput(images, [low, images], [low, images])
