"""Inception Score, precision/recall, SWD and the token-seam ratio against answers known in advance."""

from __future__ import annotations

import math

import pytest
import torch

from dfm.eval.inception_score import inception_score
from dfm.eval.precision_recall import knn_radii, precision_recall
from dfm.eval.seams import seam_ratio
from dfm.eval.swd import (
    SWDConfig,
    laplacian_pyramid,
    level_sigma,
    sliced_wasserstein,
    sliced_wasserstein_distance,
)

# ---------------------------------------------------------------- Inception Score


def test_is_of_confident_uniform_classes_is_the_class_count() -> None:
    logits = torch.eye(10).repeat(5, 1) * 50.0  # 50 samples, 10 classes, each class equally often
    mean, std = inception_score(logits, splits=1)
    assert mean == pytest.approx(10.0, rel=1e-9)
    assert std == 0.0


def test_is_of_one_class_or_uniform_predictions_is_one() -> None:
    assert inception_score(torch.zeros(20, 7), splits=2)[0] == pytest.approx(1.0, abs=1e-12)
    one_class = torch.zeros(20, 7)
    one_class[:, 3] = 40.0
    assert inception_score(one_class, splits=4)[0] == pytest.approx(1.0, abs=1e-9)


def test_is_matches_direct_formula_per_split() -> None:
    logits = torch.randn(30, 5, generator=torch.Generator().manual_seed(0)).double()
    p = logits.softmax(1)
    expected = []
    for chunk in p.split(10):
        marginal = chunk.mean(0)
        expected.append(math.exp((chunk * (chunk.log() - marginal.log())).sum(1).mean().item()))
    mean, std = inception_score(logits, splits=3)
    assert mean == pytest.approx(sum(expected) / 3, rel=1e-10)
    assert std == pytest.approx(torch.tensor(expected, dtype=torch.float64).std(unbiased=False).item(), rel=1e-8)


def test_is_rejects_too_many_splits() -> None:
    with pytest.raises(ValueError, match="splits=11"):
        inception_score(torch.zeros(10, 3), splits=11)


# ---------------------------------------------------------------- precision / recall


def _line(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)[:, None]


def test_knn_radii_on_a_lattice() -> None:
    # Points 0..9 on a line, k = 3: the ends reach 3 away, their neighbours and the interior 2.
    radii = knn_radii(_line(range(10)), k=3)
    assert radii.tolist() == [3, 2, 2, 2, 2, 2, 2, 2, 2, 3]


def test_precision_recall_on_a_toy_manifold() -> None:
    # Real: 0..99. Fake: 0..49 (on the real manifold) and 1000..1049 (far away).
    # precision = 50/100. Fake radii: 3 at 49, so reals 50..52 are covered, 53.. are not: recall = 53/100.
    real = _line(range(100))
    fake = _line([*range(50), *range(1000, 1050)])
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == 0.5
    assert recall == 0.53


def test_precision_recall_of_a_set_with_itself_is_one() -> None:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    assert precision_recall(x, x) == (1.0, 1.0)


def test_precision_recall_rejects_mismatched_dims() -> None:
    with pytest.raises(ValueError, match="equal D"):
        precision_recall(torch.zeros(5, 3), torch.zeros(5, 4))


# ---------------------------------------------------------------- SWD


def _textures(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)
    return (x * 200 + 20 + torch.rand(n, 3, 32, 32, generator=g) * 30).round().to(torch.uint8)


def test_laplacian_pyramid_reconstructs_exactly() -> None:
    from dfm.eval.swd import _pyr_up

    x = _textures(2, 0).float()
    levels = laplacian_pyramid(x, min_resolution=8)
    assert [lvl.shape[-1] for lvl in levels] == [32, 16, 8]
    recon = levels[-1]
    for band in reversed(levels[:-1]):
        recon = band + _pyr_up(recon, tuple(band.shape[-2:]))
    torch.testing.assert_close(recon, x, rtol=0, atol=1e-4)


