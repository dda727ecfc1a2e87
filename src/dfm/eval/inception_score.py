"""Inception Score (Salimans et al., 2016).

    IS = exp( E_x KL( p(y|x) || p(y) ) ),  p(y) = E_x p(y|x)

computed on `splits` equal chunks of the samples and reported as mean and standard deviation over
chunks, as in the original code (10 splits, 1008-way softmax of the FID Inception network).
"""

from __future__ import annotations

import torch

__all__ = ["inception_score"]


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score of class logits (N, K) over `splits` chunks.

    >>> inception_score(torch.eye(4) * 1e4, splits=1)  # four confident, distinct classes
    (4.0, 0.0)
    """
    if logits.ndim != 2:
        raise ValueError(f"inception_score expects logits of shape (N, classes), got {tuple(logits.shape)}")
    if not 1 <= splits <= len(logits):
        raise ValueError(f"splits={splits} must be between 1 and the number of samples ({len(logits)})")
    log_p = torch.log_softmax(logits.double(), dim=1)
    scores = []
    for chunk in torch.tensor_split(log_p, splits):
        log_marginal = torch.logsumexp(chunk, dim=0) - torch.log(torch.tensor(float(len(chunk)), dtype=chunk.dtype))
        kl = (chunk.exp() * (chunk - log_marginal)).sum(dim=1)
        scores.append(torch.exp(kl.mean()))
    values = torch.stack(scores)
    std = values.std(unbiased=False) if len(values) > 1 else values.new_zeros(())
    return float(values.mean()), float(std)
