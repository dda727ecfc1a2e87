"""The cascade's training objective: stage 1 for the first ``switch_step`` steps, then stage 2 conditioned on
the noised, upsampled low resolution (see :mod:`dfm.baselines.cascade`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dfm.baselines.common import mse_per_sample, stage_statistics
from dfm.decomposition.base import _INTERP_MODES, _resize, downsample
from dfm.objective import LossOutput, logit_normal, randn


@dataclass
class CascadeDraw:
    """The randomness of one training step; slicing selects samples (``draw[lo:hi]``)."""

    main_stage: Tensor  #: (B,) the stage this step trains (the same for the whole batch: 0 or 1)
    t: Tensor  #: (B, 2): the path time t and the conditioning level t_c (unused in stage 0)
    noise: list[Tensor]  #: stage 0: [ε at low resolution]; stage 1: [ε at full resolution, ε_c at low resolution]

    def __getitem__(self, index: slice) -> CascadeDraw:
        return CascadeDraw(self.main_stage[index], self.t[index], [n[index] for n in self.noise])


@dataclass
class CascadePathSample:
    x_t: Tensor  #: the noisy state of the trained stage
    target: Tensor  #: its velocity
    t: Tensor  #: (B,)
    stage: int
    cond: Tensor | None = None  #: stage 1: the noised low-resolution conditioning image (before upsampling)
    cond_t: Tensor | None = None  #: (B,) its level t_c


class CascadeObjective:
    """The cascade's training objective with the trainer's interface (``num_stages``, ``draw``, ``loss``); the
    step given to ``draw`` says which stage trains. :class:`CascadeSwitch` starts stage 2 from stage 1's weights.

    Args:
        switch_step: first optimiser step (0-based) that trains stage 2; ``round(0.8 * total_steps)`` in the paper.
        factor: resolution factor between the stages.
        mode: resampling filter for down(X) and up(cond) (the DFM pyramid's default, bilinear).
        main_loc, main_scale: LogitNormal law of the path time t of both stages (Flow Matching's 0, 1).
        cond_loc, cond_scale: LogitNormal law of the conditioning level t_c (paper: 1.5, 1).

    Example:
        >>> import torch
        >>> objective = CascadeObjective(switch_step=8)
        >>> objective.training_stage(7), objective.training_stage(8)
        (0, 1)
    """

    def __init__(
        self,
        switch_step: int,
        factor: int = 2,
        mode: str = "bilinear",
        main_loc: float = 0.0,
        main_scale: float = 1.0,
        cond_loc: float = 1.5,
        cond_scale: float = 1.0,
    ) -> None:
        if switch_step < 0:
            raise ValueError(f"switch_step must be >= 0, got {switch_step}")
        if factor < 2:
            raise ValueError(f"the cascade factor must be >= 2, got {factor}")
        if mode not in _INTERP_MODES:
            raise ValueError(f"mode must be one of {_INTERP_MODES}, got {mode!r}")
        for name, value in (("main_scale", main_scale), ("cond_scale", cond_scale)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.switch_step = int(switch_step)
        self.factor, self.mode = int(factor), mode
        self.main_loc, self.main_scale = float(main_loc), float(main_scale)
        self.cond_loc, self.cond_scale = float(cond_loc), float(cond_scale)
        self.num_stages = 2

    @classmethod
    def from_total_steps(cls, total_steps: int, stage1_fraction: float = 0.8, **kwargs: object) -> CascadeObjective:
        if not 0.0 < stage1_fraction < 1.0:
            raise ValueError(f"stage1_fraction={stage1_fraction} must be in (0, 1)")
        return cls(round(stage1_fraction * total_steps), **kwargs)  # type: ignore[arg-type]

    def training_stage(self, step: int) -> int:
        """0 while stage 1 trains, 1 from ``switch_step`` on."""
        return int(step >= self.switch_step)

    # -- draws -------------------------------------------------------------------------------------------
    def draw(
        self,
        level_shapes: Sequence[Sequence[int]],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        step: int = 0,
    ) -> CascadeDraw:
        """Times and noise of optimiser step ``step`` (0-based), for the stage it trains.

        ``level_shapes`` are the (low, full) shapes, e.g. ``LaplacianPyramid(2).level_shapes(x.shape)``.
        """
        if len(level_shapes) != 2:
            raise ValueError(f"expected the (low, full) level shapes, got {len(level_shapes)} shapes")
        low, full = (tuple(s) for s in level_shapes)
        if tuple(d * self.factor for d in low[-2:]) != full[-2:]:
            raise ValueError(f"level shapes {low} and {full} are not a factor-{self.factor} pair")
        stage = self.training_stage(step)
        b = full[0]
        t = logit_normal((b,), self.main_loc, self.main_scale, generator)
        if stage == 0:
            noise = [randn(low, generator, device, dtype)]
            t_c = torch.ones(b)
        else:
            t_c = logit_normal((b,), self.cond_loc, self.cond_scale, generator)
            noise = [randn(full, generator, device, dtype), randn(low, generator, device, dtype)]
        main_stage = torch.full((b,), stage, dtype=torch.long)
        return CascadeDraw(main_stage.to(device), torch.stack([t, t_c], 1).to(device), noise)

    def down(self, x: Tensor) -> Tensor:
        size = (*x.shape[2:-2], x.shape[-2] // self.factor, x.shape[-1] // self.factor)
        return downsample(x, size, self.mode)  # alias-free for 4x factors, the same as before for 2x

    def up(self, x: Tensor) -> Tensor:
        size = (*x.shape[2:-2], x.shape[-2] * self.factor, x.shape[-1] * self.factor)
        return _resize(x, size, self.mode)

    def sample_path(self, x: Tensor, draw: CascadeDraw) -> CascadePathSample:
        """The flow-matching path of the trained stage and, for stage 2, the noised conditioning image."""
        stage = int(draw.main_stage[0])
        if bool((draw.main_stage != stage).any()):
            raise ValueError("a cascade batch trains one stage: main_stage must be constant")
        low = self.down(x)
        shape = (-1,) + (1,) * (x.dim() - 1)
        t = draw.t[:, 0].to(x.dtype)
        clean = low if stage == 0 else x
        eps = draw.noise[0].to(x.dtype)
        x_t = t.view(shape) * clean + (1 - t.view(shape)) * eps
        if stage == 0:
            return CascadePathSample(x_t, clean - eps, t, 0)
        t_c = draw.t[:, 1].to(x.dtype)
        cond = t_c.view(shape) * low + (1 - t_c.view(shape)) * draw.noise[1].to(x.dtype)
        return CascadePathSample(x_t, clean - eps, t, 1, cond, t_c)

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        draw: CascadeDraw | None = None,
        step: int = 0,
    ) -> LossOutput:
        """Flow-matching loss of the stage that ``draw`` (else optimiser step ``step``) trains; ``model`` is the
        cascade's velocity model (a :class:`CascadeModel`, or it preconditioned)."""
        if draw is None:
            low_shape = (*x.shape[:-2], x.shape[-2] // self.factor, x.shape[-1] // self.factor)
            draw = self.draw([low_shape, tuple(x.shape)], generator, x.device, x.dtype, step=step)
        path = self.sample_path(x, draw)
        if path.stage == 0:
            pred = model(path.x_t, path.t, y, 0)
        else:
            pred = model(path.x_t, path.t, y, 1, self.up(path.cond), path.cond_t)
        per_sample = mse_per_sample(pred, path.target)
        loss, stage_losses, counts = stage_statistics(per_sample, draw.main_stage, self.num_stages)
        return LossOutput(loss, stage_losses, counts, path)


class CascadeSwitch:
    """The trainer's callback that starts stage 2: at the first stage-2 step it initialises stage 2 from stage 1 in
    the model (:meth:`CascadeModel.init_stage2`), and the EMA's stage 2 from the model's (as the trainer's EMA starts
    from the model at step 0). A flag saved with the weights makes this happen once, also across resumes."""

    def __init__(self, switch_step: int) -> None:
        self.switch_step = int(switch_step)

    @torch.no_grad()
    def on_step_begin(self, step: int, model: nn.Module, ema: nn.Module | None) -> None:
        if step < self.switch_step or bool(model.stage2_initialised):
            return
        model.init_stage2()
        if ema is not None:
            ema.stage2.load_state_dict(model.stage2.state_dict())
            ema.stage2_initialised.fill_(True)
