"""Latent datasets on disk, the VAE wrapper on a tiny random AutoencoderKL, and `dfm prepare`."""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dfm.data import LatentDataset, build_dataset
from dfm.data.latents import LatentWriter, is_latent_dir


def write_latents(root, n=7, shape=(2, 4, 4), shift=0.5, scale=2.0, shard_size=3, splits=("train",)):
    generator = torch.Generator().manual_seed(0)
    data = {}
    with LatentWriter(
        root, shape, vae="some/vae", shift=shift, scale=scale, class_names=["a", "b", "c"], shard_size=shard_size
    ) as writer:
        for split in splits:
            mean = torch.randn((n, *shape), generator=generator)
            std = torch.rand((n, *shape), generator=generator) + 0.1
            labels = torch.arange(n) % 3
            writer.add(split, mean[:4], std[:4], labels[:4])  # two batches that straddle shards
            writer.add(split, mean[4:], std[4:], labels[4:])
            data[split] = (mean, std, labels)
    return data


def test_latent_round_trip_and_normalisation(tmp_path):
    mean, std, labels = write_latents(tmp_path)["train"]
    info = json.loads((tmp_path / "latents.json").read_text())
    assert info["splits"]["train"] == {
        "num_samples": 7,
        "files": ["train-00000.safetensors", "train-00001.safetensors", "train-00002.safetensors"],
    }
    ds = LatentDataset(tmp_path, sample_posterior=False)
    assert len(ds) == 7 and ds.sample_shape == (2, 4, 4) and ds.channels == 2 and ds.resolution == 4
    assert ds.num_classes == 3 and ds.class_names == ["a", "b", "c"]
    assert ds.needs_vae and ds.vae_path == "some/vae"
    assert not hasattr(ds, "tensors")  # a frozen tensor would hide the per-step posterior draw
    x, y = ds.get_batch(torch.arange(7))
    torch.testing.assert_close(x, (mean - 0.5) * 2.0)
    assert torch.equal(y, labels)


def test_latent_posterior_sampling(tmp_path):
    mean, std, _ = write_latents(tmp_path)["train"]
    ds = LatentDataset(tmp_path)
    x, _ = ds.get_batch(torch.arange(7), generator=torch.Generator().manual_seed(1))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, (mean + std * eps - 0.5) * 2.0)
    # augment=False uses the posterior mean
    torch.testing.assert_close(ds.get_batch(torch.arange(7), augment=False)[0], (mean - 0.5) * 2.0)


def test_interrupted_writer_leaves_no_json(tmp_path):
    with pytest.raises(RuntimeError), LatentWriter(tmp_path, (1, 2, 2), "v", 0.0, 1.0, ["a"]) as writer:
        writer.add("train", torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.zeros(1, dtype=torch.long))
        raise RuntimeError("killed")
    assert not is_latent_dir(tmp_path)


def test_writer_rejects_wrong_shapes(tmp_path):
    writer = LatentWriter(tmp_path, (1, 2, 2), "v", 0.0, 1.0, ["a"])
    with pytest.raises(ValueError, match=r"latent shape \(1, 2, 2\)"):
        writer.add("train", torch.zeros(1, 1, 3, 3), torch.ones(1, 1, 3, 3), torch.zeros(1, dtype=torch.long))


