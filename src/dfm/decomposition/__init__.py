"""Multi-scale decompositions: split a clean input into levels, coarse to fine, and put it back exactly.

DFM runs Flow Matching independently on every level (method.md section 3). All decompositions here deliver
*spatial-domain* levels (the network always sees maps, never coefficients) and are exact inverses of each other:
``recompose(decompose(x)) == x`` up to floating-point rounding.

Shapes: images are ``(B, C, H, W)``, videos ``(B, C, T, H, W)``. Stages are numbered coarse to fine; in Python
lists and tensors stage ``s`` of the paper is index ``s - 1`` (index 0 is the coarsest).

Example:
    >>> import torch
    >>> from dfm.decomposition import LaplacianPyramid
    >>> pyr = LaplacianPyramid(stages=2)
    >>> x = torch.randn(4, 3, 32, 32)
    >>> levels = pyr.decompose(x)
    >>> [tuple(level.shape) for level in levels]
    [(4, 3, 16, 16), (4, 3, 32, 32)]
    >>> torch.allclose(pyr.recompose(levels), x, atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dfm.decomposition.base import Decomposition, Identity, Standardized, _normalise_factors, downsample
from dfm.decomposition.dct import DCTBands
from dfm.decomposition.haar import HaarWavelet
from dfm.decomposition.laplacian import LaplacianPyramid

__all__ = [
    "DECOMPOSITIONS",
    "DCTBands",
    "Decomposition",
    "HaarWavelet",
    "Identity",
    "LaplacianPyramid",
    "Standardized",
    "build_decomposition",
    "downsample",
    "estimate_level_std",
]


@torch.no_grad()
def estimate_level_std(decomposition: Decomposition, x: Tensor) -> tuple[float, ...]:
    """Per-level standard deviation of a data batch (over all elements), for :class:`Standardized`."""
    return tuple(float(level.float().std()) for level in decomposition.decompose(x))


DECOMPOSITIONS = {
    "laplacian": LaplacianPyramid,
    "haar": HaarWavelet,
    "dct": DCTBands,
    "identity": Identity,
}


def build_decomposition(
    name: str,
    stages: int = 2,
    factors: int | Sequence[int] | None = None,
    temporal_factors: int | Sequence[int] | None = None,
    mode: str = "bilinear",
) -> Decomposition:
    """Create a decomposition by name (``laplacian``, ``haar``, ``dct``, ``identity``)."""
    if name not in DECOMPOSITIONS:
        raise ValueError(f"unknown decomposition {name!r}: choose one of {sorted(DECOMPOSITIONS)}")
    if name == "identity" or stages == 1:
        if stages != 1:
            raise ValueError(f"the identity decomposition has 1 stage, got stages={stages}")
        return Identity()
    if name == "laplacian":
        return LaplacianPyramid(stages, factors, mode, temporal_factors)
    if name == "haar":
        if factors is not None and set(_normalise_factors(stages, factors)) != {2}:
            raise ValueError(f"the Haar wavelet only halves the resolution per stage, got factors={factors}")
        tf = _normalise_factors(stages, temporal_factors, "temporal_factors", default=1)
        if set(tf) - {1, 2} or len(set(tf)) > 1:
            raise ValueError(f"haar temporal_factors must all be 1 or all be 2, got {tf}")
        return HaarWavelet(stages, temporal=bool(tf) and tf[0] == 2)
    return DCTBands(stages, factors, temporal_factors)
