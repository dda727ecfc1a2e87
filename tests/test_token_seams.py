"""benchmarks/token_seams.py: samplings started from real images part of the way land where the exact model says."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dfm.baselines.pyramidal import GaussianPyramid, PyramidalPath, PyramidalSampler
from dfm.eval import seam_ratio

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "token_seams.py"


def _script():
    spec = importlib.util.spec_from_file_location("token_seams", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mosaic(n: int = 3) -> torch.Tensor:
    """Images with a ratio of 3 on the 4-pixel grid (steps of 1 inside a tile, 3 across a border)."""
    row = torch.tensor([0.0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15, 18, 19, 20, 21]) / 21
    return (row[None, :] + row[:, None]).expand(n, 1, 16, 16).contiguous()


def test_flow_matching_started_part_way_lands_on_the_data_of_an_exact_model() -> None:
    target = _mosaic()
    oracle = lambda levels, t, y, stage: [(target - levels[0]) / (1 - t.view(-1, 1, 1, 1)).clamp(min=1e-6)]  # noqa: E731
    gen = SimpleNamespace(config=SimpleNamespace(method=SimpleNamespace(name="fm")), model=oracle)
    rows = _script().forced(gen, target, [0.3, 0.9], seed=0, period=4)
    assert [label for label, _ in rows] == ["signal 0.3", "signal 0.9"]
    assert [ratio for _, ratio in rows] == pytest.approx([3.0, 3.0], abs=1e-4)


def test_pyramidal_last_stage_started_from_its_start_point_lands_on_the_data() -> None:
    target = _mosaic()
    path = PyramidalPath(GaussianPyramid(2))
    levels = path.decomposition.decompose(target)

    def oracle(levels_t, t, y, main_stage):  # the exact velocity of the one-image data set, in local time
        k = 1
        e, s = path.end_coef(k), path.start_coef(k)
        tau = path.local_time(t[:, k].double(), k).view(-1, 1, 1, 1).float()
        up = path.decomposition.up(levels[0], k)
        a = tau * e + (1 - tau) * s
        noise = (levels_t[k] - tau * e * levels[k] - (1 - tau) * s * up) / (1 - a).clamp(min=1e-6)
        return [torch.zeros_like(levels_t[0]), e * levels[k] - s * up - (e - s) * noise]

    gen = SimpleNamespace(config=SimpleNamespace(method=SimpleNamespace(name="pyramidal")), model=oracle,
                          sampler=PyramidalSampler(path))  # fmt: skip
    ((label, ratio),) = _script().forced(gen, target, [0.5], seed=0, period=4)
    assert label == "last stage from s = 0.333"
    assert ratio == pytest.approx(seam_ratio(target, 4), abs=1e-4) and ratio == pytest.approx(3.0, abs=1e-4)
    # other methods are not measured
    assert _script().forced(SimpleNamespace(config=SimpleNamespace(method=SimpleNamespace(name="dfm"))), target,
                            [0.5], seed=0, period=4) == []  # fmt: skip
