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

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

Size = tuple[int, ...]  # spatial (H, W) or spatio-temporal (T, H, W) size of one level

_INTERP_MODES = ("bilinear", "bicubic", "nearest", "nearest-exact", "area")


def _normalise_factors(
    stages: int, factors: int | Sequence[int] | None, name: str = "factors", default: int = 2
) -> tuple[int, ...]:
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be a positive integer, got {stages!r}")
    if factors is None:
        return (default,) * (stages - 1)
    factors = (factors,) * (stages - 1) if isinstance(factors, int) else tuple(int(f) for f in factors)
    if len(factors) != stages - 1:
        raise ValueError(
            f"{name} must have stages - 1 = {stages - 1} entries (one per stage jump), got {len(factors)}: {factors}"
        )
    if any(f < 1 for f in factors):
        raise ValueError(f"{name} must be integers >= 1, got {factors}")
    return factors


class Decomposition(ABC):
    """A multi-scale decomposition with an exact inverse.

    Subclasses define the level sizes (``stage_sizes``), ``decompose`` and ``recompose``. ``recompose`` accepts
    the first ``k`` levels only and then returns the partial reconstruction at stage ``k``'s resolution: the
    *preview* ``X̄_k`` of the paper.
    """

    #: number of stages S
    num_stages: int
    #: per-jump temporal factors (all 1 when videos are decomposed frame by frame)
    temporal_factors: tuple[int, ...]

    # -- sizes -------------------------------------------------------------------------------------------
    @abstractmethod
    def _spatial_factors(self) -> tuple[int, ...]:
        """Spatial factor between stage i and i + 1, for i = 0 .. S-2."""

    def stage_sizes(self, size: Size) -> list[Size]:
        """Sizes (H, W) or (T, H, W) of every level, coarse to fine, for a finest size ``size``.

        Raises:
            ValueError: if a dimension cannot be divided by the factors.
        """
        size = tuple(int(s) for s in size)
        if len(size) not in (2, 3):
            raise ValueError(f"size must be (H, W) or (T, H, W), got {size}")
        spatial = self._spatial_factors()
        temporal = self.temporal_factors if len(size) == 3 else ()
        need = {-2: math.prod(spatial), -1: math.prod(spatial)}
        if temporal:
            need[-3] = math.prod(temporal)
        names = {-3: "frame count", -2: "height", -1: "width"}
        for d, n in need.items():
            if size[d] % n:
                fs = temporal if d == -3 else spatial
                raise ValueError(
                    f"{names[d]} {size[d]} cannot be split by the factors {fs} of {type(self).__name__}: "
                    f"it must be divisible by {n} (pad, crop or resize the input, or change the factors)"
                )
        sizes = [size]
        for i in reversed(range(self.num_stages - 1)):
            nxt = list(sizes[0])
            nxt[-2] //= spatial[i]
            nxt[-1] //= spatial[i]
            if temporal:
                nxt[-3] //= temporal[i]
            sizes.insert(0, tuple(nxt))
        return sizes

    def level_shapes(self, shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Full tensor shapes of every level for an input of shape ``(B, C, H, W)`` or ``(B, C, T, H, W)``."""
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (4, 5):
            raise ValueError(f"expected an input shape (B, C, H, W) or (B, C, T, H, W), got {shape}")
        return [shape[:2] + s for s in self.stage_sizes(shape[2:])]

    # -- transforms --------------------------------------------------------------------------------------
    @abstractmethod
    def decompose(self, x: Tensor) -> list[Tensor]:
        """Split ``x`` into ``num_stages`` levels, coarse to fine."""

    @abstractmethod
    def recompose(self, levels: Sequence[Tensor]) -> Tensor:
        """Exact inverse of :meth:`decompose`. With only the first ``k`` levels, returns the preview ``X̄_k``."""

    def preview(self, levels: Sequence[Tensor], stage: int, full_size: bool = False) -> Tensor:
        """The partial reconstruction after stage ``stage`` (0-based), i.e. from ``levels[: stage + 1]``.

        With ``full_size=True`` the preview is brought to the finest resolution by the decomposition's own
        upsampling (``recompose`` with the finer levels set to zero).
        """
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage must be in [0, {self.num_stages - 1}], got {stage}")
        if len(levels) < stage + 1:
            raise ValueError(f"preview of stage {stage} needs {stage + 1} levels, got {len(levels)}")
        if not full_size:
            return self.recompose(levels[: stage + 1])
        if len(levels) != self.num_stages:
            raise ValueError("full_size previews need all levels (the finer ones only provide their shapes)")
        filled = list(levels[: stage + 1]) + [torch.zeros_like(lv) for lv in levels[stage + 1 :]]
        return self.recompose(filled)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() not in (4, 5):
            raise ValueError(f"expected a tensor (B, C, H, W) or (B, C, T, H, W), got shape {tuple(x.shape)}")
        self.stage_sizes(tuple(x.shape[2:]))  # raises on sizes that cannot be split

    def _check_levels(self, levels: Sequence[Tensor]) -> None:
        if not 1 <= len(levels) <= self.num_stages:
            raise ValueError(f"expected 1 to {self.num_stages} levels, got {len(levels)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(stages={self.num_stages})"


class Identity(Decomposition):
    """One stage, the input itself: DFM with this decomposition is plain Flow Matching."""

    def __init__(self) -> None:
        self.num_stages = 1
        self.temporal_factors = ()

    def _spatial_factors(self) -> tuple[int, ...]:
        return ()

    def decompose(self, x: Tensor) -> list[Tensor]:
        self._check_input(x)
        return [x]

    def recompose(self, levels: Sequence[Tensor]) -> Tensor:
        self._check_levels(levels)
        return levels[0]


def _resize(x: Tensor, size: Size, mode: str) -> Tensor:
    """Resize the trailing dims of ``x`` to ``size`` (2 dims per frame, or 3 dims for a spatio-temporal resize)."""
    if tuple(x.shape[-len(size) :]) == tuple(size):
        return x
    align = False if mode in ("bilinear", "bicubic") else None
    if x.dim() == 4:
        return F.interpolate(x, size=size, mode=mode, align_corners=align, antialias=False)
    b, c, t = x.shape[:3]
    if len(size) == 2 or size[0] == t:
        # Frame by frame: fold time into the batch so every 2D mode works.
        hw = size[-2:]
        y = x.transpose(1, 2).reshape(b * t, c, *x.shape[-2:])
        y = F.interpolate(y, size=hw, mode=mode, align_corners=align, antialias=False)
        return y.reshape(b, t, c, *hw).transpose(1, 2)
    mode3 = {"bilinear": "trilinear"}.get(mode, mode)
    if mode3 == "bicubic":
        raise ValueError("mode 'bicubic' has no 3D version: use 'bilinear' or 'nearest' with temporal_factors")
    return F.interpolate(x, size=size, mode=mode3, align_corners=False if mode3 == "trilinear" else None)


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def downsample(x: Tensor, size: Size, mode: str = "bilinear") -> Tensor:
    """Resize the trailing dims of ``x`` down to ``size`` without aliasing (for the smooth modes).

    A factor-2 step with ``bilinear`` (``align_corners=False``) averages exactly the 2x2 block under each output
    pixel, so a power-of-two factor is done as successive 2x steps (a 4x jump averages its whole 4x4 block, where
    one direct 4x bilinear resize would average only the centre 2x2 of it and alias), as the paper's code builds
    its pyramid. ``bicubic`` also steps by 2 (each step a 4-tap low-pass filter). Other integer factors (3, 6, ...)
    use the block mean (``area``) for the smooth modes. ``nearest`` and ``nearest-exact`` subsample by definition
    and keep doing so: choose them only when that is what you want.

    Example:
        >>> import torch
        >>> x = torch.arange(16.0).view(1, 1, 4, 4)
        >>> downsample(x, (1, 1)).item() == x.mean().item()  # the whole 4x4 block, not its centre
        True
    """
    cur = tuple(x.shape[-len(size) :])
    size = tuple(int(s) for s in size)
    if cur == size:
        return x
    ratios = [a // b for a, b in zip(cur, size)]
    if any(a % b for a, b in zip(cur, size)) or min(ratios) < 1:
        raise ValueError(f"cannot downsample {cur} to {size}: every size must divide the input's")
    if mode.startswith("nearest"):
        return _resize(x, size, mode)
    if mode == "area" or not all(_is_power_of_two(r) for r in ratios):
        return _block_mean(x, size) if len(size) == x.dim() - 2 else _block_mean(x, (x.shape[2], *size))
    while cur != size:  # one 2x step in every dimension that still needs it
        cur = tuple(c // 2 if c > s else c for c, s in zip(cur, size))
        x = _resize(x, cur, mode)
    return x


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


def _block_mean(x: Tensor, size: Size) -> Tensor:
    """Average non-overlapping blocks so that the trailing dims become ``size`` (one size per trailing dim)."""
    kernel = tuple(a // b for a, b in zip(x.shape[2:], size))
    return F.avg_pool2d(x, kernel) if x.dim() == 4 else F.avg_pool3d(x, kernel)


def _block_repeat(x: Tensor, size: Size) -> Tensor:
    """Nearest-neighbour upsampling by integer factors (each value repeated over its block)."""
    for d in range(-len(size), 0):
        f = size[d] // x.shape[d]
        if f > 1:
            x = x.repeat_interleave(f, dim=d)
    return x


class HaarWavelet(Decomposition):
    """Haar discrete wavelet transform, mapped back to the spatial domain (the paper's DWT variant, Table 6).

    Per level, the 2D Haar transform splits a map into the low-pass band LL and three high-pass bands. Stage 1
    is the LL band as a low-resolution map, normalised as the 2x2 block mean (orthonormal LL / 2) so it has the
    image's scale; stage s > 1 is the inverse DWT of the high-pass bands alone, i.e. the map at stage s minus
    its block-constant low-pass part. With more than two stages the low band is split again. Exact.

    Only factor 2 exists for Haar; ``temporal=True`` makes each jump also halve the frame count of videos (a 3D
    Haar transform).
    """

    def __init__(self, stages: int = 2, temporal: bool = False) -> None:
        _normalise_factors(stages, None)
        self.num_stages = stages
        self.temporal_factors = (2 if temporal else 1,) * (stages - 1)

    def _spatial_factors(self) -> tuple[int, ...]:
        return (2,) * (self.num_stages - 1)

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


class Standardized(Decomposition):
    """Wrap a decomposition so that every level is divided by a fixed per-stage scale (unit std from data).

    ``decompose(x) = [X_s / std_s]`` and ``recompose`` multiplies back, so the objective and the samplers work
    unchanged in the standardised space (method.md section 4, step 6: off for images, on for video).
    """

    def __init__(self, base: Decomposition, stds: Sequence[float]) -> None:
        if len(stds) != base.num_stages:
            raise ValueError(f"need one std per stage ({base.num_stages}), got {len(stds)}")
        if any(not (s > 0 and math.isfinite(s)) for s in stds):
            raise ValueError(f"standardisation stds must be positive and finite, got {tuple(stds)}")
        self.base = base
        self.stds = tuple(float(s) for s in stds)
        self.num_stages = base.num_stages
        self.temporal_factors = base.temporal_factors

    def _spatial_factors(self) -> tuple[int, ...]:
        return self.base._spatial_factors()

    def decompose(self, x: Tensor) -> list[Tensor]:
        return [lv / s for lv, s in zip(self.base.decompose(x), self.stds)]

    def recompose(self, levels: Sequence[Tensor]) -> Tensor:
        self._check_levels(levels)  # zip below would silently drop extra levels
        return self.base.recompose([lv * s for lv, s in zip(levels, self.stds)])

    def __repr__(self) -> str:
        return f"Standardized({self.base!r}, stds={tuple(round(s, 4) for s in self.stds)})"


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
