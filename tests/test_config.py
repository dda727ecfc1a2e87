"""The run config: plain data at the bottom of the house, every setting checked with a message that names it before
any work, sampler settings in one place, and config files of the previous format read as they were meant."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dfm.config import FORMAT, RunConfig, SamplerConfig
from dfm.methods import get_method
from dfm.presets import get_preset, with_method
from dfm.resolve import apply_overrides, resolve

SRC = Path(__file__).parent.parent / "src" / "dfm"
FIXTURES = Path(__file__).parent / "fixtures" / "format1"


def test_the_config_is_a_leaf_that_imports_nothing_of_dfm() -> None:
    tree = ast.parse((SRC / "config.py").read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("dfm")], imported
    # and importing it loads no other module of dfm, nor torch (the package's names load on first use)
    code = "import sys, dfm.config; print(sorted(m for m in sys.modules if m.startswith(('dfm', 'torch'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['dfm', 'dfm.config']"


def test_model_overrides_take_the_type_of_their_ditconfig_field() -> None:
    cfg = apply_overrides(
        get_preset("quickstart"),
        ["model.overrides.use_stage_embedding=false", "model.overrides.depth=1", "model.overrides.mlp_ratio=2"],
    )
    assert cfg.model.overrides == {"use_stage_embedding": False, "depth": 1, "mlp_ratio": 2.0}
    model = get_method("dfm").network(cfg, (1, 32, 32), 10)
    assert model.config.use_stage_embedding is False and model.stage_embedder is None and model.config.depth == 1
    on = apply_overrides(get_preset("quickstart"), ["model.overrides.use_stage_embedding=true"])
    assert on.model.overrides["use_stage_embedding"] is True
    # The JSON round trip keeps them equal, so that a resumed run does not see "another config".
    assert RunConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.overrides.precondition=false", "unknown model setting model.overrides.precondition"),
        ("model.overrides.use_stage_embedding=maybe", "use true or false"),
        ("model.overrides.depth=1.5", "cannot parse model.overrides.depth='1.5' as int"),
        ("method.steps=15,5", "unknown setting method.steps (it is sampler.steps)"),
        ("train.solver=heun", "unknown setting train.solver (it is sampler.solver)"),
        ("method.cond_noise=0.1", "a setting of method cascade: method.options.cond_noise"),
    ],
)
def test_bad_settings_are_refused_with_where_they_are(override: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        apply_overrides(get_preset("quickstart"), [override])
    assert message in str(info.value)


@pytest.mark.parametrize("method", ["dfm", "cascade"])
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.overrides.head_border=edge"], "model.overrides.head_border='edge': choose one of crop, mirror"),
        (["model.overrides.hidden_size=100", "model.overrides.num_heads=3"],
         "model.overrides.hidden_size=100 is not divisible by model.overrides.num_heads=3"),
        (["model.overrides.hidden_size=102"], "model.overrides.hidden_size=102 is not divisible by num_heads=4"),
    ],
)  # fmt: skip
def test_a_bad_model_setting_is_named_as_the_user_typed_it(method: str, overrides: list[str], message: str) -> None:
    cfg = apply_overrides(with_method(get_preset("quickstart"), method), overrides)
    with pytest.raises(ValueError) as info:
        get_method(method).network(cfg, (1, 32, 32), 10)
    assert str(info.value) == message


def test_a_config_file_with_a_mistyped_model_setting_is_refused_when_resolved() -> None:
    data = get_preset("quickstart").to_dict()
    data["model"]["overrides"] = {"use_stage_embedding": "false"}
    with pytest.raises(ValueError, match="model.overrides.use_stage_embedding='false' must be of type bool"):
        resolve(RunConfig.from_dict(data))


@pytest.mark.parametrize(
    "override, message",
    [
        ("sampler.thresholds=1.5", "sampler.thresholds=1.5 must lie strictly inside (0, 1)"),
        ("sampler.thresholds=0", "strictly inside"),
        ("sampler.thresholds=0.5,0.7", "the model has 2 stage(s); give 1 threshold(s)"),
        ("sampler.steps=0,10", "every stage needs at least 1 step"),
        ("sampler.steps=30", "the model has 2 stage(s); give one step count per stage"),
        ("sampler.guidance=-1", "sampler.guidance=-1.0: scales must be finite and >= 0"),
        ("sampler.guidance=nan", "sampler.guidance=nan"),
        ("sampler.guidance=1,2,3", "give one scale, or one per stage"),
        ("sampler.solver=rk4", "choose euler or heun"),
        ("train.log_every=0", "train.log_every=0 must be >= 1"),
        ("train.ckpt_every=-1", "train.ckpt_every and train.sample_every must be >= 0"),
        ("optim.lr=nan", "optim.lr=nan must be a finite number > 0"),
        ("optim.lr=inf", "optim.lr=inf must be a finite number > 0"),
        ("optim.lr=1e39", "optim.lr=1e+39 is too large"),
        ("optim.lr=4e37", "overflows float32"),
        ("optim.betas=1.5,0.9", "optim.betas=1.5,0.9: give two values in [0, 1)"),
        ("optim.eps=0", "eps must be > 0 (got 0.0)"),
        ("optim.weight_decay=-1", "weight_decay >= 0 (got -1.0)"),
        ("data.pad=-2", "data.pad=-2 must be a whole number of pixels >= 0"),  # issue 24
        ("data.classes=,", "data.classes is empty: give the classes to train on"),
    ],
)
def test_settings_are_validated_up_front(override: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        apply_overrides(get_preset("quickstart"), [override])
    assert message in str(info.value)
    assert apply_overrides(get_preset("quickstart"), ["optim.lr=1e-3"]).optim.lr == 1e-3


def test_three_stage_thresholds_must_increase() -> None:
    cfg = get_preset("quickstart")
    cfg.method.stages, cfg.method.stage_probs, cfg.method.data_std = 3, None, None
    cfg.sampler.steps, cfg.sampler.thresholds = (10, 10, 10), (0.8, 0.5)
    with pytest.raises(ValueError, match="increase"):
        resolve(cfg)
    cfg.sampler.thresholds = (0.5, 0.8)
    resolve(cfg)


def test_the_sampler_settings_check_themselves_and_count_network_evaluations() -> None:
    heun = SamplerConfig(steps=(15, 5), thresholds=(0.7,), solver="heun")
    assert heun.validate(2) is heun
    assert (heun.network_evaluations(), heun.network_evaluations(grids=2)) == (39, 38)
    assert SamplerConfig(steps=(30, 10)).network_evaluations() == 40
    assert SamplerConfig(guidance=(1.5,)).stage_guidance(2) == [1.5, 1.5]
    with pytest.raises(ValueError, match="at least one stage"):
        SamplerConfig(steps=(), thresholds=()).validate(0)


def test_ckpt_every_zero_means_only_at_the_end() -> None:
    assert apply_overrides(get_preset("quickstart"), ["train.ckpt_every=0"]).train.ckpt_every == 0


def test_presets_train_each_method_with_its_measured_loss() -> None:
    assert get_preset("quickstart").method.loss_weighting == "edm"  # DFM: EDM weighting (docs/RESULTS.md)
    assert get_preset("quickstart-fm").method.loss_weighting == "velocity"  # Flow Matching: the velocity MSE
    assert with_method(get_preset("fmnist-dfm"), "fm").method.loss_weighting == "velocity"
    assert get_preset("imagenet512-b").method.loss_weighting == "velocity"  # the paper's presets keep its loss
    fm = get_preset("quickstart-fm")
    assert (fm.method.stages, fm.sampler.steps, fm.sampler.thresholds, fm.sampler.solver) == (1, (20,), (), "heun")
    # both predict the data (measured better for both on three kinds of data); the paper's presets keep the velocity
    assert get_preset("quickstart").method.prediction == fm.method.prediction == "data"
    assert get_preset("fmnist-fm").method.prediction == "data"
    assert get_preset("imagenet512-b").method.prediction == "velocity"
    assert with_method(get_preset("quickstart"), "pyramidal").method.prediction == "velocity"  # all it implements


@pytest.mark.parametrize("name", ["dfm", "fm", "cascade", "pyramidal", "dfm-haar-std-noema"])
def test_config_files_of_format_1_read_as_they_were_meant(name: str) -> None:
    """Format 1 (up to 2026-12-05) kept the sampler in the method section, named the method ``method.method`` and
    FLUX's distilled guidance ``model.guidance``."""
    data = json.loads((FIXTURES / name / "config.json").read_text())
    assert "format" not in data and "sampler" not in data
    cfg = resolve(RunConfig.from_dict(data))
    old = data["method"]
    assert cfg.method.name == old["method"] and cfg.method.data_std == tuple(old["data_std"])
    assert cfg.sampler.steps == tuple(old["steps"]) and cfg.sampler.solver == old["solver"]
    assert cfg.sampler.guidance == (old["guidance"],) and cfg.model.distilled_guidance == data["model"]["guidance"]
    again = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and cfg.to_dict()["format"] == FORMAT