def test_latent_errors(tmp_path):
    write_latents(tmp_path)
    with pytest.raises(ValueError, match="split 'test'.*'train'"):
        LatentDataset(tmp_path, split="test")
    (tmp_path / "train-00001.safetensors").write_bytes(b"broken")
    with pytest.raises(ValueError, match="train-00001.safetensors"):
        LatentDataset(tmp_path)
    (tmp_path / "latents.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="dfm prepare"):
        LatentDataset(tmp_path)


def test_build_dataset_detects_latents(tmp_path):
    write_latents(tmp_path, splits=("train", "test"))
    train = build_dataset(tmp_path)
    test = build_dataset(tmp_path, train=False)
    assert isinstance(train, LatentDataset) and train.split == "train" and train.sample_posterior
    assert test.split == "test" and not test.sample_posterior
    with pytest.raises(ValueError, match="resolution 64 does not match"):
        build_dataset(tmp_path, resolution=64)


# ----------------------------------------------------------------------------- VAE and prepare


def tiny_vae_dir(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.5,
        shift_factor=0.25,
    )
    model.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


def test_vae_encode_decode_shapes(tmp_path):
    from dfm.data.vae import load_vae

    vae = load_vae(tiny_vae_dir(tmp_path))
    assert vae.shift == 0.25 and vae.scale == 0.5 and vae.downsample_factor == 2
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = vae.encode(x)
    assert mean.shape == std.shape == (2, 4, 8, 8) and torch.all(std > 0)
    images = vae.decode(mean)
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(vae.normalize(z), (z - 0.25) * 0.5)
    torch.testing.assert_close(vae.denormalize(vae.normalize(z)), z)
    with pytest.raises(ValueError, match="not divisible"):
        vae.latent_shape(4, 15)


def test_load_vae_without_config_is_an_error(tmp_path):
    pytest.importorskip("diffusers")
    from dfm.data.vae import load_vae

    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae(tmp_path / "missing")


def test_missing_diffusers_says_how_to_install(monkeypatch):
    from dfm.data.vae import load_vae

    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r'pip install "dfm\[vae\]"'):
        load_vae("anything")


def test_prepare_end_to_end(tmp_path, capsys):
    from dfm.data.prepare import add_prepare_parser, main
    from dfm.data.vae import load_vae

    vae_dir = tiny_vae_dir(tmp_path)
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        for i in range(3):
            (tmp_path / "images" / name).mkdir(parents=True, exist_ok=True)
            array = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(array).save(tmp_path / "images" / name / f"{i}.png")
    out = tmp_path / "latents"
    argv = ["--data", str(tmp_path / "images"), "--vae", str(vae_dir), "--out", str(out)]
    assert main([*argv, "--resolution", "16", "--batch-size", "4", "--shard-size", "5"]) == 0

    ds = build_dataset(out, train=False)
    assert len(ds) == 6 and ds.sample_shape == (4, 8, 8) and ds.class_names == ["cat", "dog"]
    assert ds.vae_path == str(vae_dir) and ds.latent_shift == 0.25 and ds.latent_scale == 0.5
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # the stored means are the VAE's posterior means of the centre-cropped images
    images = build_dataset(tmp_path / "images", resolution=16, train=False)
    vae = load_vae(vae_dir)
    mean, _ = vae.encode(images.get_batch(torch.arange(6), augment=False)[0])
    x, _ = ds.get_batch(torch.arange(6), augment=False)
    torch.testing.assert_close(x, vae.normalize(mean), atol=1e-5, rtol=1e-5)
    decoded = ds.autoencoder().decode_normalized(x[:2])
    torch.testing.assert_close(decoded, vae.decode(mean[:2]), atol=1e-5, rtol=1e-5)

    # a second split goes into the same directory; a different resolution is refused
    assert main([*argv, "--resolution", "16", "--split", "test"]) == 0
    assert set(json.loads((out / "latents.json").read_text())["splits"]) == {"train", "test"}
    assert main([*argv, "--resolution", "8"]) == 2
    assert "choose a new --out directory" in capsys.readouterr().err
    # latents are not images to encode: a clear error, not a TypeError about folder options
    again = ["--data", str(out), "--vae", str(vae_dir), "--out", str(tmp_path / "again"), "--resolution", "16"]
    assert main(again) == 2
    assert f"--data {out} is not an image dataset" in capsys.readouterr().err

    parser = argparse.ArgumentParser()
    add_prepare_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare", *argv, "--resolution", "16"])
    assert args.batch_size == 32 and args.func.__name__ == "run_prepare"


