"""Pyramidal Flow (Jin et al. 2024, "Pyramidal Flow Matching for Efficient Video Generative Modeling",
arXiv 2410.05954), the one-model multi-resolution baseline of the DFM paper (method.md section 7).

Time convention of the package: t = 0 is pure noise, t = 1 is data (the paper uses the same one).
Section references are to the paper's Sec. 3.1 ("Pyramidal Flow Matching", with its unified-training and
inference-with-renoising parts); we could not re-check the equation numbers offline, so every equation we follow
is written out below instead of cited by number. Stages k = 0..K-1 run coarse to fine
(our stage k is the paper's pyramid level K-1-k: the paper counts down from the coarsest level).

**Pyramid** (paper Sec. 3.1). A *Gaussian* pyramid of downsampled images, not Laplacian residuals:
``X_k = Down(X, F_k)`` with ``F_k`` the product of the factors of the later jumps, ``X_{K-1} = X``.
Decision: ``Down`` is the block mean (identical to bilinear x1/2 with align_corners=False for factor 2, the DFM
pyramid's filter) and ``Up`` is nearest-neighbour block repetition, because the re-noising rule below is derived
for noise that ``Up`` copies into blocks.

**Piecewise path** (paper Sec. 3.1, the endpoint equations and the interpolation between them). Global time is
split into windows ``[b_k, b_{k+1}]`` with ``0 = b_0 < b_1 < ... < b_K = 1`` (default: equal windows). Within
stage k, with one noise ``n ~ N(0, I)`` at resolution k shared by both endpoints (the paper's coupling)::

    end point    E_k = e_k · X_k           + (1 - e_k) · n,      e_k = b_{k+1}
    start point  S_k = s_k · Up(X_{k-1})   + (1 - s_k) · n,      s_0 = 0 (pure noise at the coarsest level)
    path         x_τ = τ · E_k + (1 - τ) · S_k,                 τ = (t - b_k) / (b_{k+1} - b_k) in [0, 1]
    target       v   = E_k - S_k   (the velocity in the local time τ; the network is told the global t)

so the last stage ends on the data (e_{K-1} = 1). The start point is noisier than the previous end point:
``s_k < b_k = e_{k-1}`` (see below).

**Re-noising at a jump** (paper Sec. 3.1, "inference with renoising"). At the end of stage k-1 the state is
``E_{k-1} = e X_{k-1} + (1 - e) n`` with n i.i.d. at the coarse resolution (e = e_{k-1}). ``Up`` copies each
noise value into an f x f block (m = f² pixels, correlation 1 inside a block), while ``S_k`` needs i.i.d. noise.
The paper rescales and adds block-correlated noise::

    S_k = (s_k / e) · Up(E_{k-1}) + α · n',     n' ~ N(0, Σ'),  Σ' = (1 + γ) I - γ 1 1ᵀ  inside each block

Matching the mean (s_k Up(X_{k-1})) and the covariance ((1 - s_k)² I) of the training start point gives, with
``r = sqrt(γ / (1 + γ))``::

    s_k = r e / (1 - e + r e),     α = (1 - s_k) / sqrt(1 + γ)

For the paper's γ = 1/3 this is r = 1/2, ``s_k = e / (2 - e)`` (equivalently ``e = 2 s_k / (1 + s_k)``),
``s_k / e = (1 + s_k) / 2`` and ``α = sqrt(3) (1 - s_k) / 2``: the paper's re-noising equation.

**γ and the number of stages** (our decision; the DFM paper writes "γ = 1/3 for 3 stages"). γ does not depend on
the number of stages, only on the block size m that one jump's ``Up`` creates: Σ' has eigenvalue 1 + γ on the
m - 1 zero-mean directions of a block and 1 - (m - 1) γ on the block mean, so γ ≤ 1/(m - 1), and γ = 1/(m - 1)
makes n' leave every block mean (the coarse content) untouched. The paper's 1/3 is this value for 2 x 2 blocks,
so our 2-stage default with one factor-2 jump is also γ = 1/3; a factor-4 jump gets 1/15. Note γ → 0 forces
s_k → 0: without correlated noise a jump would have to discard the coarse result.

**Training** (paper Sec. 3.1, unified training): every sample trains one stage; stages get an equal share of
every batch (stage = (i + offset) mod K, a random offset per batch), τ ~ U(0, 1) inside the stage's window
(decision: uniform, ``time_dist="logit_normal"`` is available), loss ``mean_batch ‖G - v‖²``.

**Model** (option (a) of our brief): one :class:`~dfm.models.DFMDiT` with ``stage_factors`` = the pyramid's
resolution factors. Every stage yields the same token grid, so this is the same backbone and token count as the
other methods; the per-stage patch embeddings and heads take the per-resolution inputs. Only the current stage's
input is non-zero, ``main_stage`` = k tells the model which, its time slot holds the global t (the others 0), and
only head k's output is used. The model itself is never preconditioned (a ``precondition=True`` model assumes the
DFM path and is refused): :class:`PyramidalPreconditioning` wraps it with the scalings of this path instead.

**Preconditioning** (our derivation; the DFM paper preconditions its baselines too but gives no formula). Inside
stage k, ``x_τ = a X̃ + (1 - a) n`` with ``a = τ e_k + (1 - τ) s_k`` and ``X̃`` a mix of ``X_k`` and
``Up(X_{k-1})``, and ``v = e_k X_k - s_k Up(X_{k-1}) - (e_k - s_k) n``. Treating both data terms as one signal of
the level's std σ_k, x_τ is the DFM path at time a and v is (e_k - s_k) times its velocity, so::

    v̂ = (e_k - s_k) · (c_skip(a) x_τ + c_out(a) F(c_in(a) x_τ, t, ...))     (c_* of dfm.models.precondition, σ_k)

which gives the network unit-variance inputs and targets up to that approximation (any choice is an exact
reparametrisation; the approximation only affects how close to unit variance they are).

**Sampling** (paper Sec. 3.1 and 4): equal Euler (or Heun) steps per stage in τ; at each jump the re-noising
rule above. Classifier-free guidance on every stage.

Example:
    >>> import torch
    >>> from dfm.baselines.pyramidal import GaussianPyramid, PyramidalPath
    >>> path = PyramidalPath(GaussianPyramid(2))
    >>> path.boundaries, path.gammas, round(path.start_coef(1), 4)
    ((0.0, 0.5, 1.0), (0.3333333333333333,), 0.3333)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dfm.baselines.common import mse_per_sample, stage_statistics, unwrap
from dfm.decomposition import Decomposition, _block_mean, _block_repeat, _normalise_factors
from dfm.methods import Method, register_method, two_stage_baseline
from dfm.models.precondition import flow_preconditioning
from dfm.objective import LossOutput, VelocityModel, logit_normal, randn
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

TIME_DISTS = ("uniform", "logit_normal")


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


class PyramidalPreconditioning:
    """Wrap a velocity model with per-stage EDM scalings of the Pyramidal Flow path (module docstring).

    ``data_std`` holds σ_k of every Gaussian-pyramid level. The wrapped model sees the scaled input
    ``c_in(a) x_τ`` and the unchanged global time; it is a plain callable, so DDP/FSDP wrappers stay outside.
    """

    def __init__(self, model: VelocityModel, path: PyramidalPath, data_std: Sequence[float]) -> None:
        if len(data_std) != path.num_stages or min(data_std) <= 0:
            raise ValueError(f"data_std={tuple(data_std)} needs one positive value per stage ({path.num_stages})")
        self.model, self.path = model, path
        self.data_std = tuple(float(v) for v in data_std)
        self.start = tuple(path.start_coef(k) for k in range(path.num_stages))
        self.end = tuple(path.end_coef(k) for k in range(path.num_stages))

    def __call__(self, levels_t: list[Tensor], t: Tensor, y: Tensor | None, main_stage: Tensor) -> list[Tensor]:
        stage = main_stage.long()
        t_global = t.gather(1, stage[:, None])[:, 0].double()
        tau = self.path.local_time(t_global, stage)
        e = torch.tensor(self.end, dtype=torch.float64, device=t.device)[stage]
        s = torch.tensor(self.start, dtype=torch.float64, device=t.device)[stage]
        sigma = torch.tensor(self.data_std, dtype=torch.float64, device=t.device)[stage]
        c_in, c_skip, c_out = flow_preconditioning(tau * e + (1 - tau) * s, sigma)
        scale = e - s
        outs = []
        shape = (-1,) + (1,) * (levels_t[0].dim() - 1)
        preds = self.model([lv * c_in.to(lv.dtype).view(shape) for lv in levels_t], t, y, main_stage)
        for lv, out in zip(levels_t, preds):
            k_skip, k_out = ((scale * c).to(out.dtype).view(shape) for c in (c_skip, c_out))
            outs.append(k_skip * lv.to(out.dtype) + k_out * out)
        return outs


def _check_model(model: object) -> None:
    config = getattr(unwrap(model), "config", None)
    if getattr(config, "precondition", False):
        raise ValueError(
            "Pyramidal Flow cannot use a model built with precondition=True: that scaling assumes the DFM path "
            "X_t = t X + (1 - t) ε per stage; give PyramidalObjective / sample_pyramidal data_std instead"
        )


# ------------------------------------------------------------------------------------------------ training
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
        data_std: σ_k of every pyramid level: the model is wrapped in :class:`PyramidalPreconditioning`.

    Example:
        >>> import torch
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
        data_std: Sequence[float] | None = None,
    ) -> None:
        if time_dist not in TIME_DISTS:
            raise ValueError(f"time_dist={time_dist!r}: choose one of {TIME_DISTS}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.path = path
        self.decomposition = path.decomposition
        self.num_stages = path.num_stages
        self.time_dist, self.loc, self.scale = time_dist, float(loc), float(scale)
        self.data_std = None if data_std is None else tuple(float(v) for v in data_std)

    def begin_step(self, step: int, model: nn.Module | None = None, ema: nn.Module | None = None) -> None:
        """Called by the trainer before every optimiser step; one model trains every stage, so nothing to do."""

    def draw(
        self,
        level_shapes: Sequence[Sequence[int]],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> PyramidalDraw:
        """Stages interleaved over the batch (an equal share each), local times, and noise for every level."""
        if len(level_shapes) != self.num_stages:
            raise ValueError(f"expected {self.num_stages} level shapes, got {len(level_shapes)}")
        b, k = level_shapes[0][0], self.num_stages
        offset = int(torch.randint(k, (1,), generator=generator))
        stage = (torch.arange(b) + offset) % k
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
    ) -> LossOutput:
        """Mean over the batch of ``‖G_k(x_τ, t, y, k) - (E_k - S_k)‖²`` with k each sample's stage."""
        _check_model(model)
        levels = self.decomposition.decompose(x)
        if draw is None:
            draw = self.draw([tuple(lv.shape) for lv in levels], generator, x.device, x.dtype)
        path = self.sample_path(levels, draw)
        if self.data_std is not None:
            model = PyramidalPreconditioning(model, self.path, self.data_std)
        preds = model(path.levels_t, path.t, y, path.main_stage)
        if len(preds) != self.num_stages:
            raise ValueError(f"the model returned {len(preds)} velocities for {self.num_stages} stages")
        per_stage = torch.stack([mse_per_sample(p, tgt) for p, tgt in zip(preds, path.targets)], dim=1)  # (B, K)
        # A sample's error on other stages is ||G - 0||² of an unused head: keep only its own stage.
        per_sample = per_stage.gather(1, path.main_stage.long()[:, None])[:, 0]
        loss, stage_losses, counts = stage_statistics(per_sample, path.main_stage, self.num_stages)
        return LossOutput(loss, stage_losses, counts, path)


