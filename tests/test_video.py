"""Video end to end: moving Fashion-MNIST clips through the decomposition, model, objective, trainer and sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfm import DFMObjective, LaplacianPyramid, SamplerConfig, StageSampler
from dfm.cli import main as cli
from dfm.config import RunConfig
from dfm.models import create_model

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def test_video_shapes_through_model_objective_and_sampler() -> None:
    pyr = LaplacianPyramid(2)
    x = torch.randn(2, 1, 4, 16, 16)
    model = create_model("DFM-DiT-Tiny", input_size=(4, 16, 16), depth=1, hidden_size=32, num_heads=2)
    out = DFMObjective(pyr).loss(model, x, torch.tensor([1, 2]))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    res = StageSampler(pyr).sample(
        model, (2, 1, 4, 16, 16), torch.tensor([1, 2]), settings=SamplerConfig((2, 2), (0.7,)), seeds=[0, 1]
    )
    assert res.images.shape == (2, 1, 4, 16, 16)
    assert [tuple(p.shape) for p in res.previews] == [(2, 1, 4, 8, 8), (2, 1, 4, 16, 16)]


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed")
def test_tiny_video_train_and_sample_writes_gifs(tmp_path: Path) -> None:
    run = tmp_path / "video"
    code = cli([
        "train", "--preset", "video-quickstart", "--out", str(run), "--steps", "2", "--batch-size", "4",
        "--no-progress", "-o", "data.num_clips=16", "-o", "data.frames=4", "-o", "model.overrides.depth=1",
        "-o", "model.overrides.hidden_size=32", "-o", "model.overrides.num_heads=2", "-o", "sampler.steps=2,2",
        "-o", "train.num_sample_images=2",
    ])  # fmt: skip
    assert code == 0
    cfg = RunConfig.load(run / "config.json")
    assert cfg.method.standardize and len(cfg.method.level_std) == 2  # estimated from data and saved
    assert (run / "samples" / "step_00000002.gif").is_file()
    out = tmp_path / "s"
    assert cli(["sample", str(run), "--seeds", "0-2", "--out", str(out), "--steps", "2,2"]) == 0
    gif = Image.open(out / "video.gif")
    assert gif.n_frames == 4
    assert Image.open(out / "progression.gif").n_frames == 4


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed")
@pytest.mark.parametrize("method", ["cascade", "pyramidal"])
def test_baselines_train_and_sample_videos(tmp_path: Path, method: str) -> None:
    run = tmp_path / method
    code = cli([
        "train", "--preset", "video-quickstart", "--method", method, "--out", str(run), "--steps", "2",
        "--batch-size", "4", "--no-progress", "-o", "data.num_clips=16", "-o", "data.frames=4",
        "-o", "model.overrides.depth=1", "-o", "model.overrides.hidden_size=32", "-o", "model.overrides.num_heads=2",
        "-o", "sampler.steps=2,2", "-o", "train.num_sample_images=2",
    ])  # fmt: skip
    assert code == 0
    out = tmp_path / "s"
    assert cli(["sample", str(run), "--seeds", "0-2", "--out", str(out), "--npz"]) == 0
    assert np.load(out / "samples.npz")["arr_0"].shape == (3, 4, 32, 32, 1)  # clips, frames, H, W, C
    assert Image.open(out / "video.gif").n_frames == 4
