"""End-to-end training, checkpoints, exact resume, DDP equivalence and the errors users can cause."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfm.checkpoint import find_latest, list_checkpoints, load_checkpoint, save_checkpoint
from dfm.cli import main as cli
from dfm.config import RunConfig
from dfm.generate import Generator
from helpers import FMNIST, needs_data

# A tiny model and short schedules: every run below takes a few seconds on 2 CPU cores.
TINY = [
    "-o", "model.overrides.depth=1", "-o", "model.overrides.hidden_size=32", "-o", "model.overrides.num_heads=2",
    "-o", "train.precision=fp32", "-o", "train.log_every=1", "-o", "train.num_sample_images=4",
    "-o", "sampler.steps=2,2", "-o", "optim.warmup_steps=2", "-o", "train.threads=1",
]  # fmt: skip


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train(run: Path, steps: int, *extra: str) -> int:
    return cli(["train", "--out", str(run), "--steps", str(steps), "--batch-size", "8", "--no-progress", *TINY, *extra])


@needs_data
def test_train_checkpoint_resume_sample(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert _train(run, 4, "-o", "train.ckpt_every=2", "-o", "train.keep_last=1") == 0
    cfg = RunConfig.load(run / "config.json")
    assert cfg.train.steps == 4 and cfg.model.overrides["depth"] == 1
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000004"]  # keep_last=1
    assert (run / "samples" / "step_00000004.png").is_file()
    assert (run / "samples" / "progression_00000004.png").is_file()
    assert (run / "loss.png").is_file() and (run / "pretrained" / "model.safetensors").is_file()
    assert len(_losses(run)) == 4

    # Resume to 6 steps: continues from step 4.
    assert _train(run, 6, "-o", "train.ckpt_every=2", "--resume", "auto") == 0
    assert find_latest(run / "checkpoints").name == "step_00000006"
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))
    state = load_checkpoint(find_latest(run / "checkpoints"))["state"]
    assert state["step"] == 6

    # Sample from the run: grid, PNGs, npz, progression.
    out = tmp_path / "samples"
    code = cli(["sample", str(run), "--seeds", "0-5", "--out", str(out), "--png", "--npz", "--steps", "2,2"])
    assert code == 0
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (6, 28, 28, 1) and npz["arr_0"].dtype == np.uint8  # padding dropped
    assert npz["labels"].tolist() == [0, 1, 2, 3, 4, 5] and npz["seeds"].tolist() == list(range(6))
    assert len(list((out / "images").glob("*.png"))) == 6
    assert Image.open(out / "progression.png").size[0] > Image.open(out / "images" / "seed000000_class0.png").size[0]
    assert (out / "progression.gif").is_file()
    settings = json.loads((out / "sampling.json").read_text())
    assert settings["steps"] == [2, 2] and settings["count"] == 6
    assert settings["checkpoint"] == str(run / "checkpoints" / "step_00000006")  # which weights made them

    # The same seed gives the same image whatever the batch it is drawn in.
    out2 = tmp_path / "samples2"
    assert cli(["sample", str(run), "--seeds", "3-4", "--out", str(out2), "--npz", "--steps", "2,2",
                "--batch-size", "1"]) == 0  # fmt: skip
    # Float reductions depend on the batch shape: equal to rounding, so at most one uint8 level apart.
    diff = np.abs(np.load(out2 / "samples.npz")["arr_0"].astype(int) - npz["arr_0"][3:5].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01

    # The pretrained directory samples too.
    assert cli(["sample", str(run / "pretrained"), "--seeds", "0-1", "--out", str(tmp_path / "s3")]) == 0
    assert json.loads((tmp_path / "s3" / "sampling.json").read_text())["checkpoint"] is None
    ckpt = list_checkpoints(run / "checkpoints")[0]
    assert cli(["sample", str(run), "--seeds", "0-1", "--checkpoint", str(ckpt), "--out", str(tmp_path / "s4")]) == 0
    assert json.loads((tmp_path / "s4" / "sampling.json").read_text())["checkpoint"] == str(ckpt)


@needs_data
def test_flow_matching_method_uses_one_stage(tmp_path: Path) -> None:
    run = tmp_path / "fm"
    assert _train(run, 2, "--method", "fm", "-o", "sampler.steps=4") == 0
    cfg = RunConfig.load(run / "config.json")
    assert cfg.method.name == "fm" and cfg.method.stages == 1
    ck = load_checkpoint(find_latest(run / "checkpoints"))
    assert not any("stage_embed" in k for k in ck["model"])  # one stage: no stage-index embedding


def _train_cmd(run: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dfm", "train", "--out", str(run), "--steps", str(steps), "--batch-size", "8",
            "--no-progress", *TINY, *extra]  # fmt: skip


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` on CPU; on failure, show what the ranks printed, not torchrun's traceback."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        ranks = [ln for ln in res.stderr.splitlines() if "torch/distributed/elastic" not in ln and ln.strip()]
        pytest.fail(f"torchrun exited {res.returncode}:\n" + "\n".join(ranks[:80]), pytrace=False)
    return res


@needs_data
def test_sigkill_and_resume_is_bitwise_identical(tmp_path: Path) -> None:
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    common = ["-o", "train.ckpt_every=3", "-o", "train.sample_every=0"]
    steps = 40  # long enough that the kill, right after the first checkpoint, lands mid-run
    subprocess.run(_train_cmd(ref, steps, *common), check=True, capture_output=True)
    proc = subprocess.Popen(_train_cmd(killed, steps, *common), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if find_latest(killed / "checkpoints") is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = find_latest(killed / "checkpoints")
    assert first is not None, "no checkpoint was written before the kill"
    assert load_checkpoint(first)["state"]["step"] < steps, "the run finished before it could be killed"
    subprocess.run(_train_cmd(killed, steps, *common, "--resume", "auto"), check=True, capture_output=True)
    assert _losses(killed) == _losses(ref)  # bitwise: same floats
    a = load_checkpoint(find_latest(ref / "checkpoints"))
    b = load_checkpoint(find_latest(killed / "checkpoints"))
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key


@needs_data
def test_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_train_cmd(one, 3), check=True, capture_output=True)
    _torchrun(_train_cmd(two, 3)[1:])
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
    a = load_checkpoint(find_latest(one / "checkpoints"))["model"]
    b = load_checkpoint(find_latest(two / "checkpoints"))["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "args, message",
    [
        (["-o", "train.steps=abc"], "cannot parse train.steps"),
        (["-o", "nope.x=1"], "unknown config section"),
        (["-o", "method.stage_probs=0.5,0.6"], "sum to 1"),
        (["-o", "sampler.thresholds=0.9,0.5"], "thresholds"),
        (["--data", "/nonexistent/folder"], "neither a built-in"),
        (["-o", "train.batch_size=7", "-o", "train.grad_accum=2"], "divisible"),
        # issue 11: sampling settings are checked before the first step, not at the first samples after training
        (["-o", "sampler.thresholds=1.5"], "sampler.thresholds=1.5 must lie strictly inside (0, 1)"),
        (["-o", "sampler.steps=0,10"], "sampler.steps=0,10: every stage needs at least 1 step"),
        (["-o", "train.log_every=0"], "train.log_every=0 must be >= 1"),
        (["-o", "model.overrides.use_stage_embedding=maybe"], "use true or false"),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    code = cli(["train", "--out", str(tmp_path / "r"), "--steps", "1", "--no-progress", *TINY, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # found before any training


def test_empty_image_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "imgs").mkdir()
    code = cli(["train", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "imgs"), "--no-progress", *TINY])
    assert code == 2 and "error" in capsys.readouterr().err


def test_corrupt_image_in_folder(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "imgs" / "cat"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "ok.png")
    (folder / "broken.png").write_bytes(b"not a png")
    code = cli(["train", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "imgs"), "--steps", "2",
                "--batch-size", "2", "--no-progress", *TINY])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "broken.png" in err


@needs_data
def test_sampling_does_not_need_the_training_data(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for cls in ("a", "b", "c"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(folder / cls / f"{i}.png")
    run = tmp_path / "run"
    assert _train(run, 2, "--data", str(folder), "-o", "data.resolution=16", "-o", "model.overrides.patch_size=2") == 0
    spec = json.loads((run / "data_spec.json").read_text())
    assert spec == {"sample_shape": [3, 16, 16], "num_classes": 3, "padding": 0}
    shutil.rmtree(folder)  # the shape and the classes come from the run, not from the images
    assert cli(["sample", str(run), "--seeds", "0-3", "--out", str(tmp_path / "s"), "--npz"]) == 0
    data = np.load(tmp_path / "s" / "samples.npz")
    assert data["arr_0"].shape == (4, 16, 16, 3) and data["labels"].tolist() == [0, 1, 2, 0]


def test_existing_run_and_mismatched_checkpoint(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert _train(run, 2) == 0
    capsys.readouterr()
    assert _train(run, 3) == 2  # no --resume on a run with checkpoints
    assert "--resume auto" in capsys.readouterr().err
    assert _train(run, 3, "--resume", "auto", "-o", "model.overrides.depth=2") == 2
    assert "another config" in capsys.readouterr().err
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert before == ["latest", "step_00000002"]  # nothing lost or half-written


@needs_data
def test_diverging_loss_stops_with_a_clear_error(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    code = _train(run, 30, "--lr", "1e30", "-o", "optim.grad_clip=0", "-o", "train.ckpt_every=1")
    err = capsys.readouterr().err
    assert code == 2 and "the loss became" in err
    latest = find_latest(run / "checkpoints")
    assert latest is None or load_checkpoint(latest)["state"]["step"] >= 1  # last good checkpoint is complete


@needs_data
def test_fsdp2_matches_one_process_and_resumes(tmp_path: Path) -> None:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    one, two = tmp_path / "one", tmp_path / "fsdp"
    subprocess.run(_train_cmd(one, 4), check=True, capture_output=True)
    fsdp = ["-o", "train.distributed=fsdp", "-o", "train.ckpt_every=2"]
    _torchrun(_train_cmd(two, 2, *fsdp)[1:])
    _torchrun(_train_cmd(two, 4, *fsdp, "--resume", "auto")[1:])
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
    a = load_checkpoint(find_latest(one / "checkpoints"))
    b = load_checkpoint(find_latest(two / "checkpoints"))
    for part in ("model", "ema"):
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=1e-4, atol=1e-6)


@needs_data
@pytest.mark.parametrize("method", ["cascade", "pyramidal"])
def test_baselines_train_resume_and_sample(tmp_path: Path, method: str, capsys) -> None:
    run = tmp_path / method
    assert _train(run, 3, "--method", method, "-o", "train.ckpt_every=3") == 0
    assert _train(run, 5, "--method", method, "--resume", "auto") == 0
    cfg = RunConfig.load(run / "config.json")
    assert cfg.method.name == method and cfg.sampler.steps == (2, 2)
    if method == "cascade":
        assert cfg.method.options["switch_step"] == 2  # round(0.8 * 3) of the first run, kept when extended
    out = tmp_path / "s"
    assert cli(["sample", str(run), "--seeds", "0-3", "--out", str(out), "--npz"]) == 0
    assert np.load(out / "samples.npz")["arr_0"].shape == (4, 28, 28, 1)
    # thresholds do not apply to these methods: other values are refused, not silently ignored
    assert cli(["sample", str(run), "--seeds", "0", "--thresholds", "0.5", "--out", str(tmp_path / "t")]) == 2
    assert "does not use them" in capsys.readouterr().err and not (tmp_path / "t").exists()
    own = list(cfg.sampler.thresholds)  # the run's own, as the web page sends them: accepted
    assert Generator.from_run(run).settings(thresholds=own).thresholds == cfg.sampler.thresholds


def test_latent_space_prepare_train_sample_decodes(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32,
    )  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / cls / f"{i}.png"
            )
    assert cli(["prepare", "--data", str(tmp_path / "imgs"), "--vae", str(tmp_path / "vae"), "--out",
                str(tmp_path / "lat"), "--resolution", "32", "--batch-size", "4"]) == 0  # fmt: skip
    run = tmp_path / "run"
    assert _train(run, 2, "--data", str(tmp_path / "lat"), "-o", "data.resolution=none",
                  "-o", "model.overrides.patch_size=2") == 0  # fmt: skip
    out = tmp_path / "s"
    assert cli(["sample", str(run), "--seeds", "0-2", "--out", str(out), "--npz"]) == 0
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (3, 32, 32, 3)  # latents (4, 16, 16) decoded back to 32x32 RGB
    assert np.load(out / "samples.npz")["labels"].tolist() == [0, 1, 0]


@needs_data
def test_gradient_accumulation_matches_the_full_batch(tmp_path: Path) -> None:
    full, accum = tmp_path / "full", tmp_path / "accum"
    assert _train(full, 3) == 0
    assert _train(accum, 3, "-o", "train.grad_accum=2") == 0
    np.testing.assert_allclose(_losses(accum), _losses(full), rtol=1e-5)
    a = load_checkpoint(find_latest(full / "checkpoints"))["model"]
    b = load_checkpoint(find_latest(accum / "checkpoints"))["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


@needs_data
def test_two_process_sampling_gives_the_same_images(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _train(run, 2) == 0
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli(["sample", str(run), "--seeds", "0-4", "--out", str(one), "--npz", "--no-progression"]) == 0
    _torchrun(["-m", "dfm", "sample", str(run), "--seeds", "0-4", "--out", str(two), "--npz", "--no-progression"])
    a, b = np.load(one / "samples.npz"), np.load(two / "samples.npz")
    np.testing.assert_array_equal(a["seeds"], b["seeds"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1  # same images (rounding aside)


@needs_data
def test_random_flips_are_seeded_per_step_so_resume_is_exact(tmp_path: Path) -> None:
    flip = ["-o", "data.random_flip=true", "-o", "train.ckpt_every=2"]
    ref, resumed, plain = tmp_path / "ref", tmp_path / "resumed", tmp_path / "plain"
    assert _train(ref, 4, *flip) == 0
    assert _train(resumed, 2, *flip) == 0
    assert _train(resumed, 4, *flip, "--resume", "auto") == 0
    assert _losses(resumed) == _losses(ref)
    assert _train(plain, 4, "-o", "train.ckpt_every=2") == 0
    assert _losses(plain) != _losses(ref)  # the flips did change the batches


# ---------------------------------------------------------------------------------------------- issue 11
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 2-step run; tests that change it work on a copy."""
    if not FMNIST.exists() and not os.environ.get("DFM_DATA_DIR"):
        pytest.skip("Fashion-MNIST not installed")
    run = tmp_path_factory.mktemp("tiny") / "run"
    assert _train(run, 2) == 0
    return run


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@needs_data
def test_diverging_run_never_checkpoints_non_finite_weights(tmp_path: Path, capsys) -> None:
    # The report's run: the weights turned inf at step 3 but only the loss was checked, at step 4.
    run = tmp_path / "run"
    code = cli(["train", "--out", str(run), "--steps", "40", "--batch-size", "16", "--no-progress", *TINY,
                "-o", "optim.lr=1e6", "-o", "optim.warmup_steps=0", "-o", "train.ckpt_every=1"])  # fmt: skip
    assert code == 2 and "became" in _one_line(capsys)
    for ck in list_checkpoints(run / "checkpoints"):
        state = load_checkpoint(ck)
        for part in ("model", "ema"):
            assert all(torch.isfinite(v).all() for v in state[part].values()), (ck, part)


