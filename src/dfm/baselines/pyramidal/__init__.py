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
every batch (stage = (i + offset) mod K, a random offset per batch; ``method.options.shares`` gives other fixed
shares, e.g. more of the batch to the fine stage), τ ~ U(0, 1) inside the stage's window
(decision: uniform, ``time_dist="logit_normal"`` is available), loss ``mean_batch ‖G - v‖²``.

**Model** (option (a) of our brief): one :class:`~dfm.models.DFMDiT` with ``stage_factors`` = the pyramid's
resolution factors. Every stage yields the same token grid, so this is the same backbone and token count as the
other methods; the per-stage patch embeddings and heads take the per-resolution inputs. Only the current stage's
input is non-zero, ``main_stage`` = k tells the model which, its time slot holds the global t (the others 0), and
only head k's output is used. Its preconditioning is that of this path, not DFM's: the method wraps the network
in :class:`~dfm.models.precondition.Preconditioned` with :func:`pyramidal_coefficients`.

**Preconditioning** (our derivation; the DFM paper preconditions its baselines too but gives no formula). Inside
stage k, ``x_τ = a X̃ + (1 - a) n`` with ``a = τ e_k + (1 - τ) s_k`` and ``X̃`` a mix of ``X_k`` and
``Up(X_{k-1})``, and ``v = e_k X_k - s_k Up(X_{k-1}) - (e_k - s_k) n``. Treating both data terms as one signal of
the level's std σ_k, x_τ is the DFM path at time a and v is (e_k - s_k) times its velocity, so::

    v̂ = (e_k - s_k) · (c_skip(a) x_τ + c_out(a) F(c_in(a) x_τ, t, ...))     (c_* of dfm.models.precondition, σ_k)

which gives the network unit-variance inputs and targets up to that approximation (any choice is an exact
reparametrisation; the approximation only affects how close to unit variance they are).

**Predicting the data** (``method.prediction=data``; our addition, the paper predicts the velocity). In stage k the
coarse term of the path is a function of the clean level, ``Up(X_{k-1}) = Up(Down(X_k)) =: U(X_k)`` (block means of a
Gaussian pyramid compose), so with ``x_τ = τ e_k X_k + (1 - τ) s_k U(X_k) + (1 - a) n`` one prediction X̂ of the
clean level gives the noise and the velocity exactly::

    n̂ = (x_τ - τ e_k X̂ - (1 - τ) s_k U(X̂)) / (1 - a),     v̂ = e_k X̂ - s_k U(X̂) - (e_k - s_k) n̂

linear in X̂ (:class:`~dfm.baselines.pyramidal.path.PyramidalDataPrediction`; X̂ = σ_k F, input c_in(a) x_τ as above).
The loss stays the velocity MSE, clamped near the end of the last stage as DFM's data prediction is.

**Sampling** (paper Sec. 3.1 and 4): equal Euler (or Heun) steps per stage in τ; at each jump the re-noising
rule above. Classifier-free guidance on every stage.

Modules: :mod:`~dfm.baselines.pyramidal.path` (pyramid, path, re-noising, preconditioning coefficients),
:mod:`~dfm.baselines.pyramidal.objective` (training), :mod:`~dfm.baselines.pyramidal.sampler` (sampling); this
module holds the method's registry entry (:class:`Pyramidal`, with its settings :class:`PyramidalOptions`).

Example:
    >>> import torch
    >>> from dfm.baselines.pyramidal import GaussianPyramid, PyramidalPath
    >>> path = PyramidalPath(GaussianPyramid(2))
    >>> path.boundaries, path.gammas, round(path.start_coef(1), 4)
    ((0.0, 0.5, 1.0), (0.3333333333333333,), 0.3333)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dfm.baselines.pyramidal.objective import (
    TIME_DISTS,
    PyramidalDraw,
    PyramidalObjective,
    PyramidalPathSample,
    check_shares,
)
from dfm.baselines.pyramidal.path import (
    GaussianPyramid,
    PyramidalDataPrediction,
    PyramidalPath,
    block_noise,
    pyramidal_coefficients,
)
from dfm.baselines.pyramidal.sampler import PyramidalSampler
from dfm.config import MethodConfig, RunConfig
from dfm.decomposition import Decomposition
from dfm.methods import Method, register_method, staged_baseline
from dfm.models.precondition import Preconditioned

