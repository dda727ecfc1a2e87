"""Pyramidal Flow's pyramid, path and re-noising rule, and the coefficients of its preconditioning (the equations
are derived in :mod:`dfm.baselines.pyramidal`). Time convention: t = 0 is noise, t = 1 is data."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dfm.decomposition.base import Decomposition, _block_mean, _block_repeat, _normalise_factors
from dfm.models.precondition import GAP_FLOOR, Coefficients, flow_preconditioning


# ------------------------------------------------------------------------------------------------ pyramid
class GaussianPyramid(Decomposition):
    """Downsampled copies of the input, coarse to fine: ``X_k = Down(X, F_k)``, the last level is X itself.

    ``Down`` is the block mean. ``recompose`` returns the finest level it is given (the image at that
    resolution), so ``recompose(decompose(x)) == x`` and the preview of stage k is ``X_k``. Videos are
    downsampled frame by frame.

    Example:
        >>> import torch
        >>> pyr = GaussianPyramid(3)
        >>> [tuple(lv.shape) for lv in pyr.decompose(torch.randn(1, 1, 16, 16))]
        [(1, 1, 4, 4), (1, 1, 8, 8), (1, 1, 16, 16)]
    """

    def __init__(self, stages: int = 2, factors: int | Sequence[int] | None = None) -> None:
        self.factors = _normalise_factors(stages, factors)
        self.num_stages = stages
        self.temporal_factors = (1,) * (stages - 1)

    def _spatial_factors(self) -> tuple[int, ...]:
        return self.factors

    def decompose(self, x: Tensor) -> list[Tensor]:
        self._check_input(x)
        sizes = self.stage_sizes(tuple(x.shape[2:]))
        # Straight from full resolution: block means compose, so this equals downsampling stage by stage.
        return [_block_mean(x, size) for size in sizes[:-1]] + [x]

    def recompose(self, levels: Sequence[Tensor]) -> Tensor:
        self._check_levels(levels)
        return levels[-1]

    def up(self, x: Tensor, stage: int) -> Tensor:
        """Nearest-neighbour upsampling of a stage ``stage - 1`` map to the resolution of ``stage``."""
        f = self.factors[stage - 1]
        size = (*x.shape[2:-2], x.shape[-2] * f, x.shape[-1] * f)
        return _block_repeat(x, size)

    def down(self, x: Tensor, stage: int) -> Tensor:
        """Block mean of a stage ``stage`` map to the resolution of ``stage - 1`` (what :meth:`decompose` does)."""
        f = self.factors[stage - 1]
        return _block_mean(x, (*x.shape[2:-2], x.shape[-2] // f, x.shape[-1] // f))

    def __repr__(self) -> str:
        return f"GaussianPyramid(stages={self.num_stages}, factors={self.factors})"


def block_noise(z: Tensor, factor: int, gamma: float) -> Tensor:
    """Noise with covariance ``Σ' = (1 + γ) I - γ 1 1ᵀ`` inside every ``factor x factor`` block, from i.i.d. z.

    With P the block-mean projector, Σ' = (1 + γ)(I - P) + (1 - (m - 1) γ) P, so
    ``n' = sqrt(1 + γ) (z - Pz) + sqrt(1 - (m - 1) γ) Pz``. Unit variance per element, correlation -γ inside
    a block, independent across blocks.
    """
    m = factor * factor
    if not 0.0 <= gamma <= 1.0 / (m - 1) + 1e-12:
        raise ValueError(f"gamma={gamma} must be in [0, 1/(m - 1)] = [0, {1.0 / (m - 1):.4g}] for {factor}x blocks")
    size = tuple(z.shape[2:])
    coarse = (*size[:-2], size[-2] // factor, size[-1] // factor)
    mean = _block_repeat(_block_mean(z, coarse), size)  # Pz
    return math.sqrt(1 + gamma) * (z - mean) + math.sqrt(max(1 - (m - 1) * gamma, 0.0)) * mean


# ------------------------------------------------------------------------------------------------ path
class PyramidalPath:
    """The settings and equations of Pyramidal Flow: windows, endpoint coefficients and the jump rule.

    Args:
        decomposition: the Gaussian pyramid (its factors fix the jumps).
        windows: the inner boundaries b_1 < ... < b_{K-1} strictly inside (0, 1); None = equal windows.
        gammas: the correlation γ of the jump noise, one per jump or one for all; None = 1 / (f² - 1) per jump
            (1/3 for factor 2, the paper's value).
    """

    def __init__(
        self,
        decomposition: GaussianPyramid,
        windows: Sequence[float] | None = None,
        gammas: float | Sequence[float] | None = None,
    ) -> None:
        if not isinstance(decomposition, GaussianPyramid):
            raise ValueError(f"Pyramidal Flow needs a GaussianPyramid, got {decomposition!r}")
        k = decomposition.num_stages
        inner = tuple(i / k for i in range(1, k)) if windows is None else tuple(float(b) for b in windows)
        if len(inner) != k - 1:
            raise ValueError(f"{k} stages need {k - 1} inner window boundaries, got {inner}")
        bounds = (0.0, *inner, 1.0)
        if any(not b < a for b, a in zip(bounds, bounds[1:])):
            raise ValueError(f"window boundaries must increase strictly inside (0, 1), got {inner}")
        if gammas is None:
            gam = tuple(1.0 / (f * f - 1) for f in decomposition.factors)
        elif isinstance(gammas, (int, float)):
            gam = (float(gammas),) * (k - 1)
        else:
            gam = tuple(float(g) for g in gammas)
        if len(gam) != k - 1:
            raise ValueError(f"{k} stages need {k - 1} gammas (one per jump), got {gam}")
        for g, f in zip(gam, decomposition.factors):
            if not 0.0 < g <= 1.0 / (f * f - 1) + 1e-12:
                raise ValueError(
                    f"gamma={g} for a factor-{f} jump must be in (0, {1.0 / (f * f - 1):.4g}]: the block covariance "
                    "must stay positive semi-definite, and gamma = 0 would discard the coarse result"
                )
        self.decomposition = decomposition
        self.num_stages = k
        self.boundaries = bounds
        self.gammas = gam

    def window(self, stage: int) -> tuple[float, float]:
        """(b_k, b_{k+1}): the global-time window of ``stage``."""
        return self.boundaries[stage], self.boundaries[stage + 1]

    def end_coef(self, stage: int) -> float:
        """e_k = b_{k+1}: the data coefficient of the end point."""
        return self.boundaries[stage + 1]

    def start_coef(self, stage: int) -> float:
        """s_k: 0 for the first stage, else ``r e / (1 - e + r e)`` with e = e_{k-1}, r = sqrt(γ / (1 + γ))."""
        if stage == 0:
            return 0.0
        e, g = self.end_coef(stage - 1), self.gammas[stage - 1]
        r = math.sqrt(g / (1 + g))
        return r * e / (1 - e + r * e)

    def jump_coefs(self, stage: int) -> tuple[float, float]:
        """(s_k / e_{k-1}, α) of the jump into ``stage`` (>= 1)."""
        s, e, g = self.start_coef(stage), self.end_coef(stage - 1), self.gammas[stage - 1]
        return s / e, (1 - s) / math.sqrt(1 + g)

    def local_time(self, t: Tensor, stage: Tensor | int) -> Tensor:
        """τ = (t - b_k) / (b_{k+1} - b_k) for per-sample stages."""
        lo, hi = self._bounds(stage, t)
        return (t - lo) / (hi - lo)

    def global_time(self, tau: Tensor, stage: Tensor | int) -> Tensor:
        lo, hi = self._bounds(stage, tau)
        return lo + tau * (hi - lo)

    def _bounds(self, stage: Tensor | int, like: Tensor) -> tuple[Tensor, Tensor]:
        b = torch.tensor(self.boundaries, dtype=like.dtype, device=like.device)
        stage = torch.as_tensor(stage, device=like.device).long()
        return b[stage], b[stage + 1]

    def coefs(self, stage: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(e_k, s_k, a) per sample for per-sample stages and local times, with ``a = τ e_k + (1 - τ) s_k`` the data
        coefficient of x_τ (dtype and device of ``tau``)."""
        stage = stage.long().to(tau.device)
        end = torch.tensor([self.end_coef(k) for k in range(self.num_stages)], dtype=tau.dtype, device=tau.device)
        start = torch.tensor([self.start_coef(k) for k in range(self.num_stages)], dtype=tau.dtype, device=tau.device)
        e, s = end[stage], start[stage]
        return e, s, tau * e + (1 - tau) * s

    def endpoints(self, levels: Sequence[Tensor], stage: int, noise: Tensor) -> tuple[Tensor, Tensor]:
        """(S_k, E_k) of ``stage`` for clean pyramid levels and the stage's noise (shared by both ends)."""
        e, s = self.end_coef(stage), self.start_coef(stage)
        end = e * levels[stage] + (1 - e) * noise
        if stage == 0:
            return noise, end
        start = s * self.decomposition.up(levels[stage - 1], stage) + (1 - s) * noise
        return start, end

    def renoise(self, end_state: Tensor, stage: int, z: Tensor) -> Tensor:
        """The start state of ``stage`` from the end state of ``stage - 1`` and i.i.d. normals z (fine shape)."""
        scale, alpha = self.jump_coefs(stage)
        factor = self.decomposition.factors[stage - 1]
        return scale * self.decomposition.up(end_state, stage) + alpha * block_noise(z, factor, self.gammas[stage - 1])

    def __repr__(self) -> str:
        return f"PyramidalPath({self.decomposition!r}, boundaries={self.boundaries}, gammas={self.gammas})"


def pyramidal_coefficients(path: PyramidalPath, data_std: Sequence[float]) -> Coefficients:
    """The preconditioning of the Pyramidal Flow path (module docstring of :mod:`dfm.baselines.pyramidal`), for
    :class:`~dfm.models.precondition.Preconditioned`: the network sees ``c_in(a) x_τ`` with the unchanged global
    time, and ``v̂ = (e_k - s_k) (c_skip(a) x_τ + c_out(a) F)`` with ``a = τ e_k + (1 - τ) s_k`` and σ_k the std of
    the main stage's Gaussian-pyramid level."""
    stds = _checked_stds(path, data_std)

    def coefficients(t: Tensor, main_stage: Tensor | None) -> list[tuple[Tensor, Tensor, Tensor]]:
        stage, tau, (e, s, a), sigma = _per_sample(path, stds, t, main_stage)
        c_in, c_skip, c_out = flow_preconditioning(a, sigma)
        scale = e - s
        # One set for every level: only the main stage's level is non-zero and only its head is used.
        one = (c_in.float(), (scale * c_skip).float(), (scale * c_out).float())
        return [one] * path.num_stages

    return coefficients


def _checked_stds(path: PyramidalPath, data_std: Sequence[float]) -> tuple[float, ...]:
    if len(data_std) != path.num_stages or min(data_std) <= 0:
        raise ValueError(f"data_std={tuple(data_std)} needs one positive value per stage ({path.num_stages})")
    return tuple(float(v) for v in data_std)


def _per_sample(path: PyramidalPath, stds: tuple[float, ...], t: Tensor, main_stage: Tensor | None):
    """Each sample's stage, local time τ, (e_k, s_k, a) and level std σ_k (float64) from the model's time input."""
    if main_stage is None:
        raise ValueError("Pyramidal Flow's model needs main_stage: the stage whose window holds the time")
    t = t[:, None] if t.dim() == 1 else t
    stage = main_stage.long()
    tau = path.local_time(t.gather(1, stage[:, None])[:, 0].double(), stage)
    sigma = torch.tensor(stds, dtype=torch.float64, device=t.device)[stage]
    return stage, tau, path.coefs(stage, tau), sigma


class PyramidalDataPrediction:
    """A velocity model from a network F that predicts the clean level of its stage (``method.prediction=data``).

    F sees ``c_in(a) x_τ`` as with :func:`pyramidal_coefficients` and predicts ``X̂_k = σ_k F``. On this path the
    coarse term is fixed by the clean level (``Up(X_{k-1}) = Up(Down(X_k))``, :meth:`GaussianPyramid.down`), so one
    prediction gives the noise and the velocity exactly, linearly (module docstring of :mod:`dfm.baselines.pyramidal`)::

        Û = Up(Down(X̂)),   n̂ = (x_τ - τ e X̂ - (1 - τ) s Û) / (1 - a),   v̂ = e X̂ - s Û - (e - s) n̂

    with 1 - a at least :data:`~dfm.models.precondition.GAP_FLOOR` (it reaches 0 only at the end of the last stage,
    where a last Euler step lands on X̂). Attributes the samplers read are the network's.
    """

    def __init__(self, network: Any, path: PyramidalPath, data_std: Sequence[float]) -> None:
        self.network, self.path, self.data_std = network, path, _checked_stds(path, data_std)

    def __call__(self, levels: Sequence[Tensor], t: Tensor, y: Any = None, main_stage: Tensor | None = None
                 ) -> list[Tensor]:  # fmt: skip
        stage, tau, (e, s, a), sigma = _per_sample(self.path, self.data_std, t, main_stage)
        c_in = flow_preconditioning(a, sigma)[0]
        c = (e - s) / (1 - a).clamp(min=GAP_FLOOR)
        shape = (-1,) + (1,) * (levels[0].dim() - 1)
        as_level = lambda v: v.float().view(shape)  # noqa: E731
        outputs = self.network([as_level(c_in) * x for x in levels], t, y, main_stage)
        c_x, c_hat, c_up = as_level(-c), as_level(e * (1 + c * tau)), as_level(-s * (1 - c * (1 - tau)))
        velocities = []
        for k, (x, f) in enumerate(zip(levels, outputs)):
            x_hat = as_level(sigma) * f
            v = c_x * x + c_hat * x_hat
            if k > 0:  # stage 0 starts from pure noise (s = 0): no coarse term
                v = v + c_up * self.path.decomposition.up(self.path.decomposition.down(x_hat, k), k)
            velocities.append(v)
        return velocities

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["network"], name)
