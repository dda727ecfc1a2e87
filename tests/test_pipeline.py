"""DFMPipeline: diffusers' conventions over a trained run, the same images as `dfm sample`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="DFMPipeline needs diffusers (pip install 'dfm[vae]')")

from dfm.cli import main as cli  # noqa: E402
from dfm.pipeline import DFMPipeline, DFMPipelineOutput  # noqa: E402
from helpers import TINY_RUN, needs_data  # noqa: E402

pytestmark = needs_data
TINY = [*TINY_RUN, "-o", "sampler.steps=2,2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pipe") / "run"
    assert cli(["train", "--out", str(path), "--steps", "3", "--batch-size", "4", "--no-progress", *TINY]) == 0
    return path


def test_pipeline_images_equal_dfm_sample(run, tmp_path):
    assert cli(["sample", str(run), "--seeds", "0-5", "--npz", "--out", str(tmp_path / "s"), "--steps", "3,2"]) == 0
    expected = np.load(tmp_path / "s" / "samples.npz")
    for source in (run, run / "pretrained"):
        pipe = DFMPipeline.from_pretrained(source)
        out = pipe(seeds=range(6), num_inference_steps=(3, 2), output_type="np")
        assert isinstance(out, DFMPipelineOutput) and out.images.shape == (6, 28, 28, 1)
        np.testing.assert_array_equal(np.round(out.images * 255).astype(np.uint8), expected["arr_0"])
        assert len(out.previews) == 2 and out.previews[0].shape == (6, 16, 16, 1)
    # the time shift as dfm sample --shift applies it
    assert cli(["sample", str(run), "--seeds", "0-5", "--npz", "--out", str(tmp_path / "t"), "--steps", "3,2",
                "--shift", "0.4"]) == 0  # fmt: skip
    shifted = pipe(seeds=range(6), num_inference_steps=(3, 2), shift=0.4, output_type="np").images
    np.testing.assert_array_equal(
        np.round(shifted * 255).astype(np.uint8), np.load(tmp_path / "t" / "samples.npz")["arr_0"]
    )
    assert not np.array_equal(np.load(tmp_path / "t" / "samples.npz")["arr_0"], expected["arr_0"])
    with pytest.raises(ValueError, match="sampler.shift"):
        pipe(seeds=[0], shift=-1.0)
    # ... and on the finest stage only, as dfm sample --shift-from -1
    assert cli(["sample", str(run), "--seeds", "0-5", "--npz", "--out", str(tmp_path / "f"), "--steps", "3,2",
                "--shift", "0.4", "--shift-from", "-1"]) == 0  # fmt: skip
    fine = pipe(seeds=range(6), num_inference_steps=(3, 2), shift=0.4, shift_from=-1, output_type="np").images
    fine = np.round(fine * 255).astype(np.uint8)
    np.testing.assert_array_equal(fine, np.load(tmp_path / "f" / "samples.npz")["arr_0"])
    assert not np.array_equal(fine, np.round(shifted * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="sampler.shift_from=2"):
        pipe(seeds=[0], shift=0.4, shift_from=2)


def test_save_pretrained_round_trip_and_dfm_sample_reads_it(run, tmp_path):
    pipe = DFMPipeline.from_pretrained(run)
    saved = pipe.save_pretrained(tmp_path / "pipe")
    assert (saved / "model_index.json").is_file()
    again = DFMPipeline.from_pretrained(saved)
    a = pipe(seeds=[3, 4], class_labels=7, output_type="pt")
    b = again(seeds=[3, 4], class_labels=7, output_type="pt")
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    assert a.images.shape == (2, 1, 28, 28) and 0 <= float(a.images.min()) and float(a.images.max()) <= 1
    assert cli(["sample", str(saved), "--seeds", "0-1", "--out", str(tmp_path / "s2")]) == 0


def test_pil_output_callback_generator_and_errors(run):
    pipe = DFMPipeline.from_pretrained(run)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    record = lambda p, step, stage, kw: calls.append((step, stage, kw["preview"].shape[-1]))  # noqa: E731
    out = pipe(class_labels=[1, 2, 3], num_inference_steps=(2, 2), generator=torch.Generator().manual_seed(0),
               callback_on_step_end=record)  # fmt: skip
    assert [im.size for im in out.images] == [(28, 28)] * 3 and len(out.previews) == 2
    assert calls == [(2, 0, 16), (4, 1, 32)]
    again = pipe(class_labels=[1, 2, 3], num_inference_steps=(2, 2), generator=torch.Generator().manual_seed(0))
    assert [np.asarray(a).tolist() for a in out.images] == [np.asarray(b).tolist() for b in again.images]
    images, previews = pipe(seeds=[0], num_inference_steps=4, output_type="np", return_dict=False)
    assert images.shape == (1, 28, 28, 1) and len(previews) == 2  # 4 steps split like the run's (2, 2)
    with pytest.raises(ValueError, match="output_type='jpg'"):
        pipe(seeds=[0], output_type="jpg")
    with pytest.raises(ValueError, match=r"classes \[12\] out of range: this model has classes 0..9"):
        pipe(seeds=[0], class_labels=12)
    with pytest.raises(ValueError, match="one step count per stage"):
        pipe(seeds=[0], num_inference_steps=(2, 2, 2))
    with pytest.raises(ValueError, match="2 class_labels for 3 images"):
        pipe(seeds=[0, 1, 2], class_labels=[1, 2])


def test_latent_run_round_trips_with_its_vae(tmp_path):
    from PIL import Image

    from dfm.data.prepare import main as prepare
    from test_data_latents import tiny_vae_dir

    vae_dir = tiny_vae_dir(tmp_path)
    rng = np.random.default_rng(0)
    for i in range(6):
        (tmp_path / "images" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(
            tmp_path / "images" / "a" / f"{i}.png"
        )
    latents = tmp_path / "latents"
    assert prepare(["--data", str(tmp_path / "images"), "--vae", str(vae_dir), "--out", str(latents),
                    "--resolution", "16"]) == 0  # fmt: skip
    run = tmp_path / "run"
    latent_model = ["-o", "data.resolution=none", "-o", "model.overrides.patch_size=2"]
    assert cli(["train", "--data", str(latents), "--out", str(run), "--steps", "2", "--batch-size", "2",
                "--no-progress", *TINY, *latent_model]) == 0  # fmt: skip
    pipe = DFMPipeline.from_pretrained(run)
    before = pipe(seeds=[0, 1], output_type="np", num_inference_steps=(2, 2))
    assert before.images.shape == (2, 16, 16, 3)  # decoded by the VAE
    assert before.previews[0].shape == (2, 16, 16, 3)  # not scale-equivariant: the upsampled latent decoded
    (vae_dir / "dfm_autoencoder.json").write_text('{"scale_equivariant": true}')
    exact = DFMPipeline.from_pretrained(run)(seeds=[0, 1], output_type="np", num_inference_steps=(2, 2))
    assert exact.previews[0].shape == (2, 8, 8, 3)  # the coarse latent decoded as it is: the coarse image
    np.testing.assert_array_equal(exact.images, before.images)
    (vae_dir / "dfm_autoencoder.json").unlink()
    saved = pipe.save_pretrained(tmp_path / "pipe")
    assert (saved / "vae" / "config.json").is_file()
    import shutil

    shutil.rmtree(vae_dir)  # the saved pipeline carries its own VAE
    after = DFMPipeline.from_pretrained(saved)(seeds=[0, 1], output_type="np", num_inference_steps=(2, 2))
    np.testing.assert_array_equal(before.images, after.images)
