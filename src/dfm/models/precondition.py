"""Per-stage EDM-style preconditioning for the flow-matching path (our choice; the paper gives no formula).

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
"""

from __future__ import annotations

from torch import Tensor


def flow_preconditioning(t: Tensor, sigma: float) -> tuple[Tensor, Tensor, Tensor]:
    """Return (c_in, c_skip, c_out) for time(s) ``t`` and data standard deviation ``sigma``.

    Example:
        >>> import torch
        >>> c_in, c_skip, c_out = flow_preconditioning(torch.tensor([0.0, 1.0]), 0.5)
        >>> c_in.tolist(), c_skip.tolist(), c_out.tolist()
        ([1.0, 2.0], [-1.0, 1.0], [0.5, 1.0])
    """
    var = (t * sigma) ** 2 + (1 - t) ** 2
    c_in = var.rsqrt()
    c_skip = (t * sigma**2 - (1 - t)) / var
    c_out = sigma * c_in
    return c_in, c_skip, c_out