@needs_data
def test_weights_are_checked_before_saving_and_sampling(tmp_path: Path, capsys, monkeypatch) -> None:
    from safetensors.torch import load_file, save_file

    import dfm.training.trainer

    real, calls = dfm.training.trainer.update_ema, []

    def poisoned(ema, model, decay):  # the EMA of step 3 turns NaN while loss and gradients stay finite
        real(ema, model, decay)
        calls.append(1)
        if len(calls) >= 3:
            next(ema.parameters()).data.fill_(float("nan"))

    monkeypatch.setattr(dfm.training.trainer, "update_ema", poisoned)
    run = tmp_path / "run"
    assert _train(run, 5, "-o", "train.ckpt_every=1", "-o", "train.keep_last=1") == 2
    assert "the weights became inf or NaN by step 3" in _one_line(capsys)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000002"]  # the good one is kept
    # `dfm sample` refuses weights that are not finite (a checkpoint written by an older version).
    ema_file = find_latest(run / "checkpoints") / "ema.safetensors"
    weights = load_file(ema_file)
    save_file({k: v.fill_(float("inf")) for k, v in weights.items()}, ema_file)
    assert cli(["sample", str(run), "--seeds", "0-1", "--out", str(tmp_path / "s"), "--steps", "2,2"]) == 2
    err = _one_line(capsys)
    assert "inf or NaN" in err and str(ema_file) in err


