"""FVD plumbing with a stand-in TorchScript I3D (the real file cannot be fetched here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from dfm.eval.cli import main
from dfm.eval.extractors import build_extractor

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


class FakeI3D(nn.Module):
    """Same call signature as i3d_torchscript.pt; checks the input layout it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 400)

    def forward(
        self, x: torch.Tensor, rescale: bool = True, resize: bool = True, return_features: bool = False
    ) -> torch.Tensor:
        assert not rescale and not resize and return_features
        assert x.shape[1] == 3 and x.shape[3] == 224 and x.shape[4] == 224
        assert bool(x.min() >= -1.0) and bool(x.max() <= 1.0)
        stats = torch.cat([x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))], dim=1)  # (N, 6)
        return self.proj(stats)


@pytest.fixture()
def fake_i3d(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(FakeI3D()), str(path))
    monkeypatch.setenv("DFM_I3D_WEIGHTS", str(path))
    return path


def _videos(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 4, 16, 16, 1)).astype(np.uint8)  # (N, T, H, W, C)


def test_i3d_wrapper_preprocesses_clips(fake_i3d) -> None:
    model = build_extractor("i3d")
    videos = torch.from_numpy(_videos(3, 0)).permute(0, 4, 1, 2, 3)  # (N, C, T, H, W)
    out = model(videos)
    assert out.features.shape == (3, 400)
    frames = videos.permute(0, 2, 1, 3, 4).reshape(12, 1, 16, 16).float() / 255
    frames = torch.nn.functional.interpolate(frames.expand(-1, 3, -1, -1), size=224, mode="bilinear") * 2 - 1
    x = frames.reshape(3, 4, 3, 224, 224).permute(0, 2, 1, 3, 4)
    expected = model.detector(x, rescale=False, resize=False, return_features=True)
    torch.testing.assert_close(out.features, expected)
    with pytest.raises(ValueError, match=r"\(N, C, T, H, W\)"):
        model(videos[:, :, 0])


def test_fvd_from_the_command_line(fake_i3d, tmp_path) -> None:
    np.savez(tmp_path / "fake.npz", arr_0=_videos(6, 1))
    np.savez(tmp_path / "real.npz", arr_0=_videos(6, 1))
    out = tmp_path / "scores.json"
    argv = ["score", str(tmp_path / "fake.npz"), "--ref", str(tmp_path / "real.npz"), "--metrics", "fvd"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["scores"]["fvd"] == pytest.approx(0.0, abs=1e-6)
    assert result["protocol"]["extractors"]["i3d"]["weights"] == str(fake_i3d)


def test_image_extractor_on_videos_scores_every_frame(tmp_path) -> None:
    np.savez(tmp_path / "clips.npz", arr_0=_videos(4, 2))
    argv = ["score", str(tmp_path / "clips.npz"), "--ref", str(tmp_path / "clips.npz"), "--metrics",
            "fd:efficientnet-lite0", "--out", str(tmp_path / "s.json"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["scores"]["fd_frames_efficientnet-lite0"] == pytest.approx(0.0, abs=1e-3)
    assert result["protocol"]["settings"]["per_frame"] is True
