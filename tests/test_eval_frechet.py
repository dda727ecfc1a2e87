"""Fréchet distance: agreement with scipy's sqrtm formula, closed forms, and streaming statistics."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dfm.eval.frechet import FeatureStats, frechet_distance, sqrtm_psd


def _random_spd(rng: np.random.Generator, dim: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((dim, rank or dim + 3))
    return a @ a.T / a.shape[1]


def _scipy_fd(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("dim", [1, 5, 64])
def test_matches_scipy_sqrtm(dim: int) -> None:
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim)
    expected = _scipy_fd(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_one_dimensional_closed_form() -> None:
    # FD(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(np.array([1.0]), np.array([[9.0]]), np.array([-2.0]), np.array([[4.0]])) == pytest.approx(
        9.0 + 1.0, rel=1e-12
    )


def test_commuting_covariances_closed_form() -> None:
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T  =>  FD = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    a, b = rng.uniform(0.1, 5.0, 32), rng.uniform(0.1, 5.0, 32)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    value = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert value == pytest.approx(expected, rel=1e-6)


def test_identical_singular_gaussians_give_zero() -> None:
    # Rank-deficient covariance (fewer samples than dims): scipy's sqrtm struggles, eigh does not.
    rng = np.random.default_rng(1)
    s = _random_spd(rng, 50, rank=10)
    mu = rng.standard_normal(50)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-8)


def test_sqrtm_psd_squares_back() -> None:
    s = _random_spd(np.random.default_rng(2), 16)
    root = sqrtm_psd(s)
    np.testing.assert_allclose(root @ root, s, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(root, root.T)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_streaming_stats_match_numpy() -> None:
    x = np.random.default_rng(3).standard_normal((257, 7)) * 3.0 + 100.0
    stats = FeatureStats(7)
    for chunk in np.array_split(x, 9):
        stats.update(torch.from_numpy(chunk))
    assert stats.count == 257
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=20), min_size=1, max_size=6), st.integers(0, 2**16))
def test_merge_is_independent_of_split(sizes: list[int], seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((sum(sizes) + 2, 3))
    whole = FeatureStats(3).update(x)
    parts, start = [], 0
    for size in [*sizes, 2]:
        parts.append(FeatureStats(3).update(x[start : start + size]))
        start += size
    merged = FeatureStats(3)
    for part in reversed(parts):
        merged.merge(part)
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.mean, whole.mean, atol=1e-12)
    np.testing.assert_allclose(merged.m2, whole.m2, atol=1e-10)


def test_update_rejects_wrong_dim() -> None:
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        FeatureStats(4).update(np.zeros((2, 5)))


def _ddp_worker(rank: int, init_file: str, x: np.ndarray, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    stats = FeatureStats(x.shape[1]).update(x[rank::2]).all_reduce()
    np.savez(f"{out}{rank}.npz", count=stats.count, mean=stats.mean, m2=stats.m2)
    dist.destroy_process_group()


def test_all_reduce_across_two_gloo_ranks(tmp_path) -> None:
    x = np.random.default_rng(4).standard_normal((31, 5))
    torch.multiprocessing.spawn(
        _ddp_worker, args=(str(tmp_path / "init"), x, str(tmp_path / "rank")), nprocs=2, join=True
    )
    whole = FeatureStats(5).update(x)
    for rank in range(2):
        with np.load(tmp_path / f"rank{rank}.npz") as got:
            assert int(got["count"]) == 31
            np.testing.assert_allclose(got["mean"], whole.mean, atol=1e-12)
            np.testing.assert_allclose(got["m2"], whole.m2, atol=1e-10)