def test_sliced_wasserstein_of_identical_sets_is_zero() -> None:
    a = torch.randn(500, 20, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein(a, a[torch.randperm(500)], 16, 2, torch.Generator().manual_seed(1)) == 0.0


def test_swd_is_small_for_two_patch_draws_and_grows_with_noise() -> None:
    # Two draws of patches from the same images only differ by sampling noise; added pixel noise of
    # growing strength must raise the finest level's distance monotonically, well above that floor.
    config = SWDConfig(patches_per_image=64, directions=64, repeats=2)
    images = _textures(48, 0)
    floor = sliced_wasserstein_distance(images, images, config)
    assert set(floor) == {"swd_32", "swd_16", "swd_mean"}
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(5))
    values = []
    for sigma in (24.0, 48.0, 96.0):
        noisy = (images.float() + sigma * noise).clamp(0, 255).round().to(torch.uint8)
        values.append(sliced_wasserstein_distance(images, noisy, config)["swd_32"])
    assert floor["swd_32"] < 0.7 * values[0]
    assert values[0] < values[1] < values[2]


def test_swd_rejects_mismatched_sets() -> None:
    with pytest.raises(ValueError, match="same shape"):
        sliced_wasserstein_distance(_textures(4, 0), _textures(5, 0))


def test_level_sigma_tells_too_smooth_from_too_busy() -> None:
    # The SWD standardises its patches per set, so it scores blur and noise alike; sigma says which: the finest
    # level's spread falls under a blur and rises under added noise, while the coarse residual barely moves.
    images = _textures(48, 0).float()
    base = level_sigma(images, 8)
    assert list(base) == ["sigma_32", "sigma_16", "sigma_8"]  # the SWD's levels, finest first
    assert base["sigma_32"] == pytest.approx(laplacian_pyramid(images, 8)[0].std().item())
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    noisy = images + 20 * torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
    assert (
        level_sigma(blurred, 8)["sigma_32"]
        < 0.7 * base["sigma_32"]
        < base["sigma_32"]
        < level_sigma(noisy, 8)["sigma_32"]
    )
    assert level_sigma(noisy, 8)["sigma_8"] == pytest.approx(base["sigma_8"], rel=0.05)
    # flat images hold no detail at any scale, and a level's spread is in the images' own units
    assert set(level_sigma(torch.full((4, 3, 32, 32), 77.0), 8).values()) == {0.0}
    assert level_sigma(2 * images, 8)["sigma_16"] == pytest.approx(2 * base["sigma_16"])


# ---------------------------------------------------------------- token seams


def test_seam_ratio_of_a_known_mosaic() -> None:
    # Inside every 4-pixel tile a step of 1 between neighbours; across a tile border a step of 3: ratio 3 exactly.
    row = torch.tensor([0.0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15, 18, 19, 20, 21])
    images = (row[None, :] + row[:, None]).expand(2, 3, 16, 16)
    assert seam_ratio(images, 4) == pytest.approx(3.0, abs=1e-12)
    # On a grid the mosaic does not have (period 8: borders 7|8 only, the 3|4 and 11|12 jumps count as inside)
    inside = (1 * 12 + 3 * 2) / 14  # 14 inside pairs, two of them the 3-steps
    assert seam_ratio(images, 8) == pytest.approx(3.0 / inside, abs=1e-12)


def test_seam_ratio_is_one_for_images_without_a_grid() -> None:
    # White noise has no preferred grid: the ratio is 1 up to the sampling error of the means.
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert seam_ratio(images, 8) == pytest.approx(1.0, abs=0.02)
    # ... and adding a random offset per 8x8 tile raises it
    offsets = torch.randn(64, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    tiled = images + offsets.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    assert seam_ratio(tiled, 8) > 1.2


@pytest.mark.parametrize("shape, period", [((3, 16, 16), 4), ((1, 3, 16, 16), 5), ((1, 3, 16, 16), 1)])
def test_seam_ratio_rejects_bad_input(shape, period) -> None:
    with pytest.raises(ValueError, match="period|images"):
        seam_ratio(torch.randn(shape), period)


def test_seam_ratio_of_flat_tiles_is_refused() -> None:
    flat_tiles = torch.randn(1, 1, 4, 4).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    with pytest.raises(ValueError, match="constant inside every tile"):
        seam_ratio(flat_tiles, 2)
