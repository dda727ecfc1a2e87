"""Offline video metrics: per-frame Fréchet distance / SWD / accuracy and temporal consistency."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dfm.eval import EvalConfig, SWDConfig, evaluate, seam_ratio
from dfm.eval.images import ImageSet
from dfm.eval.pixel_scores import as_frames, temporal_change
from dfm.eval.swd import level_sigma


def _clips(n: int, seed: int, moving: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, 1, 1, 28, 28), generator=g, dtype=torch.uint8).expand(n, 1, 4, 28, 28)
    if not moving:
        return base.contiguous()
    return torch.stack([torch.roll(base[:, :, 0], shifts=k, dims=-1) for k in range(4)], dim=2)


def test_as_frames_and_temporal_change() -> None:
    clips = ImageSet(_clips(3, 0), torch.tensor([1, 2, 3]), {})
    frames = as_frames(clips)
    assert frames.images.shape == (12, 1, 28, 28) and frames.labels.tolist() == [1] * 4 + [2] * 4 + [3] * 4
    assert torch.equal(frames.images[5], clips.images[1, :, 1])
    assert temporal_change(_clips(2, 0, moving=False)) == 0.0
    flicker = torch.zeros(1, 1, 4, 8, 8, dtype=torch.uint8)
    flicker[:, :, 1::2] = 255
    assert temporal_change(flicker) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 frames"):
        temporal_change(torch.zeros(1, 1, 1, 8, 8, dtype=torch.uint8))


def test_per_frame_scores_of_videos(tmp_path) -> None:
    from dfm.eval.extractors.classifier import FashionCNN

    torch.manual_seed(0)
    weights = tmp_path / "cnn.safetensors"
    save_file(FashionCNN().state_dict(), weights)
    real = ImageSet(_clips(16, 1), torch.arange(16) % 10, {"kind": "test"})
    config = EvalConfig(
        metrics=("fd:fashion-cnn", "swd", "accuracy", "temporal"),
        weights={"fashion-cnn": str(weights)},
        progress=False,
        swd=SWDConfig(min_resolution=8, patches_per_image=16),
    )
    ref_file = tmp_path / "ref.npz"
    np.savez(ref_file, arr_0=real.images.permute(0, 2, 3, 4, 1).numpy(), labels=real.labels.numpy())
    scores = evaluate(real, [str(ref_file)], config)["scores"]
    assert scores["fd_frames_fashion-cnn"] == pytest.approx(0.0, abs=1e-6)  # same clips, same frame statistics
    assert {"swd_frames_28", "swd_frames_14", "class_accuracy_frames"} <= set(scores)
    # The classifier's accuracy on the real clips (the ceiling); here the samples are those clips.
    assert scores["class_accuracy_frames_ref"] == scores["class_accuracy_frames"]
    assert scores["temporal_change_gap"] == 0.0
    static = ImageSet(_clips(16, 1, moving=False), real.labels, {"kind": "test"})
    other = evaluate(static, [str(ref_file)], config)["scores"]
    assert other["temporal_change"] == 0.0 and other["temporal_change_gap"] == pytest.approx(1.0)


def test_seams_of_videos_are_scored_per_frame() -> None:
    # Frames that are mosaics of 4-pixel tiles: the per-frame seam ratio sees them; the reference's is beside it.
    tiles = torch.randint(0, 200, (3, 1, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    clips = tiles.repeat_interleave(4, dim=-1).repeat_interleave(4, dim=-2)
    clips = clips + torch.randint(0, 20, clips.shape, generator=torch.Generator().manual_seed(1))
    samples = ImageSet(clips.to(torch.uint8), None, {})
    frames = as_frames(samples).images.float()
    config = EvalConfig(metrics=["seams:4"], progress=False)
    scores = evaluate(samples, [], config)["scores"]
    assert set(scores) == {"seam_ratio_frames_4"}
    assert scores["seam_ratio_frames_4"] == pytest.approx(seam_ratio(frames, 4)) and scores["seam_ratio_frames_4"] > 3


def test_sigma_of_videos_is_scored_per_frame() -> None:
    clips = torch.randint(0, 255, (3, 1, 2, 16, 16), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    samples = ImageSet(clips, None, {})
    config = EvalConfig(metrics=["sigma"], progress=False, swd=SWDConfig(min_resolution=8))
    scores = evaluate(samples, [], config)["scores"]
    assert scores == pytest.approx(
        {f"sigma_frames_{k[6:]}": v for k, v in level_sigma(as_frames(samples).images, 8).items()}
    )