@needs_data
def test_resume_may_change_the_sampling_settings(tmp_path: Path, capsys, tiny_run: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert _train(run, 3, "--resume", "auto", "-o", "sampler.steps=3,1", "-o", "sampler.thresholds=0.8") == 0
    err = capsys.readouterr().err
    assert "sampling settings changed on resume" in err and "sampler.steps" in err and "sampler.thresholds" in err
    cfg = RunConfig.load(run / "config.json")
    assert cfg.sampler.steps == (3, 1) and cfg.sampler.thresholds == (0.8,)


@needs_data
def test_torn_last_metrics_line_does_not_block_the_run(tmp_path: Path, tiny_run: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.41, "stage_lo')  # a crash or a full disk in the middle of a line
    with pytest.warns(UserWarning, match="torn last line"):
        assert _train(run, 3, "--resume", "auto") == 0
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_metrics_reader_names_the_file_and_tolerates_a_torn_end(tmp_path: Path) -> None:
    from dfm.visual import plot_losses, read_metrics

    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl line 2"):
        read_metrics(f)
    f.write_text('{"step": 1, "loss": 1.0, "stage_loss": [1.0]}\n{"step": 2, "loss": 0.5, "stage_loss": [0.5]}\n{"st')
    with pytest.warns(UserWarning, match="torn last line 3"):
        assert plot_losses(f, tmp_path / "loss.png") == tmp_path / "loss.png"


@needs_data
def test_damaged_checkpoint_files_give_one_line_errors(tmp_path: Path, capsys, tiny_run: Path) -> None:
    import argparse

    broken_ema, broken_state = tmp_path / "a", tmp_path / "b"
    for run in (broken_ema, broken_state):
        shutil.copytree(tiny_run, run)
    ema_file = find_latest(broken_ema / "checkpoints") / "ema.safetensors"
    ema_file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")  # SafetensorError
    assert cli(["sample", str(broken_ema), "--seeds", "0", "--out", str(tmp_path / "s")]) == 2
    assert f"cannot read checkpoint file {ema_file}" in _one_line(capsys)
    state_file = find_latest(broken_state / "checkpoints") / "state.pt"
    torch.save(argparse.Namespace(step=2), state_file)  # UnpicklingError under weights_only=True
    assert _train(broken_state, 3, "--resume", "auto") == 2
    err = _one_line(capsys)
    assert f"cannot read checkpoint file {state_file}" in err
    # issue 24: a planted pickle is not a dfm checkpoint; never repeat torch's advice to load it unsafely
    assert "not a checkpoint file written by dfm" in err and "argparse.Namespace" in err
    assert "weights_only" not in err and "can still be loaded" not in err


# ---------------------------------------------------------------------------------------------- issue 24
def _resume_error(tmp_path: Path, capsys, tiny_run: Path, change, *extra: str) -> tuple[str, Path]:
    """Resume a copy of the tiny run after ``change(checkpoint directory)``; the one-line error and the checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt = find_latest(run / "checkpoints")
    change(ckpt)
    capsys.readouterr()
    assert _train(run, 3, "--resume", "auto", *extra) == 2
    return _one_line(capsys), ckpt


def _edit_state(edit):
    def change(ckpt: Path) -> None:
        state = torch.load(ckpt / "state.pt", weights_only=True)
        torch.save(edit(state), ckpt / "state.pt")

    return change


@needs_data
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda st: {k: v for k, v in st.items() if k != "optimizer"}, "has no 'optimizer' entry"),
        (lambda st: [st["step"], st["optimizer"]], "holds a list instead of a dict"),
        (lambda st: {**st, "rng_cpu": st["rng_cpu"].float()}, "'rng_cpu' entry that is not a CPU RNG state"),
        (lambda st: {**st, "step": "2"}, "'step' entry that is not a step number"),
        (lambda st: {**st, "optimizer": {"state": {}}}, "'optimizer' entry that is not an optimizer state"),
    ],
)
def test_a_state_file_of_the_wrong_structure_is_refused_naming_it(tmp_path, capsys, tiny_run, edit, message) -> None:
    err, ckpt = _resume_error(tmp_path, capsys, tiny_run, _edit_state(edit))
    assert f"checkpoint file {ckpt / 'state.pt'}" in err and message in err, err
    assert "not a checkpoint written by" in err


@needs_data
def test_resuming_onto_another_runs_checkpoint_files_names_them(tmp_path: Path, capsys, tiny_run: Path) -> None:
    other = tmp_path / "wide"  # the same run with a wider model: its files do not fit
    assert _train(other, 1, "-o", "model.overrides.hidden_size=64") == 0
    theirs = find_latest(other / "checkpoints")

    def take(name: str):
        return lambda ckpt: shutil.copy(theirs / name, ckpt / name)

    err, ckpt = _resume_error(tmp_path / "a", capsys, tiny_run, take("state.pt"))
    assert f"checkpoint file {ckpt / 'state.pt'} holds the training state of another model" in err
    assert "(64, 4)" in err and "(32, 4)" in err
    err, ckpt = _resume_error(tmp_path / "b", capsys, tiny_run, take("model.safetensors"))
    assert f"checkpoint file {ckpt / 'model.safetensors'} does not fit this model: weight " in err
    assert "has shape (" in err and "in this model" in err and "Error(s) in loading" not in err


@needs_data
def test_resume_refuses_a_checkpoint_with_nan_weights_at_load(tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    assert _train(run, 2, "-o", "train.ckpt_every=1") == 0
    last = find_latest(run / "checkpoints")
    weights = load_file(last / "model.safetensors")
    name = next(iter(weights))
    weights[name][...] = float("nan")
    save_file(weights, last / "model.safetensors")
    assert _train(run, 3, "--resume", "auto") == 2
    err = _one_line(capsys)
    assert f"checkpoint {last} holds inf or NaN weights" in err and name in err
    earlier = run / "checkpoints" / "step_00000001"
    assert f"--resume {earlier}" in err and "the last checkpoint is intact" not in err
    assert not (run / "metrics.jsonl").read_text().count('"step": 3')  # refused before any step
    # what the message says to do works: a checkpoint directory given to --resume
    assert _train(run, 3, "--resume", str(earlier)) == 0
    assert load_checkpoint(find_latest(run / "checkpoints"))["state"]["step"] == 3


def _small_images(folder: Path, count: int = 4, size: int = 28) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(count // 2):
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / cls / f"{i}.png")
    return folder


def test_an_image_folder_of_28px_images_trains_at_32px_with_pad_or_upscale(tmp_path: Path, capsys) -> None:
    folder = _small_images(tmp_path / "imgs")
    small = ["--data", str(folder), "--batch-size", "4", "-o", "model.overrides.patch_size=2"]
    assert _train(tmp_path / "no", 1, *small) == 2
    err = _one_line(capsys)
    assert "is 28x28, smaller than resolution 32" in err
    assert "-o data.upscale=true" in err and "-o data.pad=2" in err and "upscale=True" not in err
    for setting, padding in (("data.pad=2", 2), ("data.upscale=true", 0)):
        run = tmp_path / setting
        assert _train(run, 1, *small, "-o", setting) == 0
        spec = json.loads((run / "data_spec.json").read_text())
        assert spec == {"sample_shape": [1, 32, 32], "num_classes": 2, "padding": padding}
    # the border is recorded, so saved samples crop it: 28x28 again
    assert cli(["sample", str(tmp_path / "data.pad=2"), "--seeds", "0-1", "--out", str(tmp_path / "s"), "--npz"]) == 0
    assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape == (2, 28, 28, 1)
    capsys.readouterr()
    assert _train(tmp_path / "neg", 1, *small, "-o", "data.pad=-1") == 2
    assert "data.pad=-1 must be a whole number of pixels >= 0" in _one_line(capsys)
    assert _train(tmp_path / "fm", 1, "-o", "data.pad=2") == 2  # Fashion-MNIST pads itself
    assert "data.pad applies to image folders; 'fashion-mnist' is not one" in _one_line(capsys)


def test_a_run_stopped_by_a_bad_image_continues_with_skip_bad(tmp_path: Path, capsys) -> None:
    folder = _small_images(tmp_path / "imgs", count=6, size=32)
    run = tmp_path / "run"
    data = ["--data", str(folder), "--batch-size", "6", "-o", "model.overrides.patch_size=2"]  # every image, every step
    assert _train(run, 2, *data) == 0
    broken = folder / "b" / "1.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n torn")  # damaged after the run started
    capsys.readouterr()
    assert _train(run, 4, *data, "--resume", "auto") == 2
    note, err = capsys.readouterr().err.strip().splitlines()  # "resumed from ...", then the error
    assert note.startswith("resumed from") and str(broken) in err and "--skip-bad" in err
    with pytest.warns(UserWarning, match="1.png"):
        assert _train(run, 4, *data, "--resume", "auto", "--skip-bad") == 0
    assert RunConfig.load(run / "config.json").data.skip_bad
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


@needs_data
def test_sampling_json_says_no_ema_for_a_run_trained_without_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _train(run, 1, "-o", "optim.ema=false") == 0
    for flags in ([], ["--no-ema"]):
        out = tmp_path / f"s{len(flags)}"
        assert cli(["sample", str(run), "--seeds", "0-1", "--out", str(out), *flags]) == 0
        assert json.loads((out / "sampling.json").read_text())["ema"] is False
    pretrained = tmp_path / "p"
    assert cli(["sample", str(run / "pretrained"), "--seeds", "0", "--out", str(pretrained)]) == 0
    assert json.loads((pretrained / "sampling.json").read_text())["ema"] is False


def test_unwritable_output_is_found_before_training(tmp_path: Path, capsys, monkeypatch) -> None:
    # Root can write anywhere, so "unwritable" here is a path through a regular file, or a write made to fail.
    with monkeypatch.context() as m:

        def denied(self, data):
            raise PermissionError(13, "Permission denied", str(self))

        m.setattr(Path, "write_bytes", denied)
        assert _train(tmp_path / "ro", 2) == 2
        assert f"cannot write to {tmp_path / 'ro'}: Permission denied" in _one_line(capsys)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert _train(blocker / "run", 2) == 2
    assert f"cannot write to {blocker / 'run'}" in _one_line(capsys)
    run = tmp_path / "run"  # a checkpoints/ that cannot be created, found at the start, not at the first save
    run.mkdir()
    (run / "checkpoints").write_text("")
    assert _train(run, 2) == 2
    assert f"cannot write to {run / 'checkpoints'}" in _one_line(capsys)
    assert not (run / "metrics.jsonl").exists()


@needs_data
def test_file_size_limit_while_saving_is_a_one_line_error(tmp_path: Path) -> None:
    resource = pytest.importorskip("resource")
    run = tmp_path / "run"

    def limit() -> None:  # 64 KB: the config and the log fit, a checkpoint (about 180 KB per file) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))

    res = subprocess.run(_train_cmd(run, 2), capture_output=True, text=True, preexec_fn=limit)
    assert res.returncode == 2, res.stderr
    assert "cannot write checkpoint" in res.stderr and "file-size limit" in res.stderr
    assert "Traceback" not in res.stderr
    assert not list((run / "checkpoints").iterdir())  # nothing half-written left behind


@needs_data
def test_ckpt_every_zero_saves_only_at_the_end(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _train(run, 3, "-o", "train.ckpt_every=0") == 0
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000003"]


def test_skip_bad_and_a_near_square_grid_for_one_class(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "imgs"  # a flat folder: one class, unconditional
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="broken.png"):
        code = cli(["train", "--out", str(run), "--data", str(folder), "--skip-bad", "--steps", "2",
                    "--batch-size", "2", "--no-progress", *TINY, "-o", "train.num_sample_images=9"])  # fmt: skip
    assert code == 0
    assert RunConfig.load(run / "config.json").data.skip_bad
    # Flat images have an all-zero fine level: its measured std is floored instead of dividing by zero.
    assert RunConfig.load(run / "config.json").method.data_std[1] == 1e-3
    width, height = Image.open(run / "samples" / "step_00000002.png").size
    assert 0.8 < width / height < 1.25  # 3 x 3, not one column of 9


def test_grid_columns() -> None:
    from dfm.visual import grid_columns

    assert grid_columns(40, 1) == 7 and grid_columns(40, 0) == 7  # unconditional: near square
    assert grid_columns(40, 10) == 10 and grid_columns(40, 2) == 8  # one class per column
    assert grid_columns(4, 10) == 4 and grid_columns(256, 10) == 20 and grid_columns(1, 1) == 1


@needs_data
def test_sample_flags_give_messages_that_say_what_to_change(tmp_path: Path, capsys, tiny_run: Path) -> None:
    out = str(tmp_path / "s")
    for flags, message in [
        (["--classes", "abc"], "--classes 'abc': give comma-separated numbers"),
        (["--classes", "12"], "this model has classes 0..9"),
        (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
        (["--steps", "10"], "sampler.steps=10: the model has 2 stage(s); give one step count per stage"),
        (["--steps", "x"], "--steps 'x': give comma-separated numbers"),
        (["--guidance", "-1"], "sampler.guidance=-1.0: scales must be finite and >= 0"),
        (["--thresholds", "0.5,0.7"], "give 1 threshold(s)"),
        (["--thresholds", "1.5"], "must lie strictly inside (0, 1)"),
    ]:
        assert cli(["sample", str(tiny_run), "--seeds", "0-1", "--out", out, *flags]) == 2, flags
        assert message in _one_line(capsys)


def test_leftovers_of_killed_saves_are_cleaned_without_losing_a_checkpoint(tmp_path: Path) -> None:
    from dfm.checkpoint import clean_leftovers

    root = tmp_path / "checkpoints"
    w = {"w": torch.ones(2)}
    save_checkpoint(root, 1, w, w, {"step": 1})
    save_checkpoint(root, 2, w, w, {"step": 2})
    # Killed while re-saving step 2 (after a resume): the good copy moved aside, its replacement half-written.
    os.replace(root / "step_00000002", root / ".old_step_00000002_999")
    (root / ".tmp_step_00000002_999").mkdir()
    (root / "latest.tmp999").write_text("step_000")
    # Killed after a re-save of step 1 was complete, before its old copy was deleted.
    shutil.copytree(root / "step_00000001", root / ".old_step_00000001_998")
    clean_leftovers(root)  # what the trainer does at start
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert find_latest(root).name == "step_00000002"
    assert load_checkpoint(root / "step_00000002")["state"]["step"] == 2
    (root / "latest.tmp123").write_text("x")
    (root / ".old_step_00000002_5").mkdir()  # incomplete: never the only copy
    save_checkpoint(root, 3, w, w, {"step": 3}, keep_last=3)  # and at every save
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002", "step_00000003"]
