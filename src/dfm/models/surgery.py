"""Weight surgery between patch sizes: what lets a network trained on one grid start exactly on another.

A coarse level seen through its nearest-neighbour lift (every pixel repeated ``f x f`` times) is the same signal
on a finer grid. These functions move a patch embedding or an output head between the two views so that the
network's function is unchanged: used to convert a one-stage model into a DFM's coarse stage (:mod:`dfm.finetune`,
:mod:`dfm.adapters.flux`) and to start the cascade's stage 2 from its stage 1 (:mod:`dfm.baselines.cascade`).
"""

from __future__ import annotations

import math

from torch import Tensor


def lift_patch_embedding(weight: Tensor, channels: int, patch: int, factor: int) -> Tensor:
    """(D, C p p) weights of a ``p``-patch embedding -> (D, C q q), ``q = p / factor``, that embed a level ``factor``x
    coarser exactly as the ``p``-patch embeds its nearest-neighbour lift: each ``factor x factor`` block summed."""
    q = patch // factor
    w = weight.reshape(weight.shape[0], channels, q, factor, q, factor)
    return w.sum(dim=(3, 5)).reshape(weight.shape[0], channels * q * q)


def pool_head(weight: Tensor, channels: int, patch: int, factor: int) -> Tensor:
    """(C p p, ...) output rows of a ``p``-patch head -> (C q q, ...), the average over each ``factor x factor``
    block (average pooling of the head's output, which undoes a nearest lift exactly)."""
    q = patch // factor
    w = weight.reshape(channels, q, factor, q, factor, *weight.shape[1:])
    return w.mean(dim=(2, 4)).reshape(channels * q * q, *weight.shape[1:])


def spread_patch_embedding(w: Tensor, channels: int, factor: int) -> Tensor:
    """Patch embedding (D, C q q) for patch q -> (D, C p p) for p = f q that embeds a nearest-upsampled image
    exactly like the original embeds the small one: each weight is spread over its f x f sub-block, / f²."""
    d, q = w.shape[0], math.isqrt(w.shape[1] // channels)
    w = w.reshape(d, channels, q, q).repeat_interleave(factor, 2).repeat_interleave(factor, 3)
    return w.reshape(d, -1) / factor**2


def repeat_head(w: Tensor, channels: int, factor: int) -> Tensor:
    """Head rows (C q q, ...) -> (C p p, ...): every fine pixel of a block predicts what its coarse pixel did."""
    rest = w.shape[1:]
    q = math.isqrt(w.shape[0] // channels)
    w = w.reshape(channels, q, q, *rest).repeat_interleave(factor, 1).repeat_interleave(factor, 2)
    return w.reshape(-1, *rest)
