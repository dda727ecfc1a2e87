"""The stage schedule used at sampling time (method.md section 6).

Stages are generated one after the other. Stage i (0-based) is the *main stage* (the paper's Q: the stage being
generated) for ``steps[i]`` Euler/Heun steps, during which it moves
linearly from 0 to its threshold τ_i and every earlier stage moves linearly from τ_{i-1} to τ_i; later stages stay
at t = 0 and are masked. The last threshold is 1, so all stages end at t = 1 (data) together.

Example, the paper's two-stage default at 512 px (30 + 10 steps, τ = 0.7)::

    >>> from dfm.schedule import StageSchedule
    >>> sched = StageSchedule(steps=(30, 10), thresholds=(0.7,))
    >>> sched.grid.shape
    torch.Size([41, 2])
    >>> [round(v, 4) for v in sched.grid[31].tolist()]
    [0.73, 0.1]
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dfm.config import SamplerConfig


class StageSchedule:
    """Time grid of every stage for a multi-stage sampler.

    Args:
        steps: number of steps per stage, coarse to fine (N_1 .. N_S), each >= 1.
        thresholds: τ_1 < ... < τ_{S-1}, strictly inside (0, 1); τ_S = 1 is implied.

    Attributes:
        grid: (sum(steps) + 1, S) float64 tensor, row n = times of all stages after n steps (row 0 = all zeros).
        main_stage: (sum(steps),) long tensor, the stage being generated at each step.
        active: (sum(steps), S) bool tensor, stages that move (and are fed to the model) at each step.
    """

    def __init__(self, steps: Sequence[int] = (30, 10), thresholds: Sequence[float] = (0.7,)) -> None:
        steps = tuple(steps)
        thresholds = tuple(float(t) for t in thresholds)
        SamplerConfig(steps=steps, thresholds=thresholds).validate(len(steps))
        self.steps = tuple(int(n) for n in steps)
        self.thresholds = thresholds
        self.num_stages = len(steps)
        self.grid, self.main_stage = self._build()
        self.active = torch.arange(self.num_stages)[None, :] <= self.main_stage[:, None]

    @classmethod
    def single(cls, steps: int) -> StageSchedule:
        """One-stage (plain Flow Matching) schedule: a uniform grid from 0 to 1."""
        return cls((steps,), ())

    @classmethod
    def from_settings(cls, settings: SamplerConfig, size: Sequence[int]) -> StageSchedule:
        """The grid of a sampler's settings for samples of spatial ``size`` (..., H, W), time-shifted as FLUX does
        when ``settings.time_shift`` (one token count, the finest latent's (H / 2) * (W / 2), for all stages), then
        by SD3's constant ``settings.shift`` (:func:`shift_time`) when it is not 1."""
        return cls(settings.steps, settings.thresholds).warped_as(settings, size)

    def warped_as(self, settings: SamplerConfig, size: Sequence[int]) -> StageSchedule:
        """This schedule with the time warps of a sampler's settings (``time_shift``, then ``shift``) for samples of
        spatial ``size``; ``settings.steps`` and ``thresholds`` are not read."""
        schedule = self
        if settings.time_shift:
            tokens = (size[-2] // 2) * (size[-1] // 2)
            schedule = schedule.warped(lambda t: flux_time_shift(t, tokens))
        if settings.shift != 1:
            first = settings.shift_from % self.num_stages
            schedule = schedule.warped(lambda t: shift_time(t, settings.shift), first)
        return schedule

    @property
    def num_steps(self) -> int:
        return sum(self.steps)

    @property
    def stage_ends(self) -> list[int]:
        """Step index (row of ``grid``) at which each stage reaches its threshold."""
        ends, n = [], 0
        for k in self.steps:
            n += k
            ends.append(n)
        return ends

    def _build(self) -> tuple[Tensor, Tensor]:
        taus = self.thresholds + (1.0,)
        rows = [torch.zeros(self.num_stages, dtype=torch.float64)]
        main_stage = []
        start = 0.0  # where earlier stages stand when stage i starts (τ_{i-1})
        for i, (n, tau) in enumerate(zip(self.steps, taus)):
            for k in range(1, n + 1):
                frac = k / n
                row = torch.zeros(self.num_stages, dtype=torch.float64)
                row[:i] = start + (tau - start) * frac
                row[i] = tau * frac
                if k == n:  # land exactly on the threshold despite rounding
                    row[: i + 1] = tau
                rows.append(row)
                main_stage.append(i)
            start = tau
        return torch.stack(rows), torch.tensor(main_stage, dtype=torch.long)

    def warped(self, warp: Callable[[Tensor], Tensor], first: int = 0) -> StageSchedule:
        """A copy whose times are ``warp(t)`` (elementwise on the grid and the thresholds; ``warp`` must be
        increasing with ``warp(0) = 0`` and ``warp(1) = 1``), e.g. FLUX's time shift; steps and stages unchanged.
        ``first``: the first stage whose times (grid column, threshold) are warped; earlier stages keep theirs."""
        out = copy.copy(self)
        out.grid = self.grid.clone()
        out.grid[:, first:] = warp(self.grid[:, first:])
        warp_one = lambda t: float(warp(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
        out.thresholds = tuple(warp_one(t) if i >= first else t for i, t in enumerate(self.thresholds))
        return out

    def __repr__(self) -> str:
        return f"StageSchedule(steps={self.steps}, thresholds={self.thresholds})"


def stage_times(stage: int, settings: SamplerConfig, size: Sequence[int]) -> list[float]:
    """The ``settings.steps[stage] + 1`` times, from 0 to 1, of a stage that runs on its own grid (the cascade's
    stages, Pyramidal Flow's local time in a window): uniform, warped by the settings' ``time_shift`` and the
    stage's ``shift`` (:meth:`~dfm.config.SamplerConfig.stage_shift`) as Flow Matching's grid is, for samples of
    spatial ``size``."""
    own = dataclasses.replace(settings, shift=settings.stage_shift(stage, len(settings.steps)), shift_from=0)
    return [float(t) for t in StageSchedule.single(int(settings.steps[stage])).warped_as(own, size).grid[:, 0]]


def shift_time(t: Tensor | float, shift: float) -> Tensor | float:
    """SD3's constant time shift in our convention (t = 1 data): SD3 maps ``sigma -> shift sigma / (1 + (shift - 1)
    sigma)``; with ``sigma = 1 - t`` that is ``t -> t / (t + shift (1 - t))``, which keeps 0 and 1 fixed. A shift
    above 1 spends more of a uniform grid at high noise, below 1 near the data (0.25 moves t = 0.8 to 0.94)."""
    return t / (t + shift * (1 - t))


def flux_mu(
    image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, base_seq: int = 256, max_seq: int = 4096
) -> float:
    """FLUX's resolution-dependent shift ``mu``: linear in the number of image tokens, ``base_shift`` at
    ``base_seq`` tokens and ``max_shift`` at ``max_seq`` tokens."""
    slope = (max_shift - base_shift) / (max_seq - base_seq)
    return base_shift + slope * (image_seq_len - base_seq)


def flux_time_shift(
    t: Tensor | float,
    image_seq_len: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    base_seq: int = 256,
    max_seq: int = 4096,
) -> Tensor | float:
    """FLUX's sampling time shift in our convention (t = 1 data).

    FLUX shifts ``sigma -> e^mu / (e^mu + 1/sigma - 1)`` (more steps at high noise for more tokens); with
    ``sigma = 1 - t`` that is ``t -> t / (t + e^mu (1 - t))``, which keeps 0 and 1 fixed and is finite at t = 1.
    ``image_seq_len``: FLUX tokens of the image, (H/2) * (W/2) for an H x W latent.
    """
    return shift_time(t, math.exp(flux_mu(image_seq_len, base_shift, max_shift, base_seq, max_seq)))
