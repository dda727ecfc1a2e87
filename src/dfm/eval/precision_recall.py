"""Improved precision and recall (Kynkäänniemi et al., 2019), as in the ADM evaluator.

Each set defines a manifold: the union of balls centred at its feature vectors with radius the
distance to the k-th nearest neighbour in the same set (k = 3). Then

    precision = (1/|G|) sum_{g in G} 1[ exists r in R : ||g - r|| <= r_k(r) ]   (fakes on the real manifold)
    recall    = (1/|R|) sum_{r in R} 1[ exists g in G : ||r - g|| <= g_k(g) ]   (reals on the fake manifold)

Distances are computed in float64 in row blocks so that 50k x 50k never sits in memory at once.
"""

from __future__ import annotations

import torch

__all__ = ["knn_radii", "manifold_coverage", "precision_recall"]


def knn_radii(features: torch.Tensor, k: int = 3, block: int = 1024) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (the point itself is excluded)."""
    if not 1 <= k < len(features):
        raise ValueError(f"k={k} nearest neighbours needs more than k feature vectors, got {len(features)}")
    features = features.double()
    radii = []
    for chunk in torch.split(features, block):
        dist = torch.cdist(chunk, features)
        # The k+1-th smallest includes the zero distance to itself.
        radii.append(dist.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def manifold_coverage(
    queries: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, block: int = 1024
) -> torch.Tensor:
    """Boolean per query: inside at least one ball ||q - m_j|| <= radii_j."""
    manifold = manifold.double()
    inside = []
    for chunk in torch.split(queries.double(), block):
        inside.append((torch.cdist(chunk, manifold) <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of `fake` features with respect to `real` features, both (N, D)."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"precision_recall needs (N, D) features of equal D, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    precision = manifold_coverage(fake, real, knn_radii(real, k)).double().mean()
    recall = manifold_coverage(real, fake, knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)
