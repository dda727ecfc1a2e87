"""Token seams: how much sharper a picture's edges are on the model's token grid than between other pixels.

A DiT with patch size p predicts each p x p tile from one token; an undertrained one gets each tile's mean a little
wrong, and its samples look like a mosaic. This statistic measures that, with no network and no reference::

    seam_ratio(x, p) = mean |x[i+1] - x[i]| over neighbour pairs that straddle a tile border (i = p-1 mod p)
                       / mean |x[i+1] - x[i]| over the other neighbour pairs

over rows and columns, every channel and image. Natural images have no preferred grid, so their ratio is 1 up to
the noise of the estimate; tiles with offsets raise it (a mosaic of independent flat tiles: infinite). A sample set
is compared with the ratio of real images at the same period.

Example:
    >>> import torch
    >>> smooth = torch.linspace(0, 1, 16).repeat(1, 1, 16, 1)  # a ramp: every step the same size
    >>> round(seam_ratio(smooth, 4), 6)
    1.0
    >>> tiles = smooth + torch.arange(4).repeat_interleave(4).view(1, 1, 1, 16)  # an offset at each tile border
    >>> seam_ratio(tiles, 4) > 10
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["seam_period", "seam_ratio"]


def seam_ratio(images: Tensor, period: int) -> float:
    """Mean absolute neighbour difference across the borders of a ``period`` grid over that inside the tiles.

    ``images``: (B, C, H, W) with H and W multiples of ``period`` (videos: fold frames into the batch first).
    """
    if images.dim() != 4:
        raise ValueError(f"seam_ratio needs (B, C, H, W) images, got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if period < 2 or h % period or w % period:
        raise ValueError(f"period={period} must be >= 2 and divide the image size {h}x{w}")
    x = images.detach().double()
    across_cols = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(0, 1, 2))  # (W - 1,): pair (j, j + 1)
    across_rows = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(0, 1, 3))  # (H - 1,)
    diffs = torch.cat([across_cols, across_rows])
    index = torch.cat([torch.arange(w - 1), torch.arange(h - 1)])
    border = index % period == period - 1
    inside = diffs[~border].mean()
    if inside == 0:
        raise ValueError("the images are constant inside every tile: the ratio is undefined")
    return float(diffs[border].mean() / inside)


def seam_period(metric: str) -> int:
    """The grid period of a ``seams`` / ``seams:<P>`` metric name (8 when not given)."""
    _, _, text = metric.partition(":")
    if not text:
        return 8
    if not text.isdigit() or int(text) < 2:
        raise ValueError(f"metric {metric!r}: give the token grid in pixels, an integer >= 2, e.g. seams:8")
    return int(text)