# ------------------------------------------------------------------------------------------------ sampling
@torch.no_grad()
def _integrate_window(velocity, x: Tensor, window: tuple[float, float], n: int, solver: str) -> tuple[Tensor, Tensor]:
    """``n`` ODE steps of local time τ from 0 to 1 over one stage's window (global time lo + τ (hi - lo));
    returns the end state and the last velocity."""
    lo, hi = window
    v = torch.zeros_like(x)
    for i in range(n):
        tau0, tau1 = i / n, (i + 1) / n
        (x,), (v,) = ode_step(lambda xs, tau: [velocity(xs[0], lo + tau * (hi - lo))], [x], tau0, tau1,
                              [tau1 - tau0], solver, ends_clean=i == n - 1 and hi >= 1.0)  # fmt: skip
    return x, v


def sample_pyramidal(
    model: VelocityModel,
    path: PyramidalPath,
    shape: Sequence[int],
    y: Tensor | None = None,
    *,
    steps: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    guidance: float | Sequence[float] = 1.0,
    null_class: int | None = None,
    solver: str = "euler",
    device: torch.device | str | None = None,
    callback: PreviewCallback | None = None,
    data_std: Sequence[float] | None = None,
) -> SampleOutput:
    """Generate ``shape[0]`` samples stage by stage, re-noising at every jump.

    Args:
        model: ``model(levels, t, y, main_stage) -> velocities`` (a DFMDiT with the pyramid's stage factors).
        path: the windows and γ the model was trained with.
        shape: full-resolution output shape (B, C, H, W) or (B, C, T, H, W).
        steps: steps per stage (default 20 each: the paper's equal split); each stage integrates τ from 0 to 1.
        seeds: one seed per sample: its start noise and its jump noises depend on that seed only.
        guidance: classifier-free guidance scale, one for all stages or one per stage.
        callback: ``callback(stage, preview)`` at the end of every stage.
        data_std: the levels' stds the model was trained with (:class:`PyramidalPreconditioning`), if any.

    Returns:
        ``SampleOutput`` with the images, the end state of every stage (``levels``) and one preview per stage:
        the denoised estimate ``x + (1 - e_k) v / (e_k - s_k)`` at the stage's end, which treats the upsampled
        coarse term of the path as signal (exact for the first and last stage, an approximation in between).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: choose one of {SOLVERS}")
    _check_model(model)
    k_count = path.num_stages
    steps = tuple(steps) if steps is not None else (20,) * k_count
    if len(steps) != k_count or any(int(n) < 1 for n in steps):
        raise ValueError(f"steps={steps} needs one positive step count per stage ({k_count})")
    shapes = path.decomposition.level_shapes(shape)
    b = shapes[0][0]
    scales, use_cfg, null_class, y = prepare_guidance(unwrap(model), y, b, guidance, k_count, null_class, device)
    if data_std is not None:
        model = PyramidalPreconditioning(model, path, data_std)
    # Start noise of stage 0 first, then the i.i.d. normals of every jump, all drawn from each sample's seed.
    draws = initial_noise(shapes, seeds, generator, device)

    def velocity(x: Tensor, stage: int, t: float) -> Tensor:
        # Only the current stage's input is non-zero; its time slot holds the global time.
        levels = [x if s == stage else x.new_zeros((b, *shp[1:])) for s, shp in enumerate(shapes)]
        times = x.new_zeros(b, k_count)
        times[:, stage] = t
        stage_t = torch.full((b,), stage, dtype=torch.long, device=x.device)
        forward = lambda a, labels: [model(a[:-2], a[-2], labels, a[-1])[stage]]  # noqa: E731
        w = [scales[stage] if use_cfg else 1.0]
        return guided_velocity(forward, [*levels, times, stage_t], y, w, null_class)[0]

    x = draws[0].float()
    ends, previews = [], []
    for k in range(k_count):
        if k > 0:
            x = path.renoise(x, k, draws[k].float())
        x, v = _integrate_window(lambda xk, t, k=k: velocity(xk, k, t), x, path.window(k), int(steps[k]), solver)
        ends.append(x)
        e, s = path.end_coef(k), path.start_coef(k)
        preview = x + (1 - e) * v / (e - s)
        previews.append(preview)
        if callback is not None:
            callback(k, preview)
    return SampleOutput(x, ends, previews)


# ------------------------------------------------------------------------------------------------ registry entry
@dataclass
class PyramidalOptions:
    """Pyramidal Flow's own settings (``-o method.options.KEY=VALUE``)."""

    windows: tuple[float, ...] | None = None  #: inner window boundaries; None = equal windows
    gamma: tuple[float, ...] | None = None  #: jump-noise correlation per jump; None = 1/(f²-1) = 1/3
    time: str = "uniform"  #: law of τ in a window, uniform | logit_normal(main_loc, main_scale)


