"""Multi-scale sliced Wasserstein distance (SWD) on Laplacian-pyramid patches (Karras et al., 2018).

For every pyramid level l, draw `patches_per_image` random 7x7 patches from each image, standardise
each channel of the patch descriptors (separately for the two sets), then average the sliced
1-Wasserstein distance over `repeats` x `directions` random unit directions theta:

    SWD_l = mean_theta  (1/n) sum_i | sort(<theta, a>)_i - sort(<theta, b>)_i |

The pyramid uses the 5-tap binomial filter [1, 4, 6, 4, 1] / 16; levels go from the full resolution
down to `min_resolution` (the last one is the low-pass residual). Scores are reported x 1e3, as in the
progressive-GAN code, per level (keyed by resolution) and averaged. No network weights are involved.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

__all__ = ["SWDConfig", "laplacian_pyramid", "level_sigma", "sliced_wasserstein", "sliced_wasserstein_distance"]


@dataclass(frozen=True)
class SWDConfig:
    """Settings of the multi-scale SWD (progressive-GAN defaults)."""

    patch_size: int = 7
    patches_per_image: int = 128
    directions: int = 128
    repeats: int = 4
    min_resolution: int = 16
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _binomial_kernel(channels: int, device: torch.device) -> torch.Tensor:
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=device)
    kernel = torch.outer(taps, taps) / 256.0
    return kernel.expand(channels, 1, 5, 5).contiguous()


def _blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    kernel = _binomial_kernel(x.shape[1], x.device) * gain
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


def _pyr_down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[:, :, ::2, ::2]


def _pyr_up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # Zero-insertion upsampling followed by the blur with gain 4 (the kernel sums to 1/4 per phase).
    up = torch.zeros(*x.shape[:2], size[0], size[1], dtype=x.dtype, device=x.device)
    up[:, :, ::2, ::2] = x[:, :, : (size[0] + 1) // 2, : (size[1] + 1) // 2]
    return _blur(up, gain=4.0)


def laplacian_pyramid(images: torch.Tensor, min_resolution: int = 16) -> list[torch.Tensor]:
    """Levels fine to coarse: L_l = G_l - up(G_{l+1}) with G_0 = images; the last level is G_L itself.

    Halves the resolution while the result stays >= `min_resolution`.
    """
    levels, current = [], images.float()
    while min(current.shape[-2:]) // 2 >= min_resolution:
        down = _pyr_down(current)
        levels.append(current - _pyr_up(down, tuple(current.shape[-2:])))
        current = down
    levels.append(current)
    return levels


def _patch_descriptors(level: torch.Tensor, config: SWDConfig, generator: torch.Generator) -> torch.Tensor:
    """Random patches (N * patches_per_image, C * p * p), each channel standardised over the set."""
    n, c, h, w = level.shape
    p = config.patch_size
    if min(h, w) < p:
        raise ValueError(f"SWD level of size {h}x{w} is smaller than the {p}x{p} patch; raise min_resolution")
    k = config.patches_per_image
    ys = torch.randint(0, h - p + 1, (n, k), generator=generator)
    xs = torch.randint(0, w - p + 1, (n, k), generator=generator)
    offsets = torch.arange(p)
    rows = (ys[..., None] + offsets)[..., :, None].expand(n, k, p, p)  # (N, K, p, p)
    cols = (xs[..., None] + offsets)[..., None, :].expand(n, k, p, p)
    batch = torch.arange(n)[:, None, None, None].expand(n, k, p, p)
    patches = level.cpu()[batch, :, rows, cols]  # (N, K, p, p, C)
    patches = patches.permute(0, 1, 4, 2, 3).reshape(n * k, c, p * p)
    patches = patches - patches.mean(dim=(0, 2), keepdim=True)
    patches = patches / patches.std(dim=(0, 2), keepdim=True).clamp_min(1e-8)
    return patches.reshape(n * k, c * p * p)


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, directions: int, repeats: int, generator: torch.Generator
) -> float:
    """Mean over random unit directions of the 1-Wasserstein distance between the 1-D projections."""
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal-sized sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    total = 0.0
    for _ in range(repeats):
        theta = torch.randn(a.shape[1], directions, generator=generator, dtype=a.dtype)
        theta = theta / theta.norm(dim=0, keepdim=True)
        # Sort along the contiguous last axis: (directions, n), many times faster than along dim 0.
        proj_a, _ = torch.sort((a @ theta).T.contiguous(), dim=1)
        proj_b, _ = torch.sort((b @ theta).T.contiguous(), dim=1)
        total += (proj_a - proj_b).abs().mean().item()
    return total / repeats


def sliced_wasserstein_distance(
    images_a: torch.Tensor, images_b: torch.Tensor, config: SWDConfig = SWDConfig()
) -> dict[str, float]:
    """Multi-scale SWD x 1e3 between two equal-sized image sets (N, C, H, W), uint8 or float in [0, 255].

    Returns {"swd_<resolution>": value, ..., "swd_mean": mean over levels}.
    """
    if images_a.shape != images_b.shape:
        raise ValueError(
            f"SWD needs two image sets of the same shape, got {tuple(images_a.shape)} and {tuple(images_b.shape)}; "
            "subsample the larger one (--num-samples)"
        )
    generator = torch.Generator().manual_seed(config.seed)
    pyr_a = laplacian_pyramid(images_a, config.min_resolution)
    pyr_b = laplacian_pyramid(images_b, config.min_resolution)
    scores: dict[str, float] = {}
    for level_a, level_b in zip(pyr_a, pyr_b):
        desc_a = _patch_descriptors(level_a, config, generator)
        desc_b = _patch_descriptors(level_b, config, generator)
        value = sliced_wasserstein(desc_a, desc_b, config.directions, config.repeats, generator)
        scores[f"swd_{level_a.shape[-1]}"] = value * 1e3
    scores["swd_mean"] = sum(scores.values()) / len(scores)
    return scores


def level_sigma(images: torch.Tensor, min_resolution: int = 16) -> dict[str, float]:
    """{"sigma_<resolution>": value}: the standard deviation (0-255 units) of each level of the SWD's Laplacian
    pyramid over a set of images (N, C, H, W), how much detail each scale holds; the last level is the low-pass
    residual. Unlike the SWD, whose patches are standardised per set, it sees whether samples are too smooth or
    too busy at a scale."""
    return {f"sigma_{level.shape[-1]}": level.std().item() for level in laplacian_pyramid(images, min_resolution)}
