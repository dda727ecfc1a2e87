"""Run directories written by earlier versions (tests/fixtures/format1, see its README) load and sample the same
images today."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dfm.cli import main as cli
from dfm.config import FORMAT
from dfm.generate import Generator
from helpers import needs_data

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


def test_a_bare_network_and_a_pipeline_directory_of_format_1_load() -> None:
    """A bare ``DFMDiT.save_pretrained`` directory (the dfm run's EMA network, preconditioned inside in format 1)
    samples the run's images with the run's sampler; a ``DFMPipeline.save_pretrained`` one those of pretrained/."""
    bare = Generator.from_run(FIXTURES / "bare-dfmdit")
    assert bare.config.method.precondition and bare.config.method.data_std is not None
    settings = bare.settings(steps=(15, 5), thresholds=(0.7,), solver="heun", guidance=1.5)
    images = bare.generate([0, 1, 2], [0, 1, 2], settings).images
    np.testing.assert_allclose(images.numpy(), EXPECTED["dfm/images"], atol=1e-5)
    images, _ = _sample(FIXTURES / "pipeline-dfm", ema=True)
    np.testing.assert_allclose(images.numpy(), EXPECTED["dfm/pretrained/images"], atol=1e-5)


@needs_data
@pytest.mark.parametrize("name", ["dfm", "cascade"])
def test_a_run_of_format_1_resumes(tmp_path: Path, name: str) -> None:
    run = tmp_path / name
    shutil.copytree(FIXTURES / name, run)
    args = ["train", "--config", str(run / "config.json"), "--out", str(run), "--resume", "auto", "--steps", "4",
            "--no-progress"]  # fmt: skip
    assert cli(args) == 0
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    saved = json.loads((run / "config.json").read_text())
    assert (
        saved["format"] == FORMAT
        and saved["sampler"]["steps"] == json.loads((FIXTURES / name / "config.json").read_text())["method"]["steps"]
    )
