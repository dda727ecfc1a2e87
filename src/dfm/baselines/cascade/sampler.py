"""Sampling from the cascade: stage 1 at low resolution, then stage 2 conditioned on it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dfm.baselines.cascade.model import CascadeModel
from dfm.decomposition import _resize
from dfm.sampling import (
    SOLVERS,
    PreviewCallback,
    SampleOutput,
    guided_velocity,
    initial_noise,
    ode_step,
    prepare_guidance,
)


def _integrate(velocity, x: Tensor, steps: int, solver: str) -> Tensor:
    """Integrate dx/dt = velocity(x, t) from t = 0 to 1 on a uniform grid of ``steps`` steps."""
    for i in range(steps):
        t0, t1 = i / steps, (i + 1) / steps
        last = i == steps - 1
        (x,), _ = ode_step(lambda xs, t: [velocity(xs[0], t)], [x], t0, t1, [t1 - t0], solver, ends_clean=last)
    return x


@torch.no_grad()
def sample_cascade(
    model: CascadeModel,
    shape: Sequence[int],
    y: Tensor | None = None,
    *,
    steps: Sequence[int] = (20, 20),
    cond_noise: float = 0.025,
    mode: str | None = None,
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    guidance: float | Sequence[float] = 1.0,
    null_class: int | None = None,
    solver: str = "euler",
    device: torch.device | str | None = None,
    callback: PreviewCallback | None = None,
) -> SampleOutput:
    """Generate with stage 1 at low resolution, then stage 2 conditioned on ``up(t_c low + (1 - t_c) ε_c)``.

    Args:
        model: a :class:`CascadeModel` (or any callable with its ``forward`` signature and ``factor``).
        shape: full-resolution output shape (B, C, H, W) or (B, C, T, H, W).
        steps: (stage-1 steps, stage-2 steps); paper: 20 + 20.
        cond_noise: 1 - t_c of the conditioning image at inference (paper: 0.025).
        mode: the filter of ``up``; default ``model.mode`` (the one it was trained with).
        seeds: one seed per sample (its stage-1, stage-2 and conditioning noise depend on it only).
        guidance: classifier-free guidance scale, one for both stages or one per stage.
        callback: ``callback(stage, preview)`` after each stage.

    Returns:
        ``SampleOutput``: images, levels = [stage-1 result, images], previews = [stage-1 result, images].
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: choose one of {SOLVERS}")
    if len(steps) != 2 or any(int(n) < 1 for n in steps):
        raise ValueError(f"steps={tuple(steps)} needs two positive step counts (stage 1, stage 2)")
    if not 0.0 <= cond_noise < 1.0:
        raise ValueError(f"cond_noise={cond_noise} must be in [0, 1)")
    factor = int(getattr(model, "factor", 2))
    mode = mode or getattr(model, "mode", "bilinear")
    shape = tuple(int(s) for s in shape)
    if shape[-2] % factor or shape[-1] % factor:
        raise ValueError(f"shape {shape} is not divisible by the cascade factor {factor}")
    low_shape = (*shape[:-2], shape[-2] // factor, shape[-1] // factor)
    b = shape[0]
    scales, use_cfg, null_class, y = prepare_guidance(model, y, b, guidance, 2, null_class, device)
    eps_low, eps_full, eps_cond = initial_noise([low_shape, shape, low_shape], seeds, generator, device)

    def guided(stage: int, x: Tensor, t: float, cond: Tensor | None = None, cond_t: Tensor | None = None) -> Tensor:
        # Both branches see the conditioning image; only the label differs.
        forward = lambda a, labels: [model(a[0], a[1], labels, stage, a[2], a[3])]  # noqa: E731
        w = [scales[stage] if use_cfg else 1.0]
        return guided_velocity(forward, [x, torch.full((b,), t, device=x.device), cond, cond_t], y, w, null_class)[0]

    low = _integrate(lambda x, t: guided(0, x, t), eps_low.float(), int(steps[0]), solver)
    if callback is not None:
        callback(0, low)
    t_c = 1.0 - cond_noise
    cond = _resize(t_c * low + (1 - t_c) * eps_cond.float(), tuple(shape[2:]), mode)
    cond_t = torch.full((b,), t_c, device=low.device)
    images = _integrate(lambda x, t: guided(1, x, t, cond, cond_t), eps_full.float(), int(steps[1]), solver)
    if callback is not None:
        callback(1, images)
    return SampleOutput(images, [low, images], [low, images])
