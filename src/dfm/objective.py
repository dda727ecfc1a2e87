"""The per-stage flow-matching path and training objective of DFM (method.md section 4).

Time convention (owned here for the whole package): **t = 0 is pure noise, t = 1 is data**. For every stage s,
with its own Gaussian noise ε_s and its own time t_s::

    X_s^t = t_s · X_s + (1 - t_s) · ε_s,        target velocity  v_s = X_s - ε_s

Per sample, a *main stage* Q is drawn from ``stage_probs``; ``t_Q ~ LogitNormal(main_loc, main_scale)``, earlier
stages ``t_s ~ LogitNormal(prev_loc, prev_scale)`` (mostly clean), later stages ``t_s = 0`` with their input
zeroed and their loss masked. The loss is ``mean_batch Σ_s mask_s · MSE_s`` with MSE_s the mean over the stage's
elements: no extra weights (the paper's loss). ``loss_weighting="edm"`` divides MSE_s by ``c_out(t_s)²`` of
:mod:`dfm.models.precondition`, i.e. measures each stage's error in its network's unit-variance target space
(an ablation: it weights a low-std level such as the fine Laplacian residual up, most at small t). With
``prediction="data"`` (the network predicts the clean level), the velocity MSE is the error of that prediction
divided by (1 - t_s)², with 1 - t_s clamped at 0.05 (Li & He 2025), and ``"edm"`` makes it the error over σ_s².

Example:
    >>> import torch
    >>> from dfm.decomposition import LaplacianPyramid
    >>> from dfm.objective import DFMObjective
    >>> objective = DFMObjective(LaplacianPyramid(2))
    >>> model = lambda levels, t, y, main_stage: [torch.zeros_like(lv) for lv in levels]
    >>> out = objective.loss(model, torch.randn(8, 1, 16, 16), y=None)
    >>> out.loss.shape, out.stage_losses.shape
    (torch.Size([]), torch.Size([2]))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dfm.decomposition import Decomposition
from dfm.models.precondition import GAP_FLOOR, MIN_GAP, flow_preconditioning

#: ``model(levels_t, t, y, main_stage) -> velocities``: levels and velocities are lists coarse to fine,
#: ``t`` is (B, S) and ``main_stage`` (B,) holds 0-based stage indices.
VelocityModel = Callable[[list[Tensor], Tensor, "Tensor | None", Tensor], Sequence[Tensor]]


def default_stage_probs(num_stages: int) -> tuple[float, ...]:
    """The paper's p(Q) for two stages, (0.9, 0.1); one stage gives (1.0,).

    The paper only states two stages. For S > 2 we keep 0.1 for every finer stage and give the rest to the
    coarsest, e.g. (0.8, 0.1, 0.1): a project decision, override it with ``stage_probs``.
    """
    if num_stages == 1:
        return (1.0,)
    if num_stages > 10:
        raise ValueError(f"no default stage_probs for {num_stages} stages: pass stage_probs explicitly")
    return (1.0 - 0.1 * (num_stages - 1),) + (0.1,) * (num_stages - 1)


def randn(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal draws on ``device``; with a generator, drawn on the generator's device, then moved."""
    if generator is None:
        return torch.randn(*shape, device=device, dtype=dtype)
    return torch.randn(*shape, generator=generator, device=generator.device).to(device=device, dtype=dtype)


def data_loss_weight(signal: Tensor) -> Tensor:
    """For a network predicting the data: the weight ``((1 - a) / max(1 - a, MIN_GAP))²`` of a velocity error whose
    size grows as 1 / (1 - a), with ``a`` the data coefficient of the state (DFM: t), so that the few draws near
    the clean end do not dominate the loss (the clamp of Li & He 2025; 1 - a at least GAP_FLOOR)."""
    gap = (1 - signal).clamp(min=GAP_FLOOR)
    return (gap / gap.clamp(min=MIN_GAP)).pow(2)


