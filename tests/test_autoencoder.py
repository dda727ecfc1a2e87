"""`dfm autoencoder measure`: PSNRs, scale equivariance and pyramid energies on known cases."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dfm.autoencoder import down, level_energy, measure, psnr


class Identity:
    """An exactly scale-equivariant "autoencoder": the latent is the image."""

    def encode(self, x):
        return x.clone(), torch.zeros_like(x)

    def decode(self, z):
        return z.clone()


class Blocky:
    """Latent = 2x2 block means, decode = nearest upsampling: exact for images made of 2x2 blocks, and scale-
    equivariant at 2x only for images made of 4x4 blocks."""

    def encode(self, x):
        return F.avg_pool2d(x, 2), torch.zeros_like(x[..., ::2, ::2])

    def decode(self, z):
        return F.interpolate(z, scale_factor=2, mode="nearest")


def test_identity_is_exact_and_scale_equivariant():
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    r = measure(Identity(), x, batch_size=3)
    assert math.isinf(r["recon_psnr"]) and math.isinf(r["se_psnr_2x"]) and math.isinf(r["se_psnr_4x"])
    assert r["latent_energy"] == r["pixel_energy"] and abs(sum(r["pixel_energy"]) - 1) < 1e-3
    z = x  # the latent is the image: its statistics are the image's
    assert r["shift"] == pytest.approx(float(z.mean()), abs=1e-4)
    assert r["scale"] == pytest.approx(1 / float(z.std()), rel=1e-4)


def test_blocky_autoencoder_is_measured_as_expected():
    torch.manual_seed(0)
    blocks2 = F.interpolate(torch.rand(4, 1, 8, 8) * 2 - 1, scale_factor=2, mode="nearest")
    r = measure(Blocky(), blocks2)
    assert math.isinf(r["recon_psnr"]) and math.isfinite(r["se_psnr_2x"])
    blocks4 = F.interpolate(torch.rand(4, 1, 4, 4) * 2 - 1, scale_factor=4, mode="nearest")
    r = measure(Blocky(), blocks4)
    assert math.isinf(r["recon_psnr"]) and math.isinf(r["se_psnr_2x"]) and math.isfinite(r["se_psnr_4x"])


def test_psnr_down_and_energy():
    a = torch.zeros(1, 1, 4, 4)
    assert psnr(a, a + 0.2) == pytest.approx(10 * math.log10(4 / 0.04))
    assert torch.equal(down(torch.arange(16.0).view(1, 1, 4, 4), 2), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    flat = torch.ones(2, 1, 16, 16)
    assert level_energy(flat, 3) == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)  # a constant lives in the coarsest level
    checker = (torch.arange(16)[None, :] + torch.arange(16)[:, None]) % 2 * 2.0 - 1.0
    assert level_energy(checker.view(1, 1, 16, 16), 3)[-1] == pytest.approx(1.0, abs=1e-6)  # all in the finest


def test_measure_a_tiny_diffusers_vae_from_the_command_line(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from dfm.cli import main as cli
    from test_data_latents import tiny_vae_dir

    vae_dir = tiny_vae_dir(tmp_path)
    out = tmp_path / "m.json"
    assert cli(["autoencoder", "measure", "--vae", str(vae_dir), "--num-images", "8", "--resolution", "16",
                "--out", str(out)]) == 0  # fmt: skip
    r = json.loads(out.read_text())
    assert r["num_images"] == 8 and r["latent_size"] == [4, 8, 8] and len(r["latent_std"]) == 4
    assert r["recon_psnr"] < 40 and r["se_psnr_2x"] < 40  # an untrained VAE reconstructs nothing well
    assert "| autoencoder |" in out.with_suffix(".md").read_text() and "SE PSNR 2x" in capsys.readouterr().out


def _finetune(out, *extra):
    from dfm.cli import main as cli

    args = ["autoencoder", "finetune", "--init", "scratch", "--out", str(out), "--resolution", "16",
            "--num-images", "128", "--batch-size", "8", "--lr", "1e-3", "--no-progress", *extra]  # fmt: skip
    assert cli(args) == 0


def test_se_finetune_lowers_the_se_error_and_resumes_exactly(tmp_path):
    pytest.importorskip("diffusers")
    from dfm.data.vae import load_vae
    from dfm.eval.images import load_fashion_mnist

    images = load_fashion_mnist(split="test")[0][:64, None].float() / 127.5 - 1
    images = F.interpolate(images, size=(16, 16), mode="area")
    scores = {}
    for weight in ("0", "1"):
        _finetune(tmp_path / f"w{weight}", "--steps", "30", "--se-weight", weight)
        scores[weight] = measure(load_vae(tmp_path / f"w{weight}"), images)
    assert scores["1"]["se_psnr_2x"] > scores["0"]["se_psnr_2x"] + 0.5  # the SE term does what it says
    assert scores["1"]["se_psnr_4x"] > scores["0"]["se_psnr_4x"] + 0.5
    # interrupted at step 4 of 8 and resumed = 8 steps straight, bit for bit
    _finetune(tmp_path / "straight", "--steps", "8")
    _finetune(tmp_path / "resumed", "--steps", "4")
    _finetune(tmp_path / "resumed", "--steps", "8")
    a, b = (load_vae(tmp_path / d).model.state_dict() for d in ("straight", "resumed"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    rows = [json.loads(r) for r in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))


def test_se_finetuned_autoencoder_works_with_dfm_prepare(tmp_path):
    pytest.importorskip("diffusers")
    from dfm.cli import main as cli
    from dfm.data import build_dataset

    _finetune(tmp_path / "ae", "--steps", "2")
    out = tmp_path / "latents"
    assert cli(["prepare", "--data", "fashion-mnist", "--vae", str(tmp_path / "ae"), "--out", str(out),
                "--resolution", "16", "--split", "test", "--batch-size", "64"]) == 0  # fmt: skip
    ds = build_dataset(out, train=False)
    assert len(ds) == 10000 and ds.sample_shape == (4, 8, 8)
    from dfm.data.vae import load_vae
    from dfm.generate import Generator
    from dfm.methods import get_method
    from dfm.presets import get_preset
    from dfm.run import DataSpec

    cfg = get_preset("quickstart")
    cfg.method.precondition, cfg.method.loss_weighting = False, "velocity"
    network = get_method("dfm").network(cfg, (4, 8, 8), 10)
    exact = lambda vae: Generator(network, cfg, DataSpec((4, 8, 8), 10), vae).previews_exact  # noqa: E731
    assert load_vae(tmp_path / "ae").scale_equivariant  # trained with the SE term: marked so
    assert exact(load_vae(tmp_path / "ae")) and exact(None)
    _finetune(tmp_path / "plain", "--steps", "1", "--se-weight", "0")
    assert not exact(load_vae(tmp_path / "plain"))
    with pytest.raises(ValueError, match="not both"):
        from dfm.autoencoder import run_finetune

        run_finetune(type("A", (), {"vae": "x", "init": "scratch"})())


# ---------------------------------------------------------------------------------------------- issue 24
def _finetune_error(out, capsys, *extra) -> str:
    from dfm.cli import main as cli

    args = ["autoencoder", "finetune", "--init", "scratch", "--out", str(out), "--resolution", "16",
            "--num-images", "32", "--batch-size", "4", "--no-progress", *extra]  # fmt: skip
    capsys.readouterr()
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_se_finetune_checkpoints_and_logs_as_the_trainer_does(tmp_path, capsys):
    pytest.importorskip("diffusers")
    import argparse
    import shutil

    from dfm.checkpoint import find_latest, list_checkpoints, load_checkpoint

    run = tmp_path / "ae"
    _finetune(run, "--steps", "3", "--num-images", "32", "--ckpt-every", "1")
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000002", "step_00000003"]
    assert not (run / "checkpoint.pt").exists()  # no pickle of its own: safetensors weights, like the trainer's
    assert load_checkpoint(find_latest(run / "checkpoints"))["state"]["step"] == 3
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 4, "factor": 2, "rec')  # a crash or a full disk in the middle of a line
    with pytest.warns(UserWarning, match="torn last line"):
        _finetune(run, "--steps", "4", "--num-images", "32")
    rows = [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]

    state = find_latest(run / "checkpoints") / "state.pt"
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    (damaged / state.relative_to(run)).write_bytes(state.read_bytes()[:100])  # a truncated file
    err = _finetune_error(damaged, capsys, "--steps", "5")
    assert f"cannot read checkpoint file {damaged / state.relative_to(run)}" in err and "damaged" in err
    torch.save(argparse.Namespace(step=4), damaged / state.relative_to(run))  # a planted pickle
    err = _finetune_error(damaged, capsys, "--steps", "5")
    assert "not a checkpoint file written by dfm" in err and "weights_only" not in err
    err = _finetune_error(run, capsys, "--steps", "5", "--freeze-encoder")  # other settings: another optimizer
    assert f"checkpoint file {state} holds the optimizer state of another training" in err

    # a run of an older version (one checkpoint.pt) resumes, exactly as from the new checkpoints
    legacy = tmp_path / "legacy"
    shutil.copytree(run, legacy)
    shutil.rmtree(legacy / "checkpoints")
    loaded = load_checkpoint(find_latest(run / "checkpoints"))
    torch.save({"model": loaded["model"], "optimizer": loaded["state"]["optimizer"], "step": 4},
               legacy / "checkpoint.pt")  # fmt: skip
    for out in (run, legacy):
        _finetune(out, "--steps", "5", "--num-images", "32")
    from dfm.data.vae import load_vae

    a, b = (load_vae(d).model.state_dict() for d in (run, legacy))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

    for flags, message in [
        (["--lr", "inf"], "--lr=inf must be a finite number > 0"),
        (["--lr", "1e38"], "overflows float32"),
        (["--ckpt-every", "-1"], "--ckpt-every -1 must be >= 0"),
        (["--factors", "2,x"], "--factors '2,x': give comma-separated downsampling factors"),
    ]:
        assert message in _finetune_error(tmp_path / "new", capsys, "--steps", "2", *flags), flags
