"""The Haar wavelet as a decomposition (the paper's Table 6): the low-pass band, then each stage's high-pass bands
mapped back to the spatial domain."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from dfm.decomposition.base import Decomposition, _block_mean, _block_repeat, _normalise_factors


class HaarWavelet(Decomposition):
    """Haar discrete wavelet transform, mapped back to the spatial domain (the paper's DWT variant, Table 6).

    Per level, the 2D Haar transform splits a map into the low-pass band LL and three high-pass bands. Stage 1
    is the LL band as a low-resolution map, normalised as the 2x2 block mean (orthonormal LL / 2) so it has the
    image's scale; stage s > 1 is the inverse DWT of the high-pass bands alone, i.e. the map at stage s minus
    its block-constant low-pass part. With more than two stages the low band is split again. Exact.

    Only factor 2 exists for Haar; ``temporal=True`` makes each jump also halve the frame count of videos (a 3D
    Haar transform).
    """

    independent_levels = True

    def __init__(self, stages: int = 2, temporal: bool = False) -> None:
        _normalise_factors(stages, None)
        self.num_stages = stages
        self.temporal_factors = (2 if temporal else 1,) * (stages - 1)

    def _spatial_factors(self) -> tuple[int, ...]:
        return (2,) * (self.num_stages - 1)

    def first(self, stages: int) -> HaarWavelet:
        return HaarWavelet(stages, temporal=self.temporal_factors[:1] == (2,))

    def decompose(self, x: Tensor) -> list[Tensor]:
        self._check_input(x)
        sizes = self.stage_sizes(tuple(x.shape[2:]))
        levels = []
        cur = x
        for size in reversed(sizes[:-1]):
            low = _block_mean(cur, size)
            levels.insert(0, cur - _block_repeat(low, tuple(cur.shape[2:])))
            cur = low
        levels.insert(0, cur)
        return levels

    def recompose(self, levels: Sequence[Tensor]) -> Tensor:
        self._check_levels(levels)
        out = levels[0]
        for level in levels[1:]:
            out = _block_repeat(out, tuple(level.shape[2:])) + level
        return out

    def __repr__(self) -> str:
        return f"HaarWavelet(stages={self.num_stages}, temporal={self.temporal_factors[:1] == (2,)})"
