"""Per-stage preconditioning as a run setting: measured stds, saved and reused; the EDM loss weighting; the
held-aside validation split used to choose settings."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from dfm.baselines import CascadePreconditioned
from dfm.bench.quality import QualitySettings, add_quality_parser, reference_images, run_config, settings_from_args
from dfm.cli import main as cli
from dfm.config import RunConfig
from dfm.decomposition import LaplacianPyramid, downsample, estimate_level_std
from dfm.generate import Generator
from dfm.methods import get_method
from dfm.models import DiTConfig
from dfm.models.precondition import Preconditioned, flow_preconditioning
from dfm.objective import DFMObjective
from dfm.presets import get_preset, with_method
from dfm.resolve import apply_overrides
from helpers import TINY_RUN, needs_data

TINY = [*TINY_RUN, "-o", "sampler.steps=2,2"]


def _train(run: Path, steps: int, *extra: str) -> None:
    args = ["train", "--out", str(run), "--steps", str(steps), "--batch-size", "4", "--no-progress", *TINY, *extra]
    assert cli(args) == 0


def _std_batch(seed: int = 0) -> torch.Tensor:
    """The 2,048 training images the trainer measures stds on (the first of a seeded permutation)."""
    from dfm.data import build_dataset

    ds = build_dataset("fashion-mnist", 32)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:2048]
    return ds.get_batch(idx, augment=False)[0]


# -- configuration --------------------------------------------------------------------------------------------
def test_every_preset_and_method_preconditions() -> None:
    for name in ("quickstart", "quickstart-fm", "fmnist-dfm", "fmnist-fm", "video-quickstart", "imagenet512-b"):
        assert get_preset(name).method.precondition, name
    for method in ("cascade", "pyramidal"):
        assert with_method(get_preset("quickstart"), method).method.precondition
    with pytest.raises(ValueError, match="velocity loss"):
        apply_overrides(with_method(get_preset("quickstart"), "pyramidal"), ["method.loss_weighting=edm"])


def test_precondition_needs_a_measured_std() -> None:
    cfg = get_preset("quickstart")
    with pytest.raises(ValueError, match="method.data_std is unset"):
        get_method("dfm").velocity_model(lambda *a: a, cfg.method)
    with pytest.raises(ValueError, match="unknown model setting model.overrides.precondition"):
        apply_overrides(cfg, ["model.overrides.precondition=false"])
    with pytest.raises(ValueError, match="2 positive values"):
        apply_overrides(cfg, ["method.data_std=0.5"])
    with pytest.raises(ValueError, match="loss_weighting"):
        apply_overrides(cfg, ["method.loss_weighting=snr"])
    with pytest.raises(ValueError, match="data_std or the path's coefficients"):
        Preconditioned(lambda *a: a)


# -- the trainer measures, saves and reuses the stds ----------------------------------------------------------
@needs_data
def test_dfm_run_measures_each_levels_std_and_the_model_uses_it(tmp_path: Path) -> None:
    run = tmp_path / "dfm"
    _train(run, 2, "-o", "train.ckpt_every=2")
    cfg = RunConfig.load(run / "config.json")
    expected = tuple(round(s, 6) for s in estimate_level_std(LaplacianPyramid(2), _std_batch()))
    assert cfg.method.precondition and cfg.method.data_std == expected
    assert 0.1 < expected[1] < 0.5 * expected[0]  # the fine residual is far quieter than the coarse level
    for source in (run, run / "pretrained"):
        gen = Generator.from_run(source)
        assert isinstance(gen.model, Preconditioned) and gen.model.network is gen.network
        assert gen.config.method.data_std == expected
    # Resuming keeps the run's measured values (a changed std would change the model).
    _train(run, 3, "--resume", "auto")
    assert RunConfig.load(run / "config.json").method.data_std == expected


@needs_data
def test_flow_matching_cascade_and_pyramidal_flow_get_their_own_stds(tmp_path: Path) -> None:
    x = _std_batch()
    _train(tmp_path / "fm", 1, "--method", "fm", "-o", "sampler.steps=4")
    fm = RunConfig.load(tmp_path / "fm" / "config.json").method
    assert fm.data_std == (round(float(x.std()), 6),)

    _train(tmp_path / "cascade", 1, "--method", "cascade")
    cascade = RunConfig.load(tmp_path / "cascade" / "config.json").method
    low = downsample(x, (16, 16))
    assert cascade.data_std == (round(float(low.std()), 6), round(float(x.std()), 6))
    velocity = Generator.from_run(tmp_path / "cascade").model
    assert isinstance(velocity, CascadePreconditioned) and velocity.data_std == cascade.data_std

    _train(tmp_path / "pyramidal", 1, "--method", "pyramidal")
    pyramidal = RunConfig.load(tmp_path / "pyramidal" / "config.json").method
    assert pyramidal.data_std == (round(float(low.std()), 6), round(float(x.std()), 6))  # Gaussian pyramid levels
    gen = Generator.from_run(tmp_path / "pyramidal")  # the network in the preconditioning of its path
    assert isinstance(gen.model, Preconditioned) and gen.model.network is gen.network
    assert cli(["sample", str(tmp_path / "pyramidal"), "--seeds", "0-1", "--out", str(tmp_path / "ps")]) == 0


def test_pyramidal_preconditioning_scales_the_path_of_each_stage() -> None:
    """A fresh DiT outputs F = 0, so the wrapped velocity is (e_k - s_k) c_skip(a) x_τ with a = τ e_k + (1 - τ) s_k;
    the network sees c_in(a) x_τ; training reaches every parameter the unwrapped model trains."""
    from dfm.baselines.pyramidal import GaussianPyramid, PyramidalObjective, PyramidalPath, pyramidal_coefficients
    from dfm.models import DFMDiT

    path, std = PyramidalPath(GaussianPyramid(2)), (0.6, 0.5)
    model = DFMDiT(DiTConfig(input_size=(8, 8), in_channels=1, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                             num_classes=3, stage_factors=(2, 1)))  # fmt: skip
    seen = []
    hooked = lambda levels, t, y, q: seen.append(levels) or model(levels, t, y, q)  # noqa: E731
    wrapped = Preconditioned(hooked, coefficients=pyramidal_coefficients(path, std))
    x = [torch.zeros(3, 1, 4, 4), torch.randn(3, 1, 8, 8)]
    t = torch.tensor([[0.0, 0.6], [0.0, 0.9], [0.0, 0.5]])  # stage 1 (window [0.5, 1]) at τ = 0.2, 0.8, 0
    stage = torch.ones(3, dtype=torch.long)
    out = wrapped(x, t, None, stage)[1]
    e, s = path.end_coef(1), path.start_coef(1)
    tau = (t[:, 1] - 0.5) / 0.5
    c_in, c_skip, _ = flow_preconditioning(tau * e + (1 - tau) * s, std[1])
    torch.testing.assert_close(out, ((e - s) * c_skip).view(-1, 1, 1, 1) * x[1])
    torch.testing.assert_close(seen[0][1], c_in.view(-1, 1, 1, 1) * x[1])

    objective = PyramidalObjective(path)
    for p in model.parameters():  # leave the zero init so that gradients reach every layer
        p.data.add_(0.01 * torch.randn_like(p))
    velocity = Preconditioned(model, coefficients=pyramidal_coefficients(path, std))
    objective.loss(velocity, torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]),
                   generator=torch.Generator().manual_seed(0)).loss.backward()  # fmt: skip
    assert all(p.grad is not None for n, p in model.named_parameters() if "y_embedder" not in n)


@needs_data
def test_precondition_off_trains_the_plain_network(tmp_path: Path) -> None:
    off = [
        "-o",
        "method.precondition=false",
        "-o",
        "method.loss_weighting=velocity",
        "-o",
        "method.prediction=velocity",
    ]
    _train(tmp_path / "off", 1, *off)
    cfg = RunConfig.load(tmp_path / "off" / "config.json")
    assert not cfg.method.precondition and cfg.method.data_std is None
    gen = Generator.from_run(tmp_path / "off")
    assert gen.model is gen.network


# -- the EDM loss weighting -----------------------------------------------------------------------------------
def test_edm_weighting_divides_each_stage_error_by_c_out_squared() -> None:
    """With a model that predicts 0, the loss is the mean over samples of Σ_s mask_s E[v_s²] / c_out(t_s)²."""
    pyramid, std = LaplacianPyramid(2), (0.6, 0.2)
    x = torch.randn(64, 1, 8, 8)
    zero = lambda levels, t, y, main_stage: [torch.zeros_like(lv) for lv in levels]  # noqa: E731
    edm = DFMObjective(pyramid, stage_probs=(0.5, 0.5), loss_weighting="edm", data_std=std)
    plain = DFMObjective(pyramid, stage_probs=(0.5, 0.5))
    out = edm.loss(zero, x, generator=torch.Generator().manual_seed(3))
    ref = plain.loss(zero, x, generator=torch.Generator().manual_seed(3))  # the same draw
    torch.testing.assert_close(out.path.t, ref.path.t)
    t = out.path.t
    weights = torch.stack([flow_preconditioning(t[:, s], std[s])[2].pow(-2) for s in range(2)], 1)
    per_stage = torch.stack([tgt.pow(2).flatten(1).mean(1) for tgt in out.path.targets], 1)
    expected = (per_stage * weights * out.path.mask).sum(1).mean()
    torch.testing.assert_close(out.loss, expected)
    assert out.loss > 2 * ref.loss  # σ = 0.2 weights the fine stage up by up to 25x: the weighting is not a no-op
    with pytest.raises(ValueError, match="needs data_std"):
        DFMObjective(pyramid, loss_weighting="edm")


# -- predicting the data (method.prediction=data) ----------------------------------------------------------------
def _knows(x1: list[torch.Tensor], std, delta: list[torch.Tensor] | None = None):
    """A network that predicts the clean levels x1 (plus ``delta``) in data prediction's units, x1 / σ."""
    delta = delta or [torch.zeros_like(v) for v in x1]
    return lambda levels, t, y, main_stage: [(v + d) / sd for v, d, sd in zip(x1, delta, std)]


