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
  Both models live in one :class:`CascadeModel`, so checkpoints, EMA and resume need nothing new; the trainer
  calls :meth:`CascadeObjective.begin_step` once per step, which does the switch in the model and its EMA.
- **Sampling**: 20 + 20 Euler steps by default; classifier-free guidance on both stages; the stage-1 result
  (at low resolution) is the preview.

Both stages draw their times from LogitNormal(main_loc, main_scale) = LogitNormal(0, 1), as the Flow Matching
baseline does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dfm.baselines.common import mse_per_sample, stage_statistics
from dfm.baselines.conditioned_dit import ConditionedDiT
from dfm.decomposition import _INTERP_MODES, Decomposition, _resize, downsample
from dfm.methods import Method, register_method, stage_factors, two_stage_baseline
from dfm.models import create_config
from dfm.models.config import DiTConfig
from dfm.models.dit import DFMDiT
from dfm.objective import LossOutput, logit_normal, randn
from dfm.sampling import (
    SOLVERS,
    PreviewCallback,
    SampleOutput,
    guided_velocity,
    initial_noise,
    ode_step,
    prepare_guidance,
)

if TYPE_CHECKING:
    from dfm.config import MethodConfig, RunConfig
    from dfm.schedule import StageSchedule

CASCADE_CONFIG = "cascade.json"
MODEL_TYPE = "dfm-cascade"


