"""Positional encodings on a token grid: axial rotary embedding (RoPE) and fixed sin-cos.

Tokens are ordered row-major over the grid ((h, w) for images, (T, h, w) for videos), the order produced by
:func:`dfm.models.layers.patchify`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grid_positions(grid: tuple[int, ...]) -> Tensor:
    """Integer coordinates of every token, shape (N, len(grid)), row-major."""
    axes = [torch.arange(n, dtype=torch.float32) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))


def _axis_frequencies(pairs: int, base: float) -> Tensor:
    # omega_k = base^(-k / K), k = 0..K-1: the usual geometric ladder from 1 rad/token down to ~1/base.
    return base ** (-torch.arange(pairs, dtype=torch.float32) / max(pairs, 1))


def rope_tables(grid: tuple[int, ...], head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables (N, head_dim) of axial RoPE.

    The head dimension is split into ``head_dim // 2`` rotation pairs (i, i + head_dim/2); each grid axis
    a gets K = head_dim // (2 * len(grid)) of them with angles ``theta = pos_a * omega_k``. Pairs left over
    when head_dim/2 is not a multiple of the axis count get angle 0 (identity).
    """
    pos = grid_positions(grid)
    pairs = head_dim // (2 * len(grid))
    freqs = _axis_frequencies(pairs, base)
    angles = torch.cat([pos[:, a : a + 1] * freqs for a in range(len(grid))], dim=1)
    angles = torch.nn.functional.pad(angles, (0, head_dim // 2 - angles.shape[1]))
    angles = torch.cat([angles, angles], dim=1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate every pair (x_i, x_{i+d/2}) by its angle: x' = x * cos + rotate_half(x) * sin.

    x: (B, heads, N, head_dim); cos, sin: (N, head_dim).
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def sincos_embedding(grid: tuple[int, ...], dim: int, base: float = 10000.0) -> Tensor:
    """Fixed sin-cos embedding (N, dim): per axis a, [sin(pos_a * omega_k), cos(pos_a * omega_k)].

    Each axis gets 2K = 2 * (dim // (2 * len(grid))) channels; leftover channels are 0.
    """
    pos = grid_positions(grid)
    pairs = dim // (2 * len(grid))
    freqs = _axis_frequencies(pairs, base)
    parts = []
    for a in range(len(grid)):
        angles = pos[:, a : a + 1] * freqs
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(emb, (0, dim - emb.shape[1]))