def test_a_config_written_by_hand_without_a_format_keeps_its_sampler_section() -> None:
    """No ``format`` key: format 1's layout (sampler settings in the method section) is read as format 1, today's
    (a sampler section, as a user writes it for ``dfm train --config``) as today's, not emptied."""
    cfg = RunConfig.from_dict(
        {"method": {"name": "dfm", "stages": 2}, "sampler": {"steps": [20, 10], "solver": "heun"}}
    )
    assert (cfg.sampler.steps, cfg.sampler.solver) == ((20, 10), "heun")
    old = RunConfig.from_dict({"method": {"method": "dfm", "steps": [12, 4]}})  # format 1's layout, by hand
    assert (old.method.name, old.sampler.steps) == ("dfm", (12, 4))
    with pytest.raises(ValueError, match=r"unknown keys \['steps'\] in config section 'method'"):
        RunConfig.from_dict({"method": {"name": "dfm", "steps": [12, 4]}, "sampler": {"solver": "heun"}})


def test_a_baselines_twin_keeps_dfms_stages_and_splits_the_steps_equally() -> None:
    """Pyramidal Flow's twin of a three-stage DFM config has three stages and DFM's steps in equal parts (the later
    stages one more where they do not divide); the cascade has two stages and says so; one stage is refused."""
    dfm3 = ["method.stages=3", "method.stage_probs=0.4,0.3,0.3", "sampler.steps=10,5,5", "sampler.thresholds=0.7,0.85"]
    three = apply_overrides(get_preset("quickstart"), dfm3)
    pyr = with_method(three, "pyramidal")
    assert (pyr.method.stages, pyr.sampler.steps, pyr.method.stage_probs) == (3, (6, 7, 7), None)
    assert with_method(apply_overrides(three, ["sampler.steps=8,8,8"]), "pyramidal").sampler.steps == (8, 8, 8)
    assert with_method(get_preset("quickstart"), "pyramidal").sampler.steps == (10, 10)  # 15 + 5
    with pytest.raises(ValueError, match="method cascade has two stages .*: set method.stages=2"):
        with_method(three, "cascade")
    one = apply_overrides(get_preset("quickstart"), ["method.stages=1", "method.stage_probs=1", "sampler.steps=20",
                                                     "sampler.thresholds="])  # fmt: skip
    with pytest.raises(ValueError, match="DFM configs of two or more stages; this one has 1"):
        with_method(one, "pyramidal")


