"""What only a decomposed model can do (issue 26): stop after a stage and finish later, upscale, vary the detail.

Exact properties on a small random DiT (no training needed): a stopped sampling resumes bit for bit, given coarse
levels are held exactly, and with Haar the result decomposes back to them; every decomposition and stage count,
images and clips; Flow Matching, the cascade and Pyramidal Flow are refused with a message that says why.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfm.cli import main as cli
from dfm.config import SamplerConfig
from dfm.decomposition import DCTBands, HaarWavelet, LaplacianPyramid
from dfm.generate import Generator, parse_seeds
from dfm.methods import get_method
from dfm.models import DFMDiT, DiTConfig, Preconditioned
from dfm.presets import get_preset, with_method
from dfm.run import DataSpec
from dfm.sampling import StageSampler

FIXTURES = Path(__file__).parent / "fixtures" / "format1"


def _model(stages: int, size=(8, 8)) -> Preconditioned:
    torch.manual_seed(0)
    factors = tuple(2 ** (stages - 1 - s) for s in range(stages))
    net = DFMDiT(DiTConfig(input_size=size, in_channels=1, patch_size=2 ** (stages - 1), hidden_size=32, depth=2,
                           num_heads=2, num_classes=4, stage_factors=factors))  # fmt: skip
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return Preconditioned(net.eval(), (0.6,) + (0.3,) * (stages - 1))


CASES = [
    (LaplacianPyramid(2), SamplerConfig((3, 2), (0.7,), "heun", (1.5,)), (4, 1, 8, 8)),
    (LaplacianPyramid(3), SamplerConfig((2, 2, 2), (0.5, 0.8), "euler", (1.0,)), (4, 1, 8, 8)),
    (HaarWavelet(2), SamplerConfig((3, 2), (0.7,), "euler", (2.0,)), (4, 1, 8, 8)),
    (HaarWavelet(3), SamplerConfig((2, 2, 1), (0.5, 0.8), "heun", (1.0,)), (4, 1, 8, 8)),
    (DCTBands(2), SamplerConfig((3, 2), (0.7,), "heun", (1.0,)), (4, 1, 8, 8)),
    (LaplacianPyramid(2), SamplerConfig((2, 2), (0.7,), "heun", (1.5,)), (4, 1, 4, 8, 8)),  # clips
]


@pytest.mark.parametrize("dec, settings, shape", CASES)
def test_a_stopped_sampling_resumes_bit_for_bit(dec, settings, shape):
    stages = dec.num_stages
    model = _model(stages, shape[2:])
    sampler, y, seeds = StageSampler(dec), torch.tensor([0, 1, 2, 3]), [5, 6, 7, 8]
    full = sampler.sample(model, shape, y, settings=settings, seeds=seeds)
    for stop in range(stages - 1):
        part = sampler.sample(model, shape, y, settings=settings, seeds=seeds, until_stage=stop)
        assert part.state.stage == stop and len(part.previews) == stop + 1
        torch.testing.assert_close(part.images, full.previews[stop], rtol=0, atol=0)
        rest = sampler.resume(model, part.state, y, settings=settings)
        assert torch.equal(rest.images, full.images)
        assert all(torch.equal(a, b) for a, b in zip(rest.previews, full.previews))
    with pytest.raises(ValueError, match="until_stage"):
        sampler.sample(model, shape, y, settings=settings, seeds=seeds, until_stage=stages - 1)


def test_picked_samplings_finish_as_they_would_have_alone():
    """Finished one at a time, each picked seed is bit for bit the image an uninterrupted batch of one gives."""
    dec, settings, shape = CASES[0]
    model, sampler = _model(2), StageSampler(dec)
    part = sampler.sample(model, shape, torch.tensor([0, 1, 2, 3]), settings=settings, seeds=[5, 6, 7, 8],
                          until_stage=0)  # fmt: skip
    for i in (1, 3):  # the stage-1 state in a batch of 4, finished alone
        alone = sampler.sample(model, (1, *shape[1:]), torch.tensor([i]), settings=settings, seeds=[5 + i])
        finished = sampler.resume(model, part.state.select([i]), torch.tensor([i]), settings=settings)
        torch.testing.assert_close(finished.images, alone.images, atol=1e-5, rtol=0)  # float rounding of the batch
    one = [sampler.sample(model, (1, *shape[1:]), torch.tensor([i]), settings=settings, seeds=[5 + i],
                          until_stage=0) for i in range(4)]  # fmt: skip
    alone = sampler.sample(model, (1, *shape[1:]), torch.tensor([3]), settings=settings, seeds=[8])
    assert torch.equal(sampler.resume(model, one[3].state, torch.tensor([3]), settings=settings).images, alone.images)


@pytest.mark.parametrize("dec, settings, shape", CASES)
def test_given_coarse_levels_are_held_exactly(dec, settings, shape):
    model, sampler = _model(dec.num_stages, shape[2:]), StageSampler(dec)
    x = torch.randn(shape) * 0.5
    levels = dec.decompose(x)
    for k in range(1, dec.num_stages):
        out = sampler.sample(model, shape, torch.arange(4), settings=settings, seeds=[1, 2, 3, 4], given=levels[:k])
        assert all(torch.equal(a, b) for a, b in zip(out.levels[:k], levels[:k]))
        again = dec.decompose(out.images)
        if isinstance(dec, HaarWavelet):  # independent levels: the result decomposes back to what was given
            for a, b in zip(again[:k], levels[:k]):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert len(out.previews) == dec.num_stages


def test_upscale_and_vary_through_the_generator():
    """With Haar the upscaled images decompose back to the low-resolution input, and every variation to the coarse
    level of the image it varies, exactly (up to float rounding)."""
    cfg = get_preset("quickstart")
    cfg.method.data_std, cfg.method.decomposition = (0.6, 0.3), "haar"
    torch.manual_seed(0)
    network = get_method("dfm").network(cfg, (1, 16, 16), 10).eval()
    for p in network.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    gen, haar = Generator(network, cfg, DataSpec((1, 16, 16), 10), None), HaarWavelet(2)
    low = torch.rand(3, 1, 8, 8) * 2 - 1
    up = gen.upscale(low, [0, 1, 2], [1, 2, 3])
    assert up.images.shape == (3, 1, 16, 16)
    torch.testing.assert_close(haar.decompose(up.images)[0], low, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="resolution of a coarse stage"):
        gen.upscale(torch.zeros(1, 1, 4, 4), [0])
    base = gen.generate([7], [3])
    var = gen.vary(7, [0, 1, 2], 3)
    for v in var.images:  # one composition ...
        torch.testing.assert_close(haar.decompose(v[None])[0], haar.decompose(base.images)[0], atol=1e-5, rtol=0)
    assert (var.images[0] - var.images[1]).abs().max() > 1e-3  # ... other detail
    with pytest.raises(ValueError, match="keep 1"):
        gen.vary(7, [0], 3, keep=2)


@pytest.mark.parametrize("method, kind", [("fm", "one-stage Flow Matching"), ("cascade", "two-model cascade"),
                                          ("pyramidal", "Pyramidal Flow")])  # fmt: skip
def test_other_methods_are_refused_with_the_reason(method, kind):
    cfg = with_method(get_preset("quickstart"), method)
    cfg.method.data_std = (0.6,) if method == "fm" else (0.6, 0.3)
    network = get_method(method).network(cfg, (1, 16, 16), 10)
    gen = Generator(network, cfg, DataSpec((1, 16, 16), 10), None)
    for call in (lambda: gen.generate([0], [0], until_stage=0), lambda: gen.upscale(torch.zeros(1, 1, 8, 8), [0]),
                 lambda: gen.vary(0, [1], 0)):  # fmt: skip
        with pytest.raises(ValueError, match=f"{kind}.*needs a DFM model"):
            call()


# ---------------------------------------------------------------------------------------------- the command line
def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_until_stage_then_refine_gives_the_uninterrupted_images(tmp_path):
    run = FIXTURES / "dfm"
    assert cli(["sample", str(run), "--seeds", "0-7", "--until-stage", "1", "--out", str(tmp_path / "c"),
                "--png"]) == 0  # fmt: skip
    record = json.loads((tmp_path / "c" / "state.json").read_text())
    assert record["until_stage"] == 1 and record["count"] == 8
    assert _png(tmp_path / "c" / "images" / "seed000003_class3.png").shape == (8, 8)  # the 8x8 stage-1 preview
    assert cli(["refine", str(tmp_path / "c"), "--pick", "3,5", "--png", "--npz"]) == 0
    assert cli(["sample", str(run), "--seeds", "0-7", "--out", str(tmp_path / "full"), "--png"]) == 0
    for seed in (3, 5):
        name = f"seed{seed:06d}_class{seed}.png"
        assert np.array_equal(
            _png(tmp_path / "c" / "refined" / "images" / name), _png(tmp_path / "full" / "images" / name)
        )
    npz = np.load(tmp_path / "c" / "refined" / "samples.npz")
    assert npz["seeds"].tolist() == [3, 5] and npz["labels"].tolist() == [3, 5]
    assert cli(["refine", str(tmp_path / "c"), "--pick", "3,99"]) == 2
    assert cli(["refine", str(tmp_path / "full"), "--pick", "3"]) == 2


def test_refine_keeps_the_shift_of_the_first_half(tmp_path):
    run = FIXTURES / "dfm"
    assert cli(["sample", str(run), "--seeds", "0-3", "--until-stage", "1", "--shift", "0.4", "--out",
                str(tmp_path / "c"), "--npz", "--no-grid", "--no-progression"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "c" / "state.json").read_text())["shift"] == 0.4
    assert cli(["refine", str(tmp_path / "c"), "--pick", "1,2", "--npz", "--no-grid", "--no-progression"]) == 0
    for shift, name in (("0.4", "shifted"), ("1", "plain")):
        assert cli(["sample", str(run), "--seeds", "1,2", "--shift", shift, "--out", str(tmp_path / name), "--npz",
                    "--no-grid", "--no-progression"]) == 0  # fmt: skip
    refined = np.load(tmp_path / "c" / "refined" / "samples.npz")["arr_0"]
    assert np.array_equal(refined, np.load(tmp_path / "shifted" / "samples.npz")["arr_0"])
    assert not np.array_equal(refined, np.load(tmp_path / "plain" / "samples.npz")["arr_0"])
    # a record from before sampler.shift existed refines with the run's sampler (no shift)
    assert cli(["sample", str(run), "--seeds", "1,2", "--until-stage", "1", "--out", str(tmp_path / "old"),
                "--no-grid", "--no-progression"]) == 0  # fmt: skip
    record = json.loads((tmp_path / "old" / "state.json").read_text())
    del record["shift"]
    (tmp_path / "old" / "state.json").write_text(json.dumps(record))
    assert cli(["refine", str(tmp_path / "old"), "--pick", "1,2", "--npz", "--no-grid", "--no-progression"]) == 0
    assert np.array_equal(np.load(tmp_path / "old" / "refined" / "samples.npz")["arr_0"],
                          np.load(tmp_path / "plain" / "samples.npz")["arr_0"])  # fmt: skip
    assert cli(["sample", str(run), "--shift", "-1", "--out", str(tmp_path / "bad")]) == 2
    # --shift-from -1: only the finest stage's grid is shifted; refine keeps that too
    assert cli(["sample", str(run), "--seeds", "0-3", "--until-stage", "1", "--shift", "0.4", "--shift-from", "-1",
                "--out", str(tmp_path / "c1"), "--npz", "--no-grid", "--no-progression"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "c1" / "state.json").read_text())["shift_from"] == -1
    assert cli(["refine", str(tmp_path / "c1"), "--pick", "1,2", "--npz", "--no-grid", "--no-progression"]) == 0
    assert cli(["sample", str(run), "--seeds", "1,2", "--shift", "0.4", "--shift-from", "-1", "--out",
                str(tmp_path / "fine"), "--npz", "--no-grid", "--no-progression"]) == 0  # fmt: skip
    fine = np.load(tmp_path / "fine" / "samples.npz")["arr_0"]
    assert np.array_equal(np.load(tmp_path / "c1" / "refined" / "samples.npz")["arr_0"], fine)
    assert not np.array_equal(fine, np.load(tmp_path / "shifted" / "samples.npz")["arr_0"])
    assert not np.array_equal(fine, np.load(tmp_path / "plain" / "samples.npz")["arr_0"])
    assert cli(["sample", str(run), "--shift", "0.4", "--shift-from", "5", "--out", str(tmp_path / "bad")]) == 2


def test_upscale_and_vary_on_the_command_line(tmp_path, capsys):
    run = FIXTURES / "dfm"
    images = tmp_path / "low"
    images.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((8, 8)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    assert cli(["upscale", str(run), "--images", str(images), "--classes", "1", "--out", str(tmp_path / "up"),
                "--npz"]) == 0  # fmt: skip
    assert np.load(tmp_path / "up" / "samples.npz")["arr_0"].shape == (3, 14, 14, 1)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(images / "big.png")
    assert cli(["upscale", str(run), "--images", str(images), "--out", str(tmp_path / "up2")]) == 2
    assert "differ in size" in capsys.readouterr().err
    assert cli(["sample", str(run), "--vary", "3", "--seeds", "0-3", "--out", str(tmp_path / "v"), "--npz"]) == 0
    assert np.load(tmp_path / "v" / "samples.npz")["arr_0"].shape == (4, 14, 14, 1)
    assert (tmp_path / "v" / "base_seed000003.png").is_file()
    for name in ("fm", "cascade"):
        assert cli(["sample", str(FIXTURES / name), "--until-stage", "1", "--out", str(tmp_path / "x")]) == 2
        assert "needs a DFM model" in capsys.readouterr().err


def test_any_number_of_seeds_is_taken_in_slices_and_outputs_that_cannot_fit_are_refused(tmp_path, capsys):
    seeds = parse_seeds("0-1000000000,7")
    assert len(seeds) == 1_000_000_002 and seeds[999_999_999:1_000_000_003] == [999_999_999, 1_000_000_000, 7]
    code = cli(["sample", str(FIXTURES / "dfm"), "--seeds", "0-1000000000", "--npz", "--out", str(tmp_path / "s")])
    assert code == 2 and "GB" in capsys.readouterr().err and not (tmp_path / "s" / "samples.npz").exists()