def _image_folder(root, names, size=(20, 24), seed=0):
    rng = np.random.default_rng(seed)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(root / name)
    return root


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prepare_failure_leaves_nothing_behind(tmp_path, capsys):
    from dfm.data.prepare import main

    vae_dir = tiny_vae_dir(tmp_path)
    good = _image_folder(tmp_path / "good", ["cat/0.png", "cat/1.png", "dog/2.png"])
    bad = _image_folder(tmp_path / "bad", ["cat/0.png", "dog/2.png"])
    (bad / "cat" / "1.png").write_bytes(b"\x89PNG not really")

    def prepare(data, out, *more):
        args = ["--data", str(data), "--vae", str(vae_dir), "--out", str(out), "--resolution", "16", *more]
        return main([*args, "--batch-size", "2", "--shard-size", "2"])

    # a new --out (and the folder above it): nothing left after the bad image, not even a hidden partial folder
    before = sorted(os.listdir(tmp_path))
    assert prepare(bad, tmp_path / "new" / "latents") == 2
    err = capsys.readouterr().err
    assert "cat/1.png" in err and "--skip-bad" in err
    assert sorted(os.listdir(tmp_path)) == before
    # an existing --out of someone's files, an empty one: left as they were
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "empty").mkdir()
    for out in ("mine", "empty"):
        assert prepare(bad, tmp_path / out) == 2
    assert _snapshot(tmp_path / "mine") == {"notes.txt": b"keep me"} and not any((tmp_path / "empty").iterdir())
    assert sorted(os.listdir(tmp_path)) == sorted([*before, "mine", "empty"])
    assert prepare(good, tmp_path / "empty") == 0 and is_latent_dir(tmp_path / "empty")

    # a latent directory: a split that fails changes nothing; a replaced split leaves no stale shard behind
    latents = tmp_path / "latents"
    assert prepare(good, latents) == 0
    assert sorted(os.listdir(latents)) == ["latents.json", "train-00000.safetensors", "train-00001.safetensors"]
    kept = _snapshot(latents)
    assert prepare(bad, latents, "--split", "test") == 2
    assert prepare(bad, latents) == 2  # replacing train with bad images: the old train split stays
    assert _snapshot(latents) == kept
    assert sorted(os.listdir(tmp_path)) == sorted([*before, "mine", "empty", "latents"])
    with pytest.warns(UserWarning, match=r"skipped 1 .*cat/1\.png"):
        assert prepare(bad, latents, "--skip-bad") == 0  # train again, now 2 images: one shard
    assert sorted(os.listdir(latents)) == ["latents.json", "train-00000.safetensors"]
    assert len(LatentDataset(latents, sample_posterior=False)) == 2


def test_prepare_too_small_images_name_the_upscale_flag(tmp_path, capsys):
    from dfm.data.prepare import main

    vae_dir = tiny_vae_dir(tmp_path)
    images = _image_folder(tmp_path / "images", ["a.png", "b.png"], size=(12, 10))
    argv = ["--data", str(images), "--vae", str(vae_dir), "--out", str(tmp_path / "out"), "--resolution", "16"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "a.png is 10x12, smaller than resolution 16" in err
    assert "--upscale" in err and "--resolution" in err and "upscale=True" not in err
    assert not (tmp_path / "out").exists()
    assert main([*argv, "--upscale"]) == 0
    assert len(LatentDataset(tmp_path / "out")) == 2


def test_prepare_fashion_mnist_split_and_grey_to_rgb(tmp_path, monkeypatch):
    from dfm.data.prepare import prepare_latents
    from test_data_fashion_mnist import make_split

    vae_dir = tiny_vae_dir(tmp_path)
    make_split(tmp_path / "fm" / "fashion-mnist", "train", n=5)
    make_split(tmp_path / "fm" / "fashion-mnist", "test", n=3)
    monkeypatch.setenv("DFM_DATA_DIR", str(tmp_path / "fm"))
    for split in ("train", "test"):
        prepare_latents("fashion-mnist", str(vae_dir), tmp_path / "out", resolution=32, split=split, progress=False)
    assert len(LatentDataset(tmp_path / "out", "train")) == 5
    test = LatentDataset(tmp_path / "out", "test")
    assert len(test) == 3 and test.sample_shape == (4, 16, 16) and test.class_names[0] == "T-shirt/top"
    assert test.padding == 2 and test.source_data == "fashion-mnist"  # 28 px padded to 32: decoded samples crop it