# ------------------------------------------------------------------------------------------------ model
class CascadeModel(nn.Module):
    """The two cascade stages in one module (so that one optimiser, one EMA and one checkpoint hold both).

    ``forward(x, t, y, stage=0)`` runs stage 1 on a low-resolution state; ``forward(x, t, y, stage=1, cond=...,
    cond_t=...)`` runs stage 2 on a full-resolution state with the upsampled conditioning image.

    Example:
        >>> import torch
        >>> from dfm.models import DiTConfig
        >>> cfg = DiTConfig(input_size=(16, 16), in_channels=1, patch_size=2, hidden_size=32, depth=1,
        ...                 num_heads=2, num_classes=3, stage_factors=(1,))
        >>> model = CascadeModel.from_config(cfg)
        >>> model.stage1.config.input_size, model.stage1.config.patch_size, model.stage1.config.num_tokens
        ((8, 8), 1, 64)
    """

    def __init__(self, stage1: DFMDiT, stage2: ConditionedDiT, factor: int = 2, mode: str = "bilinear") -> None:
        super().__init__()
        if mode not in _INTERP_MODES:
            raise ValueError(f"mode must be one of {_INTERP_MODES}, got {mode!r}")
        c1, c2 = stage1.config, stage2.config
        low = (*c2.input_size[:-2], *(s // factor for s in c2.input_size[-2:]))
        if c1.num_stages != 1 or c1.input_size != low or c1.in_channels != c2.in_channels:
            raise ValueError(
                f"stage 1 must be a one-stage model on {low} x {c2.in_channels} channels (stage 2's size / {factor}), "
                f"got input_size={c1.input_size}, in_channels={c1.in_channels}, stage_factors={c1.stage_factors}"
            )
        if c1.num_classes != c2.num_classes:
            raise ValueError(f"both stages need the same classes, got {c1.num_classes} and {c2.num_classes}")
        self.stage1 = stage1
        self.stage2 = stage2
        self.factor = int(factor)
        self.mode = mode  #: the filter of down(X) in training and of up(cond); the sampler must use the same
        # Saved with the weights so that a resumed run (and its EMA) knows whether the switch already happened.
        self.register_buffer("stage2_initialised", torch.zeros((), dtype=torch.bool))

    @classmethod
    def from_config(
        cls, config: DiTConfig, factor: int = 2, mode: str = "bilinear", stage1_std: float | None = None
    ) -> CascadeModel:
        """Stage 2 from a one-stage full-resolution ``config``; stage 1 at size / factor with patch / factor.

        With ``config.precondition``, stage 2 uses ``config.data_std`` and stage 1 ``stage1_std`` (the std of the
        low-resolution images; default: stage 2's).
        """
        if config.num_stages != 1:
            std = config.data_std and config.data_std[-1:]
            config = dataclasses.replace(config, stage_factors=(1,), data_std=std)
        if config.patch_size % factor or any(s % factor for s in config.input_size[-2:]):
            raise ValueError(
                f"patch_size={config.patch_size} and input_size={config.input_size} must be divisible by the cascade "
                f"factor {factor} (stage 1 uses patch {config.patch_size}/{factor} on the {factor}x smaller image)"
            )
        low = (*config.input_size[:-2], *(s // factor for s in config.input_size[-2:]))
        std1 = config.data_std and ((stage1_std,) if stage1_std is not None else config.data_std)
        config1 = dataclasses.replace(config, input_size=low, patch_size=config.patch_size // factor, data_std=std1)
        return cls(DFMDiT(config1), ConditionedDiT(config), factor, mode)

    # -- the model contract used by the trainer and the samplers ---------------------------------------------
    @property
    def config(self) -> DiTConfig:
        return self.stage2.config

    @property
    def num_stages(self) -> int:
        return 2

    @property
    def num_classes(self) -> int:
        return self.stage2.num_classes

    @property
    def null_class(self) -> int:
        return self.stage2.null_class

    @property
    def blocks(self) -> list[nn.Module]:
        """Both stages' transformer blocks (the trainer shards them one by one under FSDP)."""
        return [*self.stage1.blocks, *self.stage2.blocks]

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        stage: int = 1,
        cond: Tensor | None = None,
        cond_t: Tensor | None = None,
    ) -> Tensor:
        if stage == 0:
            return self.stage1([x], t.reshape(-1), y)[0]
        if stage == 1:
            return self.stage2(x, t, y, cond, cond_t)
        raise ValueError(f"the cascade has stages 0 and 1, got stage={stage}")

    @torch.no_grad()
    def init_stage2(self) -> None:
        """Fine-tuning start: stage 2 from the stage-1 weights (see :func:`init_stage2_from_stage1`)."""
        init_stage2_from_stage1(self.stage2, self.stage1)
        self.stage2_initialised.fill_(True)

    # -- save / load -------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """``cascade.json`` plus ``stage1/`` and ``stage2/`` in the DFMDiT format."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.stage1.save_pretrained(path / "stage1")
        self.stage2.save_pretrained(path / "stage2")
        meta = {
            "model_type": MODEL_TYPE,
            "factor": self.factor,
            "mode": self.mode,
            "stage2_initialised": bool(self.stage2_initialised),
        }
        tmp = path / (CASCADE_CONFIG + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, path / CASCADE_CONFIG)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> CascadeModel:
        path = Path(directory)
        if not (path / CASCADE_CONFIG).is_file():
            raise FileNotFoundError(
                f"{path / CASCADE_CONFIG} not found: expected a directory written by save_pretrained"
            )
        meta = json.loads((path / CASCADE_CONFIG).read_text())
        if meta.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{path / CASCADE_CONFIG} has model_type={meta.get('model_type')!r}, not {MODEL_TYPE!r}")
        stage1, stage2 = DFMDiT.from_pretrained(path / "stage1"), ConditionedDiT.from_pretrained(path / "stage2")
        model = cls(stage1, stage2, meta["factor"], meta.get("mode", "bilinear"))
        model.stage2_initialised.fill_(bool(meta.get("stage2_initialised", True)))
        return model.to(device)


def _lift_patch_weight(w: Tensor, channels: int, factor: int) -> Tensor:
    """Patch embedding (D, C q q) for patch q -> (D, C p p) for p = f q that embeds a nearest-upsampled image
    exactly like the original embeds the small one: each weight is spread over its f x f sub-block, / f²."""
    d, q = w.shape[0], math.isqrt(w.shape[1] // channels)
    w = w.reshape(d, channels, q, q).repeat_interleave(factor, 2).repeat_interleave(factor, 3)
    return w.reshape(d, -1) / factor**2


def _lift_head(w: Tensor, channels: int, factor: int) -> Tensor:
    """Head rows (C q q, ...) -> (C p p, ...): every fine pixel of a block predicts what its coarse pixel did."""
    rest = w.shape[1:]
    q = math.isqrt(w.shape[0] // channels)
    w = w.reshape(channels, q, q, *rest).repeat_interleave(factor, 1).repeat_interleave(factor, 2)
    return w.reshape(-1, *rest)


@torch.no_grad()
def init_stage2_from_stage1(stage2: ConditionedDiT, stage1: DFMDiT) -> list[str]:
    """Copy the stage-1 weights into stage 2 where shapes allow; returns the names left at their initialisation.

    - Every tensor with the same name and shape is copied (blocks, timestep, label embedders, head modulation).
    - The patch embedding and the head change shape with the patch (p/f -> p): they are *lifted* so that stage 2
      on a nearest-upsampled image starts as stage 1 on the small one (our decision; the paper only says the
      model is fine-tuned from stage 1).
    - The conditioning embedders start as the lifted input embedder and a copy of the timestep embedder.
    """
    c1, c2 = stage1.config, stage2.config
    if (c1.hidden_size, c1.depth, c1.num_heads) != (c2.hidden_size, c2.depth, c2.num_heads):
        raise ValueError("stage 2 can only be initialised from a stage 1 with the same backbone (width, depth, heads)")
    factor = c2.patch_size // c1.patch_size
    src = stage1.state_dict()
    c = c2.in_channels
    lifted = {
        "x_embedders.0.weight": _lift_patch_weight(src["x_embedders.0.weight"], c, factor),
        "x_embedders.0.bias": src["x_embedders.0.bias"],
        "cond_embedder.weight": _lift_patch_weight(src["x_embedders.0.weight"], c, factor),
        "cond_embedder.bias": src["x_embedders.0.bias"],
        "final_layers.0.linear.weight": _lift_head(src["final_layers.0.linear.weight"], c, factor),
        "final_layers.0.linear.bias": _lift_head(src["final_layers.0.linear.bias"], c, factor),
    }
    for key, value in src.items():
        if key.startswith("t_embedders.0."):
            lifted["cond_t_embedder." + key.removeprefix("t_embedders.0.")] = value
    untouched = []
    for key, target in stage2.state_dict().items():
        value = lifted.get(key, src.get(key))
        if value is not None and value.shape == target.shape:
            target.copy_(value)
        else:
            untouched.append(key)
    return untouched


# ------------------------------------------------------------------------------------------------ training
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
    """The cascade's training objective with the trainer's interface (``num_stages``, ``draw``, ``loss``), plus
    ``begin_step(step, model, ema)``, which the trainer calls before ``draw`` at every step.

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
        self.step = 0

    @classmethod
    def from_total_steps(cls, total_steps: int, stage1_fraction: float = 0.8, **kwargs: object) -> CascadeObjective:
        if not 0.0 < stage1_fraction < 1.0:
            raise ValueError(f"stage1_fraction={stage1_fraction} must be in (0, 1)")
        return cls(round(stage1_fraction * total_steps), **kwargs)  # type: ignore[arg-type]

    def training_stage(self, step: int) -> int:
        """0 while stage 1 trains, 1 from ``switch_step`` on."""
        return int(step >= self.switch_step)

    def begin_step(self, step: int, model: nn.Module | None = None, ema: nn.Module | None = None) -> None:
        """Record the step; at the first stage-2 step, initialise stage 2 from stage 1 in the model and its EMA.

        The EMA's stage 2 starts from the model's freshly initialised stage 2 (as the trainer's EMA starts from
        the model at step 0). A flag saved with the weights makes this happen once, also across resumes.
        """
        self.step = int(step)
        if self.training_stage(step) == 1 and model is not None and not bool(model.stage2_initialised):
            model.init_stage2()
            if ema is not None:
                ema.stage2.load_state_dict(model.stage2.state_dict())
                ema.stage2_initialised.fill_(True)

    # -- draws -------------------------------------------------------------------------------------------
    def draw(
        self,
        level_shapes: Sequence[Sequence[int]],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        step: int | None = None,
    ) -> CascadeDraw:
        """Times and noise of one step, for the stage that ``step`` (default: the last ``begin_step``) trains.

        ``level_shapes`` are the (low, full) shapes, e.g. ``LaplacianPyramid(2).level_shapes(x.shape)``.
        """
        if len(level_shapes) != 2:
            raise ValueError(f"expected the (low, full) level shapes, got {len(level_shapes)} shapes")
        low, full = (tuple(s) for s in level_shapes)
        if tuple(d * self.factor for d in low[-2:]) != full[-2:]:
            raise ValueError(f"level shapes {low} and {full} are not a factor-{self.factor} pair")
        stage = self.training_stage(self.step if step is None else step)
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
    ) -> LossOutput:
        """Flow-matching loss of the stage this step trains (``model`` is a :class:`CascadeModel`)."""
        if draw is None:
            low_shape = (*x.shape[:-2], x.shape[-2] // self.factor, x.shape[-1] // self.factor)
            draw = self.draw([low_shape, tuple(x.shape)], generator, x.device, x.dtype)
        path = self.sample_path(x, draw)
        if path.stage == 0:
            pred = model(path.x_t, path.t, y, 0)
        else:
            pred = model(path.x_t, path.t, y, 1, self.up(path.cond), path.cond_t)
        per_sample = mse_per_sample(pred, path.target)
        loss, stage_losses, counts = stage_statistics(per_sample, draw.main_stage, self.num_stages)
        return LossOutput(loss, stage_losses, counts, path)


# ------------------------------------------------------------------------------------------------ sampling
def _integrate(velocity, x: Tensor, steps: int, solver: str) -> Tensor:
    """Integrate dx/dt = velocity(x, t) from t = 0 to 1 on a uniform grid of ``steps`` steps."""
    for i in range(steps):
        t0, t1 = i / steps, (i + 1) / steps
        (x,), _ = ode_step(lambda xs, t: [velocity(xs[0], t)], [x], t0, t1, [t1 - t0], solver)
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


# ------------------------------------------------------------------------------------------------ registry entry
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

    def from_dfm(self, m: MethodConfig) -> MethodConfig:
        return two_stage_baseline(m, self.name)

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

    def measure_data_std(self, m: MethodConfig, decomposition: Decomposition, x: Tensor) -> tuple[float, ...]:
        f = stage_factors(m)[0]
        low = downsample(x, (*x.shape[2:-2], x.shape[-2] // f, x.shape[-1] // f), m.resample)
        return float(low.float().std()), float(x.float().std())

    def model(self, cfg: RunConfig, settings: dict[str, Any]) -> nn.Module:
        # stage 2 is the one-stage model; stage 1 is derived from it
        std = settings["data_std"]
        config = create_config(cfg.model.name, **{**settings, "stage_factors": (1,), "data_std": std and std[1:]})
        return CascadeModel.from_config(config, stage_factors(cfg.method)[0], cfg.method.resample, std and std[0])

    def sample(
        self,
        model: nn.Module,
        decomposition: Decomposition,
        m: MethodConfig,
        schedule: StageSchedule,
        shape: Sequence[int],
        labels: Tensor | None,
        **common: Any,
    ) -> SampleOutput:
        cond_noise = self.options(m).cond_noise
        return sample_cascade(model, shape, labels, steps=schedule.steps, cond_noise=cond_noise, **common)


register_method(Cascade())