__all__ = [
    "TIME_DISTS",
    "GaussianPyramid",
    "Pyramidal",
    "PyramidalDataPrediction",
    "PyramidalDraw",
    "PyramidalObjective",
    "PyramidalOptions",
    "PyramidalPath",
    "PyramidalPathSample",
    "PyramidalSampler",
    "block_noise",
    "pyramidal_coefficients",
]


@dataclass
class PyramidalOptions:
    """Pyramidal Flow's own settings (``-o method.options.KEY=VALUE``)."""

    windows: tuple[float, ...] | None = None  #: inner window boundaries; None = equal windows
    gamma: tuple[float, ...] | None = None  #: jump-noise correlation per jump; None = 1/(f²-1) = 1/3
    time: str = "uniform"  #: law of τ in a window, uniform | logit_normal(main_loc, main_scale)
    #: share of every batch that trains each stage, coarse to fine; None = equal shares (the paper's). DFM's p(Q),
    #: method.stage_probs, does not apply: Pyramidal Flow's stages are separate windows, not nested ones
    shares: tuple[float, ...] | None = None


class Pyramidal(Method):
    """Pyramidal Flow: one model over a Gaussian pyramid, time windows per stage, re-noising at every jump."""

    name = "pyramidal"
    description = "Pyramidal Flow: one model, per-stage time windows over a Gaussian pyramid"
    Options = PyramidalOptions
    uses_stage_probs = False
    uses_thresholds = PyramidalSampler.uses_thresholds  # its sampler's (each stage runs its own window)

    def validate(self, cfg: RunConfig) -> None:
        m = cfg.method
        if m.stage_probs is not None:
            raise ValueError("method pyramidal trains its stages in fixed shares of every batch: give "
                             "method.options.shares instead of method.stage_probs")  # fmt: skip
        if m.stages < 2:
            raise ValueError("method pyramidal needs method.stages >= 2 (one stage is plain Flow Matching)")
        if m.standardize or m.decomposition != "laplacian":
            raise ValueError("method pyramidal has its own pyramid: leave method.decomposition and standardize alone")
        if m.loss_weighting != "velocity":
            raise ValueError("method pyramidal trains with the velocity loss: set method.loss_weighting=velocity")
        check_shares(self.options(m).shares, m.stages)

    def from_dfm(self, cfg: RunConfig) -> RunConfig:
        return staged_baseline(cfg, self.name)

    def decomposition(self, m: MethodConfig, standardized: bool = True) -> Decomposition:
        return GaussianPyramid(m.stages, m.factors)  # downsampled images, not residuals

    def path(self, m: MethodConfig, decomposition: Decomposition) -> PyramidalPath:
        opts = self.options(m)
        return PyramidalPath(decomposition, opts.windows, opts.gamma)

    def objective(self, m: MethodConfig, decomposition: Decomposition, total_steps: int | None = None) -> Any:
        opts = self.options(m)
        return PyramidalObjective(self.path(m, decomposition), opts.time, m.main_loc, m.main_scale, m.prediction,
                                  opts.shares)  # fmt: skip

    def preconditioned(self, network: Any, m: MethodConfig) -> Any:
        path = self.path(m, self.decomposition(m))
        if m.prediction == "data":
            return PyramidalDataPrediction(network, path, m.data_std)
        return Preconditioned(network, coefficients=pyramidal_coefficients(path, m.data_std))

    def sampler(self, m: MethodConfig) -> PyramidalSampler:
        return PyramidalSampler(self.path(m, self.decomposition(m)))


register_method(Pyramidal())
