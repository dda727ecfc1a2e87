"""Config overrides and validation: every setting is checked, with a message that names it, before any work."""

from __future__ import annotations

import pytest

from dfm.config import RunConfig, apply_overrides, get_preset, validate
from dfm.factory import make_model


def test_model_overrides_take_the_type_of_their_ditconfig_field() -> None:
    cfg = apply_overrides(
        get_preset("quickstart"),
        ["model.overrides.use_stage_embedding=false", "model.overrides.depth=1", "model.overrides.mlp_ratio=2"],
    )
    assert cfg.model.overrides == {"use_stage_embedding": False, "depth": 1, "mlp_ratio": 2.0}
    cfg = apply_overrides(cfg, ["method.data_std=0.5,0.25"])
    model = make_model(cfg, (1, 32, 32), 10)
    assert model.config.use_stage_embedding is False and model.stage_embedder is None and model.config.depth == 1
    on = apply_overrides(get_preset("quickstart"), ["model.overrides.use_stage_embedding=true"])
    assert on.model.overrides["use_stage_embedding"] is True
    # The JSON round trip keeps them equal, so that a resumed run does not see "another config".
    assert RunConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    # Preconditioning is a method setting (its std is measured by the trainer), not a model override.
    with pytest.raises(ValueError, match="use method.precondition"):
        apply_overrides(get_preset("quickstart"), ["model.overrides.precondition=false"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.overrides.precondtion=false", "unknown model setting model.overrides.precondtion"),
        ("model.overrides.precondition=maybe", "use true or false"),
        ("model.overrides.depth=1.5", "cannot parse model.overrides.depth='1.5' as int"),
    ],
)
def test_bad_model_overrides_are_refused(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apply_overrides(get_preset("quickstart"), [override])


def test_a_config_file_with_a_mistyped_model_setting_is_refused() -> None:
    data = get_preset("quickstart").to_dict()
    data["model"]["overrides"] = {"use_stage_embedding": "false"}
    with pytest.raises(ValueError, match="model.overrides.use_stage_embedding='false' must be of type bool"):
        RunConfig.from_dict(data)


def test_config_files_from_before_the_method_setting_keep_their_preconditioning() -> None:
    data = get_preset("quickstart").to_dict()
    del data["method"]["precondition"], data["method"]["data_std"]
    data["model"]["overrides"] = {"precondition": True, "depth": 1}
    cfg = RunConfig.from_dict(data)  # the model then assumed std 1.0 for every stage
    assert cfg.method.precondition and cfg.method.data_std == (1.0, 1.0) and cfg.model.overrides == {"depth": 1}
    data["model"]["overrides"] = {"precondition": True, "data_std": [0.6, 0.2]}
    assert RunConfig.from_dict(data).method.data_std == (0.6, 0.2)
    data["model"]["overrides"] = {}
    assert not RunConfig.from_dict(data).method.precondition


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.thresholds=1.5", "method.thresholds=(1.5,) must lie strictly inside (0, 1)"),
        ("method.thresholds=0", "strictly inside"),
        ("method.steps=0,10", "at least 1 sampling step"),
        ("method.guidance=-1", "method.guidance=-1.0"),
        ("method.guidance=nan", "method.guidance=nan"),
        ("method.solver=rk4", "choose euler or heun"),
        ("train.log_every=0", "train.log_every=0 must be >= 1"),
        ("train.ckpt_every=-1", "train.ckpt_every and train.sample_every must be >= 0"),
        ("optim.lr=nan", "lr must be > 0"),
        ("optim.lr=inf", "lr must be > 0"),
        ("optim.betas=1.5,0.9", "optim.betas=(1.5, 0.9): give two values in [0, 1)"),
        ("optim.eps=0", "eps must be > 0 (got 0.0)"),
        ("optim.weight_decay=-1", "weight_decay >= 0 (got -1.0)"),
    ],
)
def test_sampling_and_logging_settings_are_validated_up_front(override: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        apply_overrides(get_preset("quickstart"), [override])
    assert message in str(info.value)


def test_three_stage_thresholds_must_increase() -> None:
    cfg = get_preset("quickstart")
    cfg.method.stages, cfg.method.steps, cfg.method.stage_probs = 3, (10, 10, 10), None
    cfg.method.thresholds = (0.8, 0.5)
    with pytest.raises(ValueError, match="increase"):
        validate(cfg)
    cfg.method.thresholds = (0.5, 0.8)
    validate(cfg)


def test_ckpt_every_zero_means_only_at_the_end() -> None:
    assert apply_overrides(get_preset("quickstart"), ["train.ckpt_every=0"]).train.ckpt_every == 0


def test_presets_train_each_method_with_its_measured_loss() -> None:
    from dfm.config import get_preset, with_method

    assert get_preset("quickstart").method.loss_weighting == "edm"  # DFM: EDM weighting (docs/RESULTS.md)
    assert get_preset("quickstart-fm").method.loss_weighting == "velocity"  # Flow Matching: the velocity MSE
    assert with_method(get_preset("fmnist-dfm"), "fm").method.loss_weighting == "velocity"
    assert get_preset("imagenet512-b").method.loss_weighting == "velocity"  # the paper's presets keep its loss