def test_data_prediction_gives_the_straight_velocity_and_lands_on_its_prediction() -> None:
    std = (0.6, 0.2)
    x1 = [torch.randn(4, 1, 4, 4) * std[0], torch.randn(4, 1, 8, 8) * std[1]]
    model = Preconditioned(_knows(x1, std), std, prediction="data")
    noise = [torch.randn_like(v) for v in x1]
    t = torch.tensor([[0.0, 0.0], [0.3, 0.0], [0.9, 0.5], [0.99, 0.97]])
    xt = [t[:, s, None, None, None] * x1[s] + (1 - t[:, s, None, None, None]) * noise[s] for s in range(2)]
    v = model(xt, t, None, torch.tensor([0, 0, 1, 1]))
    for s in range(2):
        active = torch.tensor([s == 0, s == 0, True, True])  # main stages 0, 0, 1, 1
        torch.testing.assert_close(v[s][active], (x1[s] - noise[s])[active], atol=1e-4, rtol=1e-4)
    # uneven Euler steps, as fine as 0.001 near the data: the last one lands on the prediction exactly
    grid = torch.tensor([0.0, 0.2, 0.5, 0.8, 0.95, 0.99, 0.999, 1.0])
    x = noise[0]
    for a, b in zip(grid[:-1], grid[1:]):
        x = x + (b - a) * model([x, torch.zeros_like(x1[1])], torch.full((4, 2), float(a)), None, torch.zeros(4))[0]
    torch.testing.assert_close(x, x1[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="choose velocity or data"):
        flow_preconditioning(torch.zeros(1), 0.5, "noise")


@pytest.mark.parametrize("weighting", ["velocity", "edm"])
def test_data_prediction_loss_is_the_error_of_the_clean_prediction(weighting: str) -> None:
    """velocity: ||x̂ - x||² / max(1 - t, 0.05)² (the clamp of Li & He 2025); edm: ||x̂ - x||² / σ²."""
    pyramid, std = LaplacianPyramid(2), (0.6, 0.2)
    x = torch.randn(256, 1, 8, 8) * 0.5
    levels = pyramid.decompose(x)
    delta = [0.1 * torch.randn_like(v) for v in levels]
    model = Preconditioned(_knows(levels, std, delta), std, prediction="data")
    objective = DFMObjective(pyramid, stage_probs=(0.5, 0.5), loss_weighting=weighting, data_std=std,
                             prev_loc=3.0, prediction="data")  # fmt: skip
    out = objective.loss(model, x, generator=torch.Generator().manual_seed(0))
    t = out.path.t
    assert (t > 0.95).any()  # some draws are past the clamp
    err = torch.stack([d.pow(2).flatten(1).mean(1) for d in delta], 1)
    if weighting == "velocity":
        weights = (1 - t).clamp(min=0.05).pow(-2)
    else:
        weights = torch.tensor(std).pow(-2).expand_as(t)
    expected = (err * weights * out.path.mask).sum(1).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-3, atol=1e-4)