class Pyramidal(Method):
    """Pyramidal Flow: one model over a Gaussian pyramid, time windows per stage, re-noising at every jump."""

    name = "pyramidal"
    description = "Pyramidal Flow: one model, per-stage time windows over a Gaussian pyramid"
    Options = PyramidalOptions

    def validate(self, cfg: RunConfig) -> None:
        m = cfg.method
        if m.stages < 2:
            raise ValueError("method pyramidal needs method.stages >= 2 (one stage is plain Flow Matching)")
        if m.standardize or m.decomposition != "laplacian":
            raise ValueError("method pyramidal has its own pyramid: leave method.decomposition and standardize alone")
        if m.loss_weighting != "velocity":
            raise ValueError("method pyramidal trains with the velocity loss: set method.loss_weighting=velocity")

    def from_dfm(self, m: MethodConfig) -> MethodConfig:
        return two_stage_baseline(m, self.name)

    def decomposition(self, m: MethodConfig) -> Decomposition:
        return GaussianPyramid(m.stages, m.factors)  # downsampled images, not residuals

    def path(self, m: MethodConfig, decomposition: Decomposition) -> PyramidalPath:
        opts = self.options(m)
        return PyramidalPath(decomposition, opts.windows, opts.gamma)

    def _path_std(self, m: MethodConfig) -> tuple[float, ...] | None:
        return m.data_std if m.precondition else None  # the path's own preconditioning

    def objective(self, m: MethodConfig, decomposition: Decomposition, total_steps: int | None = None) -> Any:
        path = self.path(m, decomposition)
        return PyramidalObjective(path, self.options(m).time, m.main_loc, m.main_scale, self._path_std(m))

    def network_preconditioned(self, m: MethodConfig) -> bool:
        return False  # its preconditioning belongs to its path (PyramidalPreconditioning), not to the network

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
        path = self.path(m, decomposition)
        return sample_pyramidal(model, path, shape, labels, steps=schedule.steps, data_std=self._path_std(m), **common)


register_method(Pyramidal())
