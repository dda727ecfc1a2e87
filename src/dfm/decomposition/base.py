"""What every decomposition shares: the base class with its shape rules and previews, the identity (plain Flow
Matching), per-stage standardisation, and the resampling filters (alias-free downsampling by block means)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

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

    #: whether the levels are independent parts of the input (Haar, DCT: each level's own subspace), so that
    #: ``decompose(recompose(levels))`` projects any levels onto what the decomposition can hold; a Laplacian
    #: pyramid's levels overlap (its coarse level is also in the finer ones' span)
    independent_levels: bool = False

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

    def first(self, stages: int) -> Decomposition:
        """The decomposition of the first ``stages`` stages alone (the same filters and factors), what the preview
        after stage ``stages - 1`` decomposes with."""
        raise NotImplementedError(f"{type(self).__name__} does not define its first stages")

    def coarse_levels(self, preview: Tensor, stage: int) -> list[Tensor]:
        """The first ``stage + 1`` levels that recompose to ``preview``, an image at the resolution of stage
        ``stage``: ``recompose(coarse_levels(p, k)) == p``, and for ``p = recompose(decompose(x)[: k + 1])`` they
        are the first k + 1 levels of x (what a model can start from to generate the finer ones: ``dfm upscale``)."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage must be in [0, {self.num_stages - 1}], got {stage}")
        return self.first(stage + 1).decompose(preview)

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

    def first(self, stages: int) -> Decomposition:
        return self

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

    def first(self, stages: int) -> Decomposition:
        return Standardized(self.base.first(stages), self.stds[:stages])

    @property
    def independent_levels(self) -> bool:  # type: ignore[override]
        return self.base.independent_levels

    def decompose(self, x: Tensor) -> list[Tensor]:
        return [lv / s for lv, s in zip(self.base.decompose(x), self.stds)]

    def recompose(self, levels: Sequence[Tensor]) -> Tensor:
        self._check_levels(levels)  # zip below would silently drop extra levels
        return self.base.recompose([lv * s for lv, s in zip(levels, self.stds)])

    def __repr__(self) -> str:
        return f"Standardized({self.base!r}, stds={tuple(round(s, 4) for s in self.stds)})"