def test_data_prediction_settings_are_checked() -> None:
    base = get_preset("quickstart")
    with pytest.raises(ValueError, match="part of the preconditioning: set method.precondition=true"):
        apply_overrides(base, ["method.prediction=data", "method.precondition=false"])
    with pytest.raises(ValueError, match="method.prediction='x': choose one of velocity, data"):
        apply_overrides(base, ["method.prediction=x"])
    with pytest.raises(ValueError, match="method cascade implements method.prediction=velocity, not data"):
        apply_overrides(with_method(base, "cascade"), ["method.prediction=data"])
    assert apply_overrides(with_method(base, "pyramidal"), ["method.prediction=data"]).method.prediction == "data"
    for name in ("cascade", "pyramidal"):
        # the baselines' twins of a DFM config that predicts data predict the velocity (the paper's baselines)
        assert with_method(apply_overrides(base, ["method.prediction=data"]), name).method.prediction == "velocity"
    assert with_method(apply_overrides(base, ["method.prediction=data"]), "fm").method.prediction == "data"


@needs_data
def test_a_data_prediction_run_trains_samples_and_keeps_its_setting(tmp_path: Path) -> None:
    _train(tmp_path / "x", 2, "-o", "method.prediction=data")
    cfg = RunConfig.load(tmp_path / "x" / "config.json")
    assert cfg.method.prediction == "data"
    gen = Generator.from_run(tmp_path / "x")
    assert gen.model.coefficients(torch.zeros(1, 2), None)[0][1].item() == -1.0  # c_skip(0) = -1 / (1 - 0)
    images = gen.generate([0, 1], gen.labels([0, 1])).images
    assert images.shape[0] == 2 and torch.isfinite(images).all()


