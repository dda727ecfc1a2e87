"""DCT frequency bands as a decomposition (the paper's Table 6), each band decoded back to the spatial domain."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from dfm.decomposition.base import Decomposition, Size, _normalise_factors


@lru_cache(maxsize=64)
def _dct_matrix(n: int, device: str, dtype: torch.dtype) -> Tensor:
    """Orthonormal DCT-II matrix D (n x n): coefficients c = D @ x, inverse x = D.T @ c."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(device=device, dtype=dtype)


def _apply_along(x: Tensor, mat: Tensor, dim: int) -> Tensor:
    """Multiply ``mat`` (m x n) along dimension ``dim`` of ``x`` (whose size there is n)."""
    x = x.movedim(dim, -1)
    x = x @ mat.T
    return x.movedim(-1, dim)


class DCTBands(Decomposition):
    """Frequency bands of the orthonormal DCT, decoded back to the spatial domain (the paper's DCT variant).

    With C = DCT(X) at full resolution N and stage s owning the low-frequency block of size n_s (n_S = N):
    stage 1 decodes the block n_1 at resolution n_1, stage s > 1 decodes the coefficients of block n_s that are
    not in block n_{s-1}, at resolution n_s. Each decode is scaled by sqrt(n_s / N) per dimension so that a
    level keeps the image's intensity scale (the DC term then equals the mean, as for the other decompositions).
    Exact: recompose zero-pads the accumulated coefficients stage by stage.
    """

    independent_levels = True

    def __init__(
        self,
        stages: int = 2,
        factors: int | Sequence[int] | None = None,
        temporal_factors: int | Sequence[int] | None = None,
    ) -> None:
        self.num_stages = stages
        self.factors = _normalise_factors(stages, factors)
        self.temporal_factors = _normalise_factors(stages, temporal_factors, "temporal_factors", default=1)

    def _spatial_factors(self) -> tuple[int, ...]:
        return self.factors

    def first(self, stages: int) -> DCTBands:
        return DCTBands(stages, self.factors[: stages - 1], self.temporal_factors[: stages - 1])

    @staticmethod
    def _dims(x: Tensor) -> tuple[int, ...]:
        return tuple(range(2, x.dim()))

    def _dct(self, x: Tensor, inverse: bool = False) -> Tensor:
        compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        y = x.to(compute)
        for dim in self._dims(x):
            n = y.shape[dim]
            if n == 1:
                continue
            d = _dct_matrix(n, str(y.device), compute)
            y = _apply_along(y, d.T if inverse else d, dim)
        return y.to(x.dtype)

    @staticmethod
    def _scale(size: Size, full: Size) -> float:
        return math.prod(math.sqrt(a / b) for a, b in zip(size, full))

    def decompose(self, x: Tensor) -> list[Tensor]:
        self._check_input(x)
        full = tuple(x.shape[2:])
        sizes = self.stage_sizes(full)
        coeffs = self._dct(x)
        levels = []
        prev: Size | None = None
        for size in sizes:
            block = coeffs[(...,) + tuple(slice(0, n) for n in size)].clone()
            if prev is not None:
                block[(...,) + tuple(slice(0, n) for n in prev)] = 0
            levels.append(self._dct(block * self._scale(size, full), inverse=True))
            prev = size
        return levels

    def recompose(self, levels: Sequence[Tensor]) -> Tensor:
        self._check_levels(levels)
        # Accumulate coefficients in the frame of the current level (sizes grow coarse to fine). A level's
        # band, measured relative to its own resolution, is its DCT divided by sqrt(n_s / N); we keep the
        # running sum at the resolution of the last level given, scaled to that level's frame.
        last = tuple(levels[-1].shape[2:])
        total = None
        for level in levels:
            size = tuple(level.shape[2:])
            c = self._dct(level) / self._scale(size, last)
            if total is None:
                total = c
            else:
                pad = []
                for a, b in zip(reversed(size), reversed(tuple(total.shape[2:]))):
                    pad += [0, a - b]
                total = F.pad(total, pad) + c
        return self._dct(total * self._scale(last, last), inverse=True)

    def __repr__(self) -> str:
        return f"DCTBands(stages={self.num_stages}, factors={self.factors}, temporal_factors={self.temporal_factors})"
