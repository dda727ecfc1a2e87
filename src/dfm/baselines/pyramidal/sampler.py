"""Sampling from Pyramidal Flow (see :mod:`dfm.baselines.pyramidal`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dfm.baselines.pyramidal.path import PyramidalPath
from dfm.config import SamplerConfig
from dfm.objective import VelocityModel
from dfm.sampling import (
    Guidance,
    PreviewCallback,
    SampleOutput,
    Sampler,
    ode_step,
)
from dfm.schedule import stage_times


@torch.no_grad()
def _integrate_window(velocity, x: Tensor, window: tuple[float, float], taus: Sequence[float],
                     solver: str) -> tuple[Tensor, Tensor]:  # fmt: skip
    """ODE steps of local time τ over the grid ``taus`` (from 0 to 1) in one stage's window (global time
    lo + τ (hi - lo)); returns the end state and the last velocity."""
    lo, hi = window
    v = torch.zeros_like(x)
    for i, (tau0, tau1) in enumerate(zip(taus[:-1], taus[1:])):
        (x,), (v,) = ode_step(lambda xs, tau: [velocity(xs[0], lo + tau * (hi - lo))], [x], tau0, tau1,
                              [tau1 - tau0], solver, ends_clean=i == len(taus) - 2 and hi >= 1.0)  # fmt: skip
    return x, v


class PyramidalSampler(Sampler):
    """Stage by stage over each stage's time window, re-noising at every jump (``path.renoise``).

    Each stage integrates its local time τ from 0 to 1 with ``settings.steps[k]`` steps (the paper: equal steps per
    stage), uniform unless ``settings.time_shift`` or ``settings.shift`` warp the local time as they warp Flow
    Matching's grid (:func:`dfm.schedule.stage_times`: a shift below 1 puts each window's steps near its end);
    thresholds do not apply. A sample's start noise and jump noises depend on its seed only. Previews are
    the denoised estimate ``x + (1 - e_k) v / (e_k - s_k)`` at each stage's end, which treats the upsampled coarse
    term of the path as signal (exact for the first and last stage, an approximation in between).

    ``model(levels, t, y, main_stage)`` is the velocity model: a DFMDiT with the pyramid's stage factors (or it
    preconditioned); only the current stage's input is non-zero and its time slot holds the global time.
    """

    uses_thresholds = False  # each stage integrates its own grid from 0 to 1

    def __init__(self, path: PyramidalPath) -> None:
        self.path = path
        self.num_stages = path.num_stages

    def noise_shapes(self, shape: Sequence[int]) -> list[Sequence[int]]:
        """Stage 0's start noise, then the i.i.d. normals of every jump at its stage's resolution."""
        return self.path.decomposition.level_shapes(shape)

    def integrate(self, model: VelocityModel, noise: list[Tensor], shape: Sequence[int], guidance: Guidance,
                  settings: SamplerConfig, callback: PreviewCallback | None) -> SampleOutput:  # fmt: skip
        path, k_count = self.path, self.num_stages
        shapes = [tuple(n.shape) for n in noise]
        b = shapes[0][0]

        def velocity(x: Tensor, stage: int, t: float) -> Tensor:
            # Only the current stage's input is non-zero; its time slot holds the global time.
            levels = [x if s == stage else x.new_zeros((b, *shp[1:])) for s, shp in enumerate(shapes)]
            times = x.new_zeros(b, k_count)
            times[:, stage] = t
            stage_t = torch.full((b,), stage, dtype=torch.long, device=x.device)
            forward = lambda a, labels: [model(a[:-2], a[-2], labels, a[-1])[stage]]  # noqa: E731
            return guidance.velocity(forward, [*levels, times, stage_t], [guidance.scales[stage]])[0]

        x = noise[0]
        ends, previews = [], []
        for k in range(k_count):
            if k > 0:
                x = path.renoise(x, k, noise[k])
            taus = stage_times(k, settings, shape)
            x, v = _integrate_window(lambda xk, t, k=k: velocity(xk, k, t), x, path.window(k), taus, settings.solver)
            ends.append(x)
            e, s = path.end_coef(k), path.start_coef(k)
            preview = x + (1 - e) * v / (e - s)
            previews.append(preview)
            if callback is not None:
                callback(k, preview)
        return SampleOutput(x, ends, previews)