def test_thresholds_are_asked_of_the_methods_that_use_them_with_an_example_for_the_stage_count(tmp_path) -> None:
    """A three-stage Pyramidal Flow trains with the preset's sampler.thresholds (one value), which it does not use;
    a three-stage DFM must be given two, and the error's example has two."""
    three = ["method.stages=3", "method.stage_probs=none", "sampler.steps=4,4,4"]
    pyr = apply_overrides(with_method(get_preset("quickstart"), "pyramidal"), three[::2])  # as `dfm train --method`
    assert (pyr.method.stages, len(pyr.sampler.thresholds)) == (3, 1)
    pyr.save(tmp_path / "config.json")
    assert RunConfig.load(tmp_path / "config.json").method.stages == 3
    with pytest.raises(ValueError, match=r"give 2 threshold\(s\), one per stage jump, e.g. 0.7,0.85$"):
        apply_overrides(get_preset("quickstart"), three)
    with pytest.raises(ValueError, match=r"e.g. 0.6,0.75,0.85$"):
        SamplerConfig(steps=(2, 2, 2, 2), thresholds=(0.5, 0.4, 0.9)).validate(4)
    assert SamplerConfig(steps=(2, 2, 2, 2), thresholds=()).validate(4, thresholds=False).steps == (2, 2, 2, 2)


@pytest.mark.parametrize("name", ["cascade", "pyramidal"])
def test_the_two_stage_baselines_refuse_stage_probs_and_their_old_configs_drop_it(name: str) -> None:
    """Neither baseline draws a main stage: method.stage_probs is refused, not ignored; configs of format 2 (saved
    with the DFM config's stage_probs, unused) still load, without it, and equal a fresh twin's."""
    cfg = with_method(get_preset("quickstart"), name)
    assert get_preset("quickstart").method.stage_probs is not None and cfg.method.stage_probs is None
    with pytest.raises(ValueError, match="remove method.stage_probs|instead of method.stage_probs") as err:
        apply_overrides(cfg, ["method.stage_probs=0.5,0.5"])
    assert ("method.options.shares" in str(err.value)) == (name == "pyramidal")
    old = cfg.to_dict()
    old["format"] = 2
    old["method"]["stage_probs"] = [0.5, 0.5]
    assert resolve(RunConfig.from_dict(old)) == cfg
    new = {**old, "format": FORMAT}
    with pytest.raises(ValueError, match="stage_probs"):
        resolve(RunConfig.from_dict(new))
    dfm = get_preset("quickstart").to_dict()  # DFM's own stage_probs are kept from every format
    dfm["format"] = 2
    assert RunConfig.from_dict(dfm).method.stage_probs == get_preset("quickstart").method.stage_probs
    with pytest.raises(ValueError, match="config format 99 is not one this version reads .*update dfm"):
        RunConfig.from_dict({**dfm, "format": 99})


def test_image_folder_settings_are_plain_data_that_round_trip() -> None:
    cfg = apply_overrides(get_preset("quickstart"), ["data.pad=2", "data.upscale=true"])
    assert (cfg.data.pad, cfg.data.upscale) == (2, True)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    older = get_preset("quickstart").to_dict()  # a config.json written before these settings: their defaults
    del older["data"]["pad"], older["data"]["upscale"]
    assert (RunConfig.from_dict(older).data.pad, RunConfig.from_dict(older).data.upscale) == (0, False)
