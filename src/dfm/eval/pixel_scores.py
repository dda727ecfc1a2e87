"""Scores that need no network: the multi-scale SWD, the detail per scale (sigma), token seams and the temporal
change of videos. Videos are scored per frame (:func:`as_frames`) where the metric is an image metric; each scorer
records its settings under ``protocol["settings"]``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .images import ImageSet
from .seams import seam_ratio
from .swd import SWDConfig, level_sigma, sliced_wasserstein_distance

__all__ = ["as_frames", "match_for_swd", "seam_scores", "sigma_scores", "swd_scores", "temporal_change",
           "temporal_scores"]  # fmt: skip


def match_for_swd(samples: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Equal counts, channels and size for the SWD; the reference adapts to the samples."""
    notes: dict = {}
    count = min(len(samples), len(reference))
    samples, reference = samples[:count], reference[:count]
    if reference.shape[1] != samples.shape[1]:
        if reference.shape[1] == 1:
            reference = reference.expand(-1, 3, -1, -1)
        else:
            samples = samples.expand(-1, 3, -1, -1)
        notes["channels"] = "grey repeated to RGB"
    if reference.shape[-2:] != samples.shape[-2:]:
        notes["reference_resized"] = (
            f"{tuple(reference.shape[-2:])} -> {tuple(samples.shape[-2:])} (bilinear, antialias)"
        )
        resized = F.interpolate(
            reference.float(), size=samples.shape[-2:], mode="bilinear", antialias=True, align_corners=False
        )
        reference = resized.round().clamp(0, 255).to(torch.uint8)
    notes["images"] = count
    return samples, reference, notes


def as_frames(image_set: ImageSet) -> ImageSet:
    """Videos (N, C, T, H, W) as N*T images (labels repeated per frame); images unchanged."""
    x = image_set.images
    if x.ndim != 5:
        return image_set
    n, c, t, h, w = x.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
    labels = None if image_set.labels is None else image_set.labels.repeat_interleave(t)
    return ImageSet(frames, labels, {**image_set.source, "frames_of": n, "frames_per_clip": t})


def temporal_change(videos: torch.Tensor) -> float:
    """Mean absolute difference between consecutive frames, in [0, 1] units (uint8 (N, C, T, H, W) input)."""
    if videos.ndim != 5 or videos.shape[2] < 2:
        raise ValueError("metric 'temporal' needs videos with at least 2 frames")
    x = videos.float() / 255.0
    return float((x[:, :, 1:] - x[:, :, :-1]).abs().mean())


def swd_scores(
    sample_set: ImageSet, ref_images: ImageSet | None, swd: SWDConfig, max_images: int, protocol: dict
) -> dict[str, float]:
    """Multi-scale sliced Wasserstein distance, per frame for videos."""
    if ref_images is None:
        raise ValueError("metric 'swd' needs reference images (a dataset, folder or npz), not a statistics file")
    video = sample_set.images.ndim == 5
    sam, ref = (as_frames(sample_set), as_frames(ref_images)) if video else (sample_set, ref_images)
    count = min(len(sam), len(ref), max_images)
    a, b, notes = match_for_swd(sam.images[:count], ref.images[:count])
    scores = sliced_wasserstein_distance(a, b, swd)
    protocol["settings"]["swd"] = {**swd.to_dict(), **notes}
    return {k.replace("swd_", "swd_frames_") if video else k: v for k, v in scores.items()}


def sigma_scores(
    sample_set: ImageSet, ref_images: ImageSet | None, min_resolution: int, protocol: dict
) -> dict[str, float]:
    """``sigma_<res>`` of the samples and, with a reference, ``sigma_<res>_ref`` of as many reference images (resized
    to the samples' size if theirs differs), per frame for videos; the pyramid is the SWD's."""
    video = sample_set.images.ndim == 5
    sam = as_frames(sample_set).images
    tag = "sigma_frames" if video else "sigma"
    scores = {k.replace("sigma", tag): v for k, v in level_sigma(sam, min_resolution).items()}
    settings: dict = {"min_resolution": min_resolution}
    if ref_images is not None:
        _, ref_matched, notes = match_for_swd(sam, as_frames(ref_images).images)
        ref = level_sigma(ref_matched, min_resolution)
        scores.update({f"{k.replace('sigma', tag)}_ref": v for k, v in ref.items()})
        settings.update(notes)
    protocol["settings"]["sigma"] = settings
    return scores


def seam_scores(sample_set: ImageSet, ref_images: ImageSet | None, periods: Sequence[int], protocol: dict
                 ) -> dict[str, float]:  # fmt: skip
    """``seam_ratio_<P>`` of the samples (video frames folded into the batch) and, with a reference,
    ``seam_ratio_<P>_ref`` of up to 8192 reference images spread over the set (resized to the samples' size if
    theirs differs: the grid is the samples')."""
    video = sample_set.images.dim() == 5
    sam = as_frames(sample_set).images
    tag = "seam_ratio_frames" if video else "seam_ratio"
    scores = {f"{tag}_{p}": seam_ratio(sam.float(), p) for p in periods}
    settings: dict = {"periods": list(periods)}
    if ref_images is not None:
        ref = as_frames(ref_images).spread(8192).images.float()  # spread over the set: not one photograph's crops
        if ref.shape[-2:] != sam.shape[-2:]:
            settings["reference_resized"] = f"{tuple(ref.shape[-2:])} -> {tuple(sam.shape[-2:])} (bilinear, antialias)"
            ref = F.interpolate(ref, size=sam.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
        scores.update({f"{tag}_{p}_ref": seam_ratio(ref, p) for p in periods})
        settings["reference_images"] = len(ref)
    protocol["settings"]["seams"] = settings
    return scores


def temporal_scores(sample_set: ImageSet, ref_images: ImageSet | None) -> dict[str, float]:
    """Temporal change of the sample and reference videos, and their relative gap."""
    if ref_images is None or ref_images.images.ndim != 5:
        raise ValueError("metric 'temporal' needs reference videos (an npz of clips)")
    mine, theirs = temporal_change(sample_set.images), temporal_change(ref_images.images)
    return {
        "temporal_change": mine,
        "temporal_change_ref": theirs,
        "temporal_change_gap": abs(mine - theirs) / max(theirs, 1e-12),
    }
