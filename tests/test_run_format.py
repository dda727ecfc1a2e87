"""Run directories written by earlier versions (tests/fixtures/format1, see its README) load and sample the same
images today."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dfm.generate import Generator

FIXTURES = Path(__file__).parent / "fixtures" / "format1"
EXPECTED = np.load(FIXTURES / "expected.npz")
RUNS = ["dfm", "fm", "cascade", "pyramidal", "dfm-haar-std-noema"]


def _sample(path: Path, ema: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = Generator.from_run(path, ema=ema)
    out = gen.generate([0, 1, 2], [0, 1, 2], gen.settings(guidance=1.5))
    return out.images, out.previews


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.parametrize("where", ["run", "pretrained"])
def test_format1_runs_sample_what_they_sampled(name: str, where: str) -> None:
    key = name if where == "run" else f"{name}/pretrained"
    path = FIXTURES / key
    images, previews = _sample(path, ema=where == "pretrained" or "noema" not in name)
    np.testing.assert_allclose(images.numpy(), EXPECTED[f"{key}/images"], atol=1e-5)
    assert len(previews) == sum(k.startswith(f"{key}/preview") for k in EXPECTED.files)
    for i, preview in enumerate(previews):
        np.testing.assert_allclose(preview.numpy(), EXPECTED[f"{key}/preview{i}"], atol=1e-5)