def logit_normal(
    shape: Sequence[int],
    loc: float,
    scale: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Samples of ``sigmoid(N(loc, scale²))`` in (0, 1)."""
    return torch.sigmoid(loc + scale * randn(shape, generator, device))


def active_mask(main_stage: Tensor, num_stages: int) -> Tensor:
    """(B, S) float mask, 1 for stages at or before the main stage (active), 0 after it."""
    return (torch.arange(num_stages, device=main_stage.device)[None, :] <= main_stage[:, None]).float()


@dataclass
class PathSample:
    """One draw of the per-stage path for a batch."""

    levels_t: list[Tensor]  #: noisy levels X_s^t, inactive stages zeroed
    targets: list[Tensor]  #: velocities X_s - ε_s
    t: Tensor  #: (B, S) times, 0 for inactive stages
    mask: Tensor  #: (B, S) 1 for active stages
    main_stage: Tensor  #: (B,) 0-based main stage Q


@dataclass
class PathDraw:
    """The random part of a path sample, drawn before the data is seen; slicing it selects samples.

    Drawing for a whole global batch and slicing per rank (``draw[lo:hi]``) makes training independent of the
    number of processes: a sample's noise and times depend only on the step's seed and its index in the batch.
    """

    main_stage: Tensor  #: (B,)
    t: Tensor  #: (B, S)
    noise: list[Tensor]  #: one (B, ...) tensor per stage

    def __getitem__(self, index: slice) -> PathDraw:
        return PathDraw(self.main_stage[index], self.t[index], [n[index] for n in self.noise])


@dataclass
class LossOutput:
    """The loss of one batch with per-stage statistics for logging; what every method's objective returns."""

    loss: Tensor  #: scalar, mean over the batch (DFM: of Σ_s mask_s · MSE_s)
    stage_losses: Tensor  #: (S,) mean MSE of each stage over the samples that trained it (0 where none)
    stage_counts: Tensor  #: (S,) number of samples that trained each stage
    path: Any = None  #: the path sample the loss was computed on (PathSample for DFM; for tests and diagnostics)


class DFMObjective:
    """Per-stage flow matching over a decomposition.

    Args:
        decomposition: splits clean inputs into levels (``Identity`` gives plain Flow Matching).
        stage_probs: categorical p(Q) over stages, coarse to fine (default :func:`default_stage_probs`).
        main_loc, main_scale: LogitNormal parameters of the main stage's time (paper: 0, 1).
        prev_loc, prev_scale: LogitNormal parameters of earlier stages' times (paper: 1.5, 1).
        tied: ablation: all active stages share the main stage's time (the paper found this far worse).
        loss_weighting: ``"velocity"`` (the paper's plain sum of per-stage MSEs) or ``"edm"`` (each MSE divided by
            ``c_out(t_s)² = σ_s² / (t_s² σ_s² + (1 - t_s)²)``); ``"edm"`` needs ``data_std``.
        data_std: per-stage data std σ_s of the levels (what the preconditioned model uses).
        prediction: what the preconditioned network predicts (``velocity`` or ``data``), whose c_out the ``"edm"``
            weighting divides by (for ``data``: ``σ_s / (1 - t_s)``, so that the loss is the error of x̂ / σ_s).
    """

    def __init__(
        self,
        decomposition: Decomposition,
        stage_probs: Sequence[float] | None = None,
        main_loc: float = 0.0,
        main_scale: float = 1.0,
        prev_loc: float = 1.5,
        prev_scale: float = 1.0,
        tied: bool = False,
        loss_weighting: str = "velocity",
        data_std: Sequence[float] | None = None,
        prediction: str = "velocity",
    ) -> None:
        s = decomposition.num_stages
        if loss_weighting not in ("velocity", "edm"):
            raise ValueError(f"loss_weighting={loss_weighting!r}: choose 'velocity' or 'edm'")
        if loss_weighting == "edm" and (data_std is None or len(data_std) != s):
            raise ValueError(f"loss_weighting='edm' needs data_std with one value per stage ({s}), got {data_std}")
        probs = tuple(float(p) for p in (stage_probs if stage_probs is not None else default_stage_probs(s)))
        if len(probs) != s:
            raise ValueError(f"stage_probs needs one probability per stage ({s}), got {len(probs)}: {probs}")
        if any(p < 0 or not math.isfinite(p) for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"stage_probs must be non-negative and sum to 1, got {probs}")
        for name, value in (("main_scale", main_scale), ("prev_scale", prev_scale)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.decomposition = decomposition
        self.num_stages = s
        self.stage_probs = probs
        self.main_loc, self.main_scale = float(main_loc), float(main_scale)
        self.prev_loc, self.prev_scale = float(prev_loc), float(prev_scale)
        self.tied = bool(tied)
        self.loss_weighting = loss_weighting
        self.data_std = None if data_std is None else tuple(float(v) for v in data_std)
        self.prediction = prediction

    # -- draws ----------------------------------------------------------------------------------------------
    def sample_main_stage(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """(B,) 0-based main stages drawn independently per sample from ``stage_probs``."""
        probs = torch.tensor(self.stage_probs, dtype=torch.float64)
        q = torch.multinomial(probs, batch, replacement=True, generator=generator)
        return q.to(device) if device is not None else q

    def sample_timesteps(self, main_stage: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, S) per-stage times for the given main stages: main ~ LN(main), earlier ~ LN(prev), later = 0."""
        b, s = main_stage.shape[0], self.num_stages
        main_t = logit_normal((b, 1), self.main_loc, self.main_scale, generator)
        prev_t = main_t.expand(b, s) if self.tied else logit_normal((b, s), self.prev_loc, self.prev_scale, generator)
        idx = torch.arange(s)[None, :]
        q = main_stage.cpu()[:, None]
        t = torch.where(idx == q, main_t.expand(b, s), torch.where(idx < q, prev_t, torch.zeros(())))
        return t.to(main_stage.device)

    def draw(
        self,
        level_shapes: Sequence[Sequence[int]],
        main_stage: Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        step: int = 0,
    ) -> PathDraw:
        """All the randomness of one training step: main stages, per-stage times and per-stage noise (every
        optimiser ``step`` draws alike)."""
        b = level_shapes[0][0]
        if main_stage is None:
            main_stage = self.sample_main_stage(b, generator)
        t = self.sample_timesteps(main_stage.cpu(), generator)
        noise = [randn(shape, generator, device, dtype) for shape in level_shapes]
        return PathDraw(main_stage.to(device), t.to(device), noise)

    def sample_path(
        self,
        levels: Sequence[Tensor],
        main_stage: Tensor | None = None,
        generator: torch.Generator | None = None,
        draw: PathDraw | None = None,
    ) -> PathSample:
        """Noise every level with its own ε and t (from ``draw`` if given); zero the inactive ones."""
        if draw is None:
            shapes = [tuple(lv.shape) for lv in levels]
            draw = self.draw(shapes, main_stage, generator, levels[0].device, levels[0].dtype)
        mask = active_mask(draw.main_stage, self.num_stages)
        levels_t, targets = [], []
        for s, x1 in enumerate(levels):
            noise = draw.noise[s].to(x1.dtype)
            shape = (x1.shape[0],) + (1,) * (x1.dim() - 1)
            ts = draw.t[:, s].view(shape).to(x1.dtype)
            levels_t.append((ts * x1 + (1 - ts) * noise) * mask[:, s].view(shape).to(x1.dtype))
            targets.append(x1 - noise)
        return PathSample(levels_t, targets, draw.t, mask, draw.main_stage)

    # -- loss -----------------------------------------------------------------------------------------------
    def loss(
        self,
        model: VelocityModel,
        x: Tensor,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        main_stage: Tensor | None = None,
        draw: PathDraw | None = None,
        step: int = 0,
    ) -> LossOutput:
        """Decompose ``x``, draw the path (or use ``draw``) and return the masked per-stage flow-matching loss."""
        levels = self.decomposition.decompose(x)
        path = self.sample_path(levels, main_stage, generator, draw)
        preds = model(path.levels_t, path.t, y, path.main_stage)
        if len(preds) != self.num_stages:
            raise ValueError(f"the model returned {len(preds)} velocities for {self.num_stages} stages")
        per_stage = torch.stack(
            [(p.float() - tgt.float()).pow(2).flatten(1).mean(1) for p, tgt in zip(preds, path.targets)], dim=1
        )  # (B, S)
        t = path.t.float()
        if self.loss_weighting == "edm":
            c_out = torch.stack([flow_preconditioning(t[:, s], sd, self.prediction)[2]
                                 for s, sd in enumerate(self.data_std)], 1)  # fmt: skip
            per_stage = per_stage / c_out.pow(2)  # the error of F, the network inside the preconditioning
        elif self.prediction == "data":  # the velocity error ||x̂ - x||² / (1 - t)², with 1 - t at least MIN_GAP
            per_stage = per_stage * data_loss_weight(t)
        masked = per_stage * path.mask
        loss = masked.sum(1).mean()
        counts = path.mask.sum(0)
        stage_losses = masked.detach().sum(0) / counts.clamp(min=1)
        return LossOutput(loss, stage_losses, counts, path)