@needs_data
def test_a_pyramidal_flow_run_predicting_the_data_trains_resumes_and_samples(tmp_path: Path) -> None:
    from dfm.baselines import PyramidalDataPrediction

    _train(tmp_path / "p", 1, "--method", "pyramidal", "-o", "method.prediction=data")
    _train(tmp_path / "p", 2, "--method", "pyramidal", "-o", "method.prediction=data", "--resume", "auto")
    cfg = RunConfig.load(tmp_path / "p" / "config.json")
    assert cfg.method.prediction == "data" and cfg.method.name == "pyramidal"
    gen = Generator.from_run(tmp_path / "p")
    assert isinstance(gen.model, PyramidalDataPrediction) and gen.model.network is gen.network
    assert cli(["sample", str(tmp_path / "p"), "--seeds", "0-1", "--out", str(tmp_path / "ps")]) == 0


# -- choosing settings without the test split -----------------------------------------------------------------
@needs_data
def test_fit_and_val_split_the_training_set() -> None:
    from dfm.data.fashion_mnist import load_fashion_mnist

    train, fit, val = (load_fashion_mnist(split=s) for s in ("train", "fit", "val"))
    assert len(fit[0]) == 55_000 and len(val[0]) == 5_000
    assert torch.equal(torch.cat([fit[0], val[0]]), train[0]) and torch.equal(torch.cat([fit[1], val[1]]), train[1])
    assert torch.bincount(val[1]).min() > 400  # about 500 of every class
    with pytest.raises(ValueError, match="'fit'/'val'"):
        load_fashion_mnist(split="validation")


def test_bench_reference_val_trains_on_fit_and_scores_on_val(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_quality_parser(parser.add_subparsers())
    args = parser.parse_args(["quality", "--preset", "smoke", "--reference", "val", "--methods", "dfm"])
    settings = settings_from_args(args)
    assert settings.reference == "val"
    assert run_config(settings, settings.variants[0], 0).data.dataset == "fashion-mnist:fit"
    assert reference_images(tmp_path, settings) == "fashion-mnist:val"
    default = QualitySettings(variants=settings.variants, preset="quickstart")
    assert reference_images(tmp_path, default) == "fashion-mnist:test"
    assert run_config(default, settings.variants[0], 0).data.dataset == "fashion-mnist"


@needs_data
def test_saved_samples_drop_the_data_sets_padding_recorded_with_the_run(tmp_path: Path) -> None:
    import json

    from dfm.data import build_dataset

    pads = {r: build_dataset("fashion-mnist", r).padding for r in (28, 32, 48, 64)}
    assert pads == {28: 0, 32: 2, 48: 3, 64: 4}  # the 32 px image (28 padded by 2) resized: the border scales
    run = tmp_path / "run"
    _train(run, 1)
    assert json.loads((run / "pretrained" / "data_spec.json").read_text())["padding"] == 2
    assert cli(["sample", str(run / "pretrained"), "--seeds", "0-1", "--npz", "--out", str(tmp_path / "s")]) == 0
    assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape == (2, 28, 28, 1)
