"""Fine-tuning a pretrained one-stage model as a DFM: exact conversion, the trainer path, `dfm finetune`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dfm.cli import main as cli
from dfm.config import RunConfig
from dfm.data import build_dataset
from dfm.data.subset import ClassSubset
from dfm.finetune import convert_one_stage, finetune_config, load_source
from dfm.models import DFMDiT, DiTConfig, Preconditioned
from dfm.models.surgery import lift_patch_embedding, pool_head
from dfm.presets import get_preset, with_method
from dfm.resolve import apply_overrides
from dfm.run import Run
from dfm.training import Trainer, TrainingError
from helpers import TINY_RUN, needs_data

TINY = TINY_RUN


def _pretrained(patch: int = 4, size: int = 16) -> DFMDiT:
    torch.manual_seed(0)
    model = DFMDiT(DiTConfig(input_size=(size, size), in_channels=2, patch_size=patch, hidden_size=32, depth=2,
                             num_heads=2, num_classes=3, stage_factors=(1,)))  # fmt: skip
    for p in model.parameters():  # a "trained" model: no zero-initialised part left
        p.data.normal_(0, 0.1)
    return model


def test_lifted_embedding_and_pooled_head_are_nearest_lift_and_average_pool():
    x = torch.randn(3, 2, 4, 4)  # a coarse level; its 2x nearest lift is 8x8
    weight = torch.randn(5, 2 * 4 * 4)  # a patch-4 embedding of the lifted level
    lifted = F.interpolate(x, scale_factor=2, mode="nearest")
    from dfm.models.layers import patchify, unpatchify

    direct = patchify(lifted, 4) @ weight.T
    torch.testing.assert_close(patchify(x, 2) @ lift_patch_embedding(weight, 2, 4, 2).T, direct, rtol=1e-5, atol=1e-5)
    head = torch.randn(2 * 4 * 4, 5)
    tokens = torch.randn(3, 4, 5)
    full = unpatchify(tokens @ head.T, (8, 8), 2, 4)
    coarse = unpatchify(tokens @ pool_head(head, 2, 4, 2).T, (4, 4), 2, 2)
    torch.testing.assert_close(coarse, F.avg_pool2d(full, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precondition", [False, True])
@pytest.mark.parametrize("factors", [(2, 1), (4, 1), (4, 2, 1)])
def test_converted_model_is_the_pretrained_model_at_init(precondition, factors):
    """Also preconditioned (the coarse stage keeping the pretrained std): the velocities are the pretrained one's."""
    source, model = _pretrained(), None
    model = convert_one_stage(source, factors)
    std = (0.6, *[0.2] * (len(factors) - 1))
    if precondition:
        source, model = Preconditioned(source, std[:1]), Preconditioned(model, std)
    b, f0 = 4, factors[0]
    levels = [torch.randn(b, 2, 16 // f, 16 // f) for f in factors]
    t, y = torch.rand(b, len(factors)), torch.tensor([0, 1, 2, 3])
    for main in range(len(factors)):
        out = model(levels, t, y, torch.full((b,), main))
        lifted = F.interpolate(levels[0], scale_factor=f0, mode="nearest")
        reference = F.avg_pool2d(source([lifted], t[:, :1], y)[0], f0)
        torch.testing.assert_close(out[0], reference, rtol=1e-5, atol=1e-6)
        for s in range(1, len(factors)):  # new stages: the network adds nothing (preconditioning: the skip term)
            skip = precondition
            expected = torch.zeros_like(levels[s]) if not skip or s > main else out[s]
            torch.testing.assert_close(out[s], expected, rtol=0, atol=0)
            if skip and s <= main:
                from dfm.models.precondition import flow_preconditioning

                c_skip = flow_preconditioning(t[:, s], std[s])[1].view(-1, 1, 1, 1)
                torch.testing.assert_close(out[s], c_skip * levels[s], rtol=1e-6, atol=1e-6)


def test_gradients_reach_the_new_stage():
    model = convert_one_stage(_pretrained(), (2, 1))
    levels = [torch.randn(4, 2, 8, 8), torch.randn(4, 2, 16, 16)]
    out = model(levels, torch.rand(4, 2), torch.tensor([0, 1, 2, 0]), torch.ones(4, dtype=torch.long))
    (sum(o.square().mean() for o in out) + out[1].sum()).backward()
    for name in ("x_embedders.1.weight", "t_embedders.1.mlp.2.weight", "final_layers.1.linear.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_conversion_refuses_what_it_cannot_make_exact():
    with pytest.raises(ValueError, match="not divisible by the resolution factor 8"):
        convert_one_stage(_pretrained(), (8, 1))
    with pytest.raises(ValueError, match="starts from one stage"):
        convert_one_stage(convert_one_stage(_pretrained(), (2, 1)), (2, 1))
    fm = with_method(get_preset("quickstart"), "fm")
    fm.method.data_std = (0.6,)
    cfg = finetune_config(fm, "dfm")
    cfg.method.data_std, cfg.train.init_from = (0.5, 0.2), "runs/fm"
    source = DFMDiT(DiTConfig(input_size=(32, 32), in_channels=1, patch_size=4, hidden_size=32, depth=1, num_heads=2,
                              num_classes=10, stage_factors=(1,)))  # fmt: skip
    target = convert_one_stage(source, (2, 1))
    with pytest.raises(ValueError, match="train.init_from=runs/fm: the coarsest stage's data std 0.5 must be the "
                       "pretrained model's 0.6"):  # fmt: skip
        load_source(target, source, fm, cfg)
    cfg.method.prediction = "data" if fm.method.prediction == "velocity" else "velocity"
    with pytest.raises(ValueError, match=f"was trained with prediction={fm.method.prediction}: set -o method.predic"):
        load_source(target, source, fm, cfg)
    cfg.method.precondition = False
    with pytest.raises(ValueError, match="set -o method.precondition=true"):
        load_source(target, source, fm, cfg)


def test_finetune_config_and_its_errors():
    fm = with_method(get_preset("quickstart"), "fm")
    cfg = finetune_config(fm, "dfm", steps=400)
    assert cfg.method.name == "dfm" and cfg.method.stages == 2
    like = get_preset("quickstart").sampler
    assert (cfg.sampler.steps, cfg.sampler.solver) == (like.steps, like.solver) == ((15, 5), "heun")
    assert cfg.optim.lr == pytest.approx(fm.optim.lr / 10) and cfg.optim.warmup_steps == 40
    assert cfg.method.precondition == fm.method.precondition and cfg.method.data_std is None
    for prediction in ("velocity", "data"):  # the source's prediction target, whatever the preset's
        source = apply_overrides(fm, [f"method.prediction={prediction}"])
        assert finetune_config(source, "dfm").method.prediction == prediction
    assert finetune_config(fm, "fm").method.stages == 1
    with pytest.raises(ValueError, match="already has stages"):
        finetune_config(get_preset("quickstart"), "dfm")
    with pytest.raises(ValueError, match="choose dfm .* or fm"):
        finetune_config(fm, "cascade")


@needs_data
def test_class_subset_keeps_only_those_classes_and_their_labels():
    base = build_dataset("fashion-mnist", 32)
    subset = ClassSubset(base, (5, 9))
    assert len(subset) == 12000 and set(subset.labels.tolist()) == {5, 9}
    x, y = subset.get_batch(torch.arange(0, 12000, 997), augment=False)
    assert set(y.tolist()) <= {5, 9} and x.shape[1:] == (1, 32, 32) and subset.num_classes == 10
    with pytest.raises(ValueError, match=r"data.classes=\(5, 12\)"):
        ClassSubset(base, (5, 12))


@needs_data
def test_dfm_finetune_end_to_end(tmp_path, capsys):
    fm_run = tmp_path / "fm"
    assert cli(["train", "--method", "fm", "--out", str(fm_run), "--steps", "3", "--batch-size", "4",
                "--no-progress", *TINY, "-o", "data.classes=0,1,2,3,4"]) == 0  # fmt: skip
    out = tmp_path / "ft"
    args = ["finetune", "--from", str(fm_run), "--out", str(out), "--steps", "2", "--batch-size", "4",
            "--classes", "5,6,7,8,9", "--no-progress", "-o", "train.threads=1", "-o", "train.num_sample_images=2",
            "-o", "sampler.steps=2,2"]  # fmt: skip
    assert cli(args) == 0
    cfg = RunConfig.load(out / "config.json")
    source_run = Run.open(fm_run)
    source, source_cfg = source_run.load_network(), source_run.config
    assert cfg.train.init_from == str(fm_run) and cfg.data.classes == (5, 6, 7, 8, 9)
    assert cfg.method.name == "dfm" and cfg.method.precondition == source_cfg.method.precondition
    assert cfg.method.data_std[0] == source_cfg.method.data_std[0]
    assert cfg.optim.lr == pytest.approx(source_cfg.optim.lr / 10)
    # At step 0 the trainer's model is the pretrained one, converted: same as converting by hand.
    cfg0 = apply_overrides(cfg, ["train.steps=1"])
    trainer = Trainer(cfg0, tmp_path / "ft0", progress=False)
    expected = convert_one_stage(source, (2, 1))
    for k, v in expected.state_dict().items():  # the new stage's first time layer is random and does not matter
        if not k.startswith("t_embedders.1.mlp.0"):
            torch.testing.assert_close(trainer.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    levels, t = [torch.randn(3, 1, 16, 16), torch.randn(3, 1, 32, 32)], torch.rand(3, 2)
    for main in (0, 1):
        stage = torch.full((3,), main)
        got, want = (
            trainer.model(levels, t, torch.tensor([5, 6, 7]), stage),
            expected(levels, t, torch.tensor([5, 6, 7]), stage),
        )
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Resuming does not convert again: it continues from its own checkpoint.
    assert cli([*args[:5], "--steps", "3", *args[7:], "--resume", "auto"]) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    assert cli(["sample", str(out), "--seeds", "0-1", "--classes", "5", "--steps", "2,2"]) == 0


@needs_data
def test_plain_finetune_starts_from_the_same_weights_and_refuses_mismatches(tmp_path):
    fm_run = tmp_path / "fm"
    assert cli(["train", "--method", "fm", "--out", str(fm_run), "--steps", "2", "--batch-size", "4",
                "--no-progress", *TINY]) == 0  # fmt: skip
    source_run = Run.open(fm_run)
    source, source_cfg = source_run.load_network(), source_run.config
    cfg = apply_overrides(finetune_config(source_cfg, "fm", steps=1), [f"train.init_from={fm_run}"])
    trainer = Trainer(cfg, tmp_path / "ft", progress=False)
    for k, v in source.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[k], v, rtol=0, atol=0)
    off = apply_overrides(cfg, ["method.precondition=false", "method.prediction=velocity"])
    with pytest.raises(TrainingError, match="set -o method.precondition=true"):
        Trainer(off, tmp_path / "ft2", progress=False)
    bigger = apply_overrides(cfg, ["model.overrides.hidden_size=64"])
    with pytest.raises(TrainingError, match="differs from this run's model"):
        Trainer(bigger, tmp_path / "ft3", progress=False)
    assert cli(["finetune", "--from", str(tmp_path / "nothing"), "--steps", "1"]) == 2
    pretrained = ["finetune", "--from", str(fm_run / "pretrained"), "--method", "fm", "--steps", "1", "--out",
                  str(tmp_path / "ft4"), "--batch-size", "4", "--no-progress", "-o", "train.threads=1"]  # fmt: skip
    assert cli(pretrained) == 0
    assert RunConfig.load(tmp_path / "ft4" / "config.json").train.init_from == str(fm_run / "pretrained")


# ---------------------------------------------------------------------------------------------- issue 24
def test_like_preset_must_be_for_the_source_kind_of_data():
    image_fm, video_fm = (with_method(get_preset(name), "fm") for name in ("quickstart", "video-quickstart"))
    with pytest.raises(ValueError, match="--like video-quickstart: a preset for videos, but the pretrained model is "
                       "an image model; choose a DFM preset for images: quickstart"):  # fmt: skip
        finetune_config(image_fm, "dfm", like="video-quickstart")
    with pytest.raises(ValueError, match="--like quickstart: a preset for images, .* video model"):
        finetune_config(video_fm, "dfm", like="quickstart")
    assert finetune_config(video_fm, "dfm", like="video-quickstart").method.standardize
    with pytest.raises(ValueError, match="a preset for images"):  # what the source generates decides, if known
        finetune_config(image_fm, "dfm", like="quickstart", source_video=True)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@needs_data
def test_finetune_refuses_what_it_cannot_do_and_resumes_without_its_source(tmp_path, capsys):
    import shutil

    fm_run = tmp_path / "fm"
    assert cli(["train", "--method", "fm", "--out", str(fm_run), "--steps", "2", "--batch-size", "4",
                "--no-progress", *TINY]) == 0  # fmt: skip
    out = tmp_path / "ft"
    args = ["finetune", "--from", str(fm_run), "--out", str(out), "--batch-size", "4", "--no-progress",
            "-o", "train.threads=1", "-o", "train.num_sample_images=2", "-o", "sampler.steps=2,2"]  # fmt: skip
    capsys.readouterr()
    for flags, message in [
        (["--classes", ""], "--classes '': give the classes to train on"),
        (["--classes", ","], "--classes ',': give the classes to train on"),
        (["-o", "data.classes=,"], "data.classes is empty"),
        (["--like", "video-quickstart"], "--like video-quickstart: a preset for videos"),
    ]:
        assert cli([*args, "--steps", "1", *flags]) == 2, flags
        assert message in _one_line(capsys)
        assert not out.exists()  # refused before anything was written
    assert cli([*args, "--steps", "1", "--classes", "5,6"]) == 0
    shutil.rmtree(fm_run)  # the source is gone: the run's own config.json and checkpoint hold all it needs
    capsys.readouterr()
    assert cli([*args, "--steps", "2", "--classes", "5,6", "--resume", "auto"]) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    cfg = RunConfig.load(out / "config.json")
    assert cfg.train.steps == 2 and cfg.data.classes == (5, 6) and cfg.train.init_from == str(fm_run)
    capsys.readouterr()
    assert cli([*args, "--steps", "3", "--classes", "5,6,7", "--resume", "auto"]) == 2  # still checked against it
    assert "another config" in _one_line(capsys)
    assert cli([*args, "--steps", "3"]) == 2  # not resuming: the source is needed, and named
    assert f"--from {fm_run}" in _one_line(capsys)
