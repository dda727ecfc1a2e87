"""The Laplacian pyramid (the paper's default decomposition, method.md section 3)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from dfm.decomposition.base import _INTERP_MODES, Decomposition, Size, _normalise_factors, _resize, downsample


class LaplacianPyramid(Decomposition):
    """Laplacian pyramid (the paper's default decomposition).

    With ``down(X, s)`` / ``up(·, s)`` resizing to the resolution of stage s (method.md section 3)::

        X_1 = down(X, 1),    X_s = down(X, s) - up(down(X, s - 1), s)   for s > 1
        X̄_1 = X_1,           X̄_s = up(X̄_{s-1}, s) + X_s,                X = X̄_S

    so ``X̄_s = down(X, s)`` and the reconstruction is exact. ``down`` is built recursively, as in the paper's
    code: ``down(X, s) = downsample(down(X, s + 1))``, and :func:`downsample` goes in 2x steps, so every coarse
    pixel is the mean of the whole block it covers (a 2x2 box per step for bilinear) and nothing above the coarse
    level's Nyquist frequency folds into it, for 4x jumps and for 3 or more stages alike. ``up`` is one resize
    (upsampling does not alias). Default resampling: bilinear, ``align_corners=False`` (the paper names no
    filter). Factor 2 between stages unless ``factors`` says otherwise, e.g. ``LaplacianPyramid(2, factors=(4,))``
    for a 256 -> 1024 jump.

    Args:
        stages: number of stages S (1 gives the identity).
        factors: spatial factor per stage jump (S - 1 integers, or one integer for all), default 2.
        mode: resampling mode, one of ``bilinear``, ``bicubic``, ``nearest``, ``nearest-exact``, ``area``.
        temporal_factors: for videos, temporal factor per jump (default 1: a spatial pyramid per frame).
    """

    def __init__(
        self,
        stages: int = 2,
        factors: int | Sequence[int] | None = None,
        mode: str = "bilinear",
        temporal_factors: int | Sequence[int] | None = None,
    ) -> None:
        self.num_stages = stages
        self.factors = _normalise_factors(stages, factors)
        self.temporal_factors = _normalise_factors(stages, temporal_factors, "temporal_factors", default=1)
        if mode not in _INTERP_MODES:
            raise ValueError(f"mode must be one of {_INTERP_MODES}, got {mode!r}")
        if mode == "bicubic" and any(f > 1 for f in self.temporal_factors):
            raise ValueError("mode 'bicubic' has no 3D version: use 'bilinear' or 'nearest' with temporal_factors")
        self.mode = mode

    def _spatial_factors(self) -> tuple[int, ...]:
        return self.factors

    def first(self, stages: int) -> LaplacianPyramid:
        return LaplacianPyramid(stages, self.factors[: stages - 1], self.mode, self.temporal_factors[: stages - 1])

    def _sizes(self, x: Tensor) -> list[Size]:
        return self.stage_sizes(tuple(x.shape[2:]))

    def decompose(self, x: Tensor) -> list[Tensor]:
        self._check_input(x)
        sizes = self._sizes(x)
        downs = [x]  # down(X, s), built from the finest level down; the last is X itself
        for size in reversed(sizes[:-1]):
            downs.insert(0, downsample(downs[0], size, self.mode))
        return [downs[0]] + [downs[s] - _resize(downs[s - 1], sizes[s], self.mode) for s in range(1, len(sizes))]

    def recompose(self, levels: Sequence[Tensor]) -> Tensor:
        self._check_levels(levels)
        out = levels[0]
        for level in levels[1:]:
            out = _resize(out, tuple(level.shape[2:]), self.mode) + level
        return out

    def __repr__(self) -> str:
        return (
            f"LaplacianPyramid(stages={self.num_stages}, factors={self.factors}, mode={self.mode!r}, "
            f"temporal_factors={self.temporal_factors})"
        )
