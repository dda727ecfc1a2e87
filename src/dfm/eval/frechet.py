"""Fréchet distance between Gaussians fitted to features, with streaming, mergeable statistics.

    FD(N(mu1, S1), N(mu2, S2)) = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)

This is FID with Inception-v3 features, FDD with DINOv2 features. Everything here is float64:
float32 covariances of 2048-d features lose several digits in the trace term.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["FeatureStats", "frechet_distance", "sqrtm_psd", "trace_sqrt_product"]


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix, A^1/2 = V diag(sqrt(max(l, 0))) V^T.

    Negative eigenvalues (round-off on a singular covariance) are clipped to zero, which is why this
    is stable where a general `scipy.linalg.sqrtm` can return complex parts.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    sym = 0.5 * (matrix + matrix.T)
    eigvals, eigvecs = np.linalg.eigh(sym)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^1/2) computed as tr((S1^1/2 S2 S1^1/2)^1/2).

    S1 S2 is not symmetric, but it is similar to the PSD matrix S1^1/2 S2 S1^1/2, so both have the
    same non-negative eigenvalues; the symmetric form lets us use `eigh`.
    """
    root1 = sqrtm_psd(sigma1)
    inner = root1 @ np.asarray(sigma2, dtype=np.float64) @ root1
    eigvals = np.linalg.eigvalsh(0.5 * (inner + inner.T))
    return float(np.sqrt(np.clip(eigvals, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2).

    >>> import numpy as np
    >>> round(frechet_distance(np.zeros(1), np.eye(1) * 4.0, np.ones(1), np.eye(1)), 6)  # 1 + (2 - 1)^2
    2.0
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"frechet_distance: shapes do not match (mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
            f"{sigma2.shape}); both sides must come from the same feature extractor"
        )
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    # Round-off can push a true zero slightly negative.
    return float(max(value, 0.0))


@dataclass
class FeatureStats:
    """Running count, mean and scatter matrix M2 = sum_i (x_i - mean)(x_i - mean)^T of feature vectors.

    Batches are merged with Chan et al.'s pairwise update, which is exact and order-independent up to
    round-off, so statistics from shards, batches or DDP ranks combine into the one full-data answer:

        n = n_a + n_b,  d = mean_b - mean_a,  mean = mean_a + d n_b / n,  M2 = M2_a + M2_b + d d^T n_a n_b / n

    >>> stats = FeatureStats(2)
    >>> _ = stats.update(torch.tensor([[0.0, 0.0], [2.0, 2.0]]))
    >>> stats.mean
    array([1., 1.])
    """

    dim: int
    count: int = 0
    mean: np.ndarray = field(default=None)  # type: ignore[assignment]
    m2: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = np.zeros(self.dim, np.float64)
        if self.m2 is None:
            self.m2 = np.zeros((self.dim, self.dim), np.float64)

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance M2 / (n - 1), as in the reference FID code (`np.cov`)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        return self.m2 / (self.count - 1)

    def update(self, features: torch.Tensor | np.ndarray) -> FeatureStats:
        """Add a batch of features of shape (N, dim)."""
        x = features.detach().double().cpu().numpy() if torch.is_tensor(features) else np.asarray(features)
        x = x.astype(np.float64, copy=False)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (N, {self.dim}), got {tuple(x.shape)}")
        if len(x) == 0:
            return self
        mean = x.mean(axis=0)
        centered = x - mean
        return self.merge(FeatureStats(self.dim, len(x), mean, centered.T @ centered))

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Fold `other` into self (in place) and return self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dim {other.dim} into dim {self.dim}")
        if other.count == 0:
            return self
        n = self.count + other.count
        delta = other.mean - self.mean
        self.m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.count * other.count / n)
        self.mean = self.mean + delta * (other.count / n)
        self.count = n
        return self

    def all_reduce(self, device: torch.device | str | None = None) -> FeatureStats:
        """Merge the statistics of every rank when torch.distributed is initialised (no-op otherwise).

        Each rank gathers (count, mean, M2) from all ranks and merges them in rank order, so every
        rank ends with identical statistics. `device` must suit the backend (CUDA for NCCL).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        packed = torch.from_numpy(np.concatenate([[float(self.count)], self.mean, self.m2.ravel()])).to(device)
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, packed)
        merged = FeatureStats(self.dim)
        for chunk in gathered:
            chunk = chunk.cpu().numpy()
            mean, m2 = chunk[1 : 1 + self.dim], chunk[1 + self.dim :].reshape(self.dim, self.dim)
            merged.merge(FeatureStats(self.dim, int(round(chunk[0])), mean.copy(), m2.copy()))
        self.count, self.mean, self.m2 = merged.count, merged.mean, merged.m2
        return self

    def frechet_distance(self, other: FeatureStats) -> float:
        """Fréchet distance between the Gaussians fitted to self and other."""
        return frechet_distance(self.mean, self.sigma, other.mean, other.sigma)
