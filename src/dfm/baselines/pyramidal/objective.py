"""Pyramidal Flow's training objective (see :mod:`dfm.baselines.pyramidal`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dfm.baselines.common import mse_per_sample, stage_statistics
from dfm.baselines.pyramidal.path import PyramidalPath
from dfm.config import PREDICTIONS
from dfm.objective import LossOutput, VelocityModel, data_loss_weight, logit_normal, randn

TIME_DISTS = ("uniform", "logit_normal")


def check_shares(shares: Sequence[float] | None, stages: int) -> tuple[float, ...] | None:
    """``shares`` as a tuple after checking it: one positive share per stage, summing to 1 (None: equal shares)."""
    if shares is None:
        return None
    shares = tuple(float(v) for v in shares)
    if len(shares) != stages or min(shares) <= 0 or abs(sum(shares) - 1) > 1e-6:
        raise ValueError(
            f"method.options.shares={','.join(map(str, shares))} needs {stages} positive shares of the batch (one per "
            "stage, coarse to fine) that sum to 1, e.g. "
            + ",".join(["0.3"] * (stages - 1) + [f"{1 - 0.3 * (stages - 1):.1f}"])
        )
    return shares


def share_counts(batch: int, shares: Sequence[float]) -> list[int]:
    """How many of ``batch`` samples train each stage: ``batch * share`` rounded so the counts add up (largest
    remainders), at least one per stage when the batch allows.

    Example:
        >>> share_counts(10, (0.3, 0.7)), share_counts(64, (0.25, 0.25, 0.5)), share_counts(2, (0.1, 0.9))
        ([3, 7], [16, 16, 32], [1, 1])
    """
    exact = [batch * s for s in shares]
    counts = [int(v) for v in exact]
    for i in sorted(range(len(shares)), key=lambda i: exact[i] - counts[i], reverse=True)[: batch - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):  # a stage left out by rounding takes one from the largest
        if counts[i] == 0 and batch >= len(counts):
            counts[counts.index(max(counts))] -= 1
            counts[i] = 1
    return counts


@dataclass
class PyramidalDraw:
    """The randomness of one training step; slicing selects samples (``draw[lo:hi]``)."""

    main_stage: Tensor  #: (B,) the stage each sample trains
    t: Tensor  #: (B,) global time, inside the sample's window
    noise: list[Tensor]  #: one (B, C, *size_k) tensor per stage; sample i uses noise[main_stage[i]][i]

    def __getitem__(self, index: slice) -> PyramidalDraw:
        return PyramidalDraw(self.main_stage[index], self.t[index], [n[index] for n in self.noise])


@dataclass
class PyramidalPathSample:
    levels_t: list[Tensor]  #: model inputs: x_τ at each sample's own stage, zero elsewhere
    targets: list[Tensor]  #: E_k - S_k at each sample's own stage, zero elsewhere
    t: Tensor  #: (B, K) global time in the sample's own stage slot, 0 elsewhere
    main_stage: Tensor  #: (B,)
    tau: Tensor  #: (B,) local time


class PyramidalObjective:
    """The Pyramidal Flow training objective with the trainer's interface (``num_stages``, ``draw``, ``loss``).

    Args:
        path: windows, γ and the pyramid.
        time_dist: law of the local time τ inside a window: ``"uniform"`` (default) or ``"logit_normal"``.
        loc, scale: LogitNormal parameters when ``time_dist="logit_normal"``.
        shares: the share of every batch that trains each stage (a fixed count per batch, :func:`share_counts`, in a
            random order); None = equal shares, interleaved (the paper's).
        prediction: what the network predicts, ``velocity`` or ``data``
            (:class:`~dfm.baselines.pyramidal.path.PyramidalDataPrediction`). The loss is the velocity MSE either way;
            with ``data`` a sample's error is divided by (1 - a)² at most 1 / MIN_GAP² (a = τ e_k + (1 - τ) s_k; as
            DFM's data prediction does with 1 - t), which only touches the end of the last stage.

    The model given to :meth:`loss` is the velocity model (with preconditioning: the network wrapped in
    :class:`~dfm.models.precondition.Preconditioned` with :func:`pyramidal_coefficients`).

    Example:
        >>> import torch
        >>> from dfm.baselines.pyramidal import GaussianPyramid, PyramidalPath
        >>> objective = PyramidalObjective(PyramidalPath(GaussianPyramid(2)))
        >>> model = lambda levels, t, y, main_stage: [torch.zeros_like(lv) for lv in levels]
        >>> out = objective.loss(model, torch.randn(4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
        >>> out.stage_counts.tolist()
        [2.0, 2.0]
    """

    def __init__(
        self,
        path: PyramidalPath,
        time_dist: str = "uniform",
        loc: float = 0.0,
        scale: float = 1.0,
        prediction: str = "velocity",
        shares: Sequence[float] | None = None,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r}: choose {' or '.join(PREDICTIONS)}")
        if time_dist not in TIME_DISTS:
            raise ValueError(f"time_dist={time_dist!r}: choose one of {TIME_DISTS}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.path = path
        self.decomposition = path.decomposition
        self.num_stages = path.num_stages
        self.time_dist, self.loc, self.scale = time_dist, float(loc), float(scale)
        self.prediction = prediction
        self.shares = check_shares(shares, self.num_stages)

    def draw(
        self,
        level_shapes: Sequence[Sequence[int]],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        step: int = 0,
    ) -> PyramidalDraw:
        """Stages over the batch (an equal share each, interleaved, or the given ``shares``), local times, and noise
        for every level; every optimiser ``step`` draws alike."""
        if len(level_shapes) != self.num_stages:
            raise ValueError(f"expected {self.num_stages} level shapes, got {len(level_shapes)}")
        b, k = level_shapes[0][0], self.num_stages
        if self.shares is None:
            offset = int(torch.randint(k, (1,), generator=generator))
            stage = (torch.arange(b) + offset) % k
        else:
            counts = torch.tensor(share_counts(b, self.shares))
            stage = torch.repeat_interleave(torch.arange(k), counts)[torch.randperm(b, generator=generator)]
        if self.time_dist == "uniform":
            tau = torch.rand(b, generator=generator)
        else:
            tau = logit_normal((b,), self.loc, self.scale, generator)
        t = self.path.global_time(tau.double(), stage).float()
        noise = [randn(shape, generator, device, dtype) for shape in level_shapes]
        return PyramidalDraw(stage.to(device), t.to(device), noise)

    def sample_path(self, levels: Sequence[Tensor], draw: PyramidalDraw) -> PyramidalPathSample:
        """x_τ = τ E_k + (1 - τ) S_k and the target E_k - S_k for every sample's own stage."""
        stage = draw.main_stage
        tau = self.path.local_time(draw.t.double(), stage).to(levels[0].dtype)
        levels_t, targets = [], []
        for k, level in enumerate(levels):
            shape = (-1,) + (1,) * (level.dim() - 1)
            mine = (stage == k).view(shape).to(level.dtype)
            start, end = self.path.endpoints(levels, k, draw.noise[k].to(level.dtype))
            tk = tau.view(shape)
            levels_t.append(mine * (tk * end + (1 - tk) * start))
            targets.append(mine * (end - start))
        t = torch.zeros(stage.shape[0], self.num_stages, dtype=draw.t.dtype, device=draw.t.device)
        t[torch.arange(stage.shape[0], device=t.device), stage] = draw.t
        return PyramidalPathSample(levels_t, targets, t, stage, tau)

    def loss(
        self,
        model: VelocityModel,
        x: Tensor,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        draw: PyramidalDraw | None = None,
        step: int = 0,
    ) -> LossOutput:
        """Mean over the batch of ``‖G_k(x_τ, t, y, k) - (E_k - S_k)‖²`` with k each sample's stage."""
        levels = self.decomposition.decompose(x)
        if draw is None:
            draw = self.draw([tuple(lv.shape) for lv in levels], generator, x.device, x.dtype)
        path = self.sample_path(levels, draw)
        preds = model(path.levels_t, path.t, y, path.main_stage)
        if len(preds) != self.num_stages:
            raise ValueError(f"the model returned {len(preds)} velocities for {self.num_stages} stages")
        per_stage = torch.stack([mse_per_sample(p, tgt) for p, tgt in zip(preds, path.targets)], dim=1)  # (B, K)
        # A sample's error on other stages is ||G - 0||² of an unused head: keep only its own stage.
        per_sample = per_stage.gather(1, path.main_stage.long()[:, None])[:, 0]
        if self.prediction == "data":  # the velocity error grows as 1 / (1 - a): clamped as DFM's
            signal = self.path.coefs(path.main_stage, path.tau.double())[2]
            per_sample = per_sample * data_loss_weight(signal).to(per_sample.dtype)
        loss, stage_losses, counts = stage_statistics(per_sample, path.main_stage, self.num_stages)
        return LossOutput(loss, stage_losses, counts, path)
