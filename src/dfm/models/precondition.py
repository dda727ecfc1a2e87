"""Per-stage EDM-style preconditioning for the flow-matching path (our choice; the paper gives no formula), and
:class:`Preconditioned`, the one wrapper that applies it around any network (as EDM's ``EDMPrecond`` does).

For one stage with data X_1 of standard deviation sigma and noise X_0 ~ N(0, I), the path is
``X_t = t X_1 + (1 - t) X_0`` and the target velocity ``v = X_1 - X_0``. Following Karras et al. (2022,
Appendix B.6), the network F is wrapped as

    v_hat = c_skip(t) * X_t + c_out(t) * F(c_in(t) * X_t, ...)

with
    Var(X_t)  = t^2 sigma^2 + (1 - t)^2
    c_in      = 1 / sqrt(Var(X_t))                          (network input has unit variance)
    c_skip    = Cov(v, X_t) / Var(X_t) = (t sigma^2 - (1 - t)) / Var(X_t)   (least-squares skip)
    c_out     = sqrt(Var(v - c_skip X_t)) = sigma / sqrt(Var(X_t))          (F's target has unit variance)

The last line follows from Var(v) = sigma^2 + 1: Var(v) - Cov^2 / Var(X_t) = sigma^2 / Var(X_t).
At t = 0 (pure noise) this gives c_in = 1, c_skip = -1, c_out = sigma; at t = 1, c_in = 1/sigma, c_skip = 1,
c_out = 1.

A network trained with the wrapper is F, not a velocity model: the method of its run (:mod:`dfm.methods`) wraps it
again wherever it is trained or sampled. Per stage s of a multi-stage model, with coefficients c_*,s from that
stage's time and data std::

    v_hat_s = c_skip,s * X_s + c_out,s * F_s(c_in,1 * X_1, ..., c_in,S * X_S, t, y, main stage)

Example:
    >>> import torch
    >>> network = lambda levels, t, y, main_stage: [torch.zeros_like(x) for x in levels]
    >>> model = Preconditioned(network, data_std=(0.5,))
    >>> model([torch.ones(1, 1, 2, 2)], torch.tensor([[1.0]]))[0].flatten().tolist()  # c_skip(1) = 1
    [1.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

#: ``coefficients(t, main_stage)``: (c_in, c_skip, c_out) of every stage, each of shape (B,), for times ``t`` (B, S)
Coefficients = Callable[[Tensor, "Tensor | None"], list[tuple[Tensor, Tensor, Tensor]]]


#: ``prediction="data"``: the velocity (x̂ - x_t) / (1 - t) divides by 1 - t at least this (a numerical floor only:
#: the sampler never evaluates a stage at t = 1 that it moves, so that a last Euler step lands on x̂ exactly)
GAP_FLOOR = 1e-4
#: ``prediction="data"`` with the velocity loss: the error of x̂ is divided by (1 - t)² at most 1 / MIN_GAP²
#: (the clamp of Li & He 2025), so that the few draws of t near 1 do not dominate the loss
MIN_GAP = 0.05


def flow_preconditioning(t: Tensor, sigma: float, prediction: str = "velocity") -> tuple[Tensor, Tensor, Tensor]:
    """Return (c_in, c_skip, c_out) for time(s) ``t`` and data standard deviation ``sigma``.

    ``prediction="data"``: F predicts the clean data divided by sigma (unit variance), and the velocity is
    ``(sigma F - x_t) / (1 - t)``, i.e. ``c_skip = -1 / (1 - t)`` and ``c_out = sigma / (1 - t)`` (1 - t at least
    :data:`GAP_FLOOR`); c_in as for the velocity.

    Example:
        >>> import torch
        >>> c_in, c_skip, c_out = flow_preconditioning(torch.tensor([0.0, 1.0]), 0.5)
        >>> c_in.tolist(), c_skip.tolist(), c_out.tolist()
        ([1.0, 2.0], [-1.0, 1.0], [0.5, 1.0])
        >>> [round(c, 4) for c in flow_preconditioning(torch.tensor([0.0, 0.5]), 0.5, "data")[2].tolist()]
        [0.5, 1.0]
    """
    var = (t * sigma) ** 2 + (1 - t) ** 2
    c_in = var.rsqrt()
    if prediction == "data":
        gap = (1 - t).clamp(min=GAP_FLOOR)
        return c_in, -1 / gap, sigma / gap
    if prediction != "velocity":
        raise ValueError(f"prediction={prediction!r}: choose velocity or data")
    c_skip = (t * sigma**2 - (1 - t)) / var
    c_out = sigma * c_in
    return c_in, c_skip, c_out


def stage_coefficients(data_std: Sequence[float], prediction: str = "velocity") -> Coefficients:
    """DFM's coefficients: stage s on its own path at its own time t_s, with data std ``data_std[s]``. Stages after
    the main stage are inactive (the network ignores them) and get those of t = 0. ``prediction``: what F predicts
    (:func:`flow_preconditioning`)."""
    stds = tuple(float(v) for v in data_std)

    def coefficients(t: Tensor, main_stage: Tensor | None) -> list[tuple[Tensor, Tensor, Tensor]]:
        t = t.float()
        if main_stage is not None:
            active = torch.arange(t.shape[1], device=t.device)[None, :] <= main_stage[:, None]
            t = torch.where(active, t, 0.0)
        return [flow_preconditioning(t[:, s], std, prediction) for s, std in enumerate(stds)]

    return coefficients


class Preconditioned:
    """A velocity model from a network F: inputs scaled by c_in, output ``c_skip x + c_out F(...)`` per stage.

    Args:
        network: ``network(levels, t, y, main_stage) -> outputs`` (lists coarse to fine, :mod:`dfm.models.dit`).
        data_std: the std of every stage's level, for DFM's path (:func:`stage_coefficients`).
        coefficients: another path's coefficients instead (Pyramidal Flow's, :mod:`dfm.baselines.pyramidal`).
        prediction: with ``data_std``, what F predicts: ``velocity`` or ``data`` (:func:`flow_preconditioning`).

    Attributes the samplers read (``null_class``, ``num_classes``, ``config``...) are the network's.
    """

    def __init__(
        self,
        network: Any,
        data_std: Sequence[float] | None = None,
        coefficients: Coefficients | None = None,
        prediction: str = "velocity",
    ) -> None:
        if (data_std is None) == (coefficients is None):
            raise ValueError("give the stages' data_std or the path's coefficients, one of the two")
        self.network = network
        self.coefficients = coefficients or stage_coefficients(data_std, prediction)

    def __call__(
        self, levels: Sequence[Tensor], t: Tensor, y: Any = None, main_stage: Tensor | None = None
    ) -> list[Tensor]:
        t2 = t[:, None] if t.dim() == 1 else t
        coefs = self.coefficients(t2, main_stage)
        shape = (-1,) + (1,) * (levels[0].dim() - 1)  # (B,) coefficients over a level
        if main_stage is not None:  # inactive stages are zero (the model contract), in the skip term as well
            active = torch.arange(len(levels), device=t.device)[None, :] <= main_stage[:, None]
            levels = [torch.where(active[:, s].view(shape), x, 0.0) for s, x in enumerate(levels)]
        inputs = [c_in.view(shape) * x for x, (c_in, _, _) in zip(levels, coefs)]
        outputs = self.network(inputs, t, y, main_stage)
        return [
            c_skip.view(shape) * x + c_out.view(shape) * f for x, f, (_, c_skip, c_out) in zip(levels, outputs, coefs)
        ]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["network"], name)
