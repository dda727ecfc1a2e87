"""Extractors with random weights: architecture, preprocessing, value ranges, determinism, loading."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dfm.eval.extractors import DinoV2, FashionCNN, InceptionV3, build_extractor
from dfm.eval.extractors.base import IMAGENET_MEAN, IMAGENET_STD
from dfm.eval.weights import WeightsNotFoundError, sha256_file


def _images(n: int, size: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------- preprocessing


def test_inception_preprocessing_maps_to_minus_one_one_at_299() -> None:
    pre = InceptionV3.preprocessing
    black, white = torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    assert pre(black).shape == (1, 3, 299, 299)
    # Bilinear weights sum to 1 only up to float rounding, which depends on the CPU's vector kernels (exact on
    # AVX-512, 1 ulp off on some AMD CPUs): the map is right to rounding, not bitwise.
    torch.testing.assert_close(pre(black), torch.full_like(pre(black), -1.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(pre(white), torch.full_like(pre(white), 1.0), atol=1e-6, rtol=0)


def test_dinov2_preprocessing_is_imagenet_normalised_bicubic_224() -> None:
    pre = DinoV2.preprocessing
    assert (pre.size, pre.interpolation) == (224, "bicubic")
    grey = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)  # grey input is repeated to RGB
    out = pre(grey)
    assert out.shape == (2, 3, 224, 224)
    expected = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 100, 100], expected)
    # bicubic overshoot is clipped, so no value leaves the normalised [0, 1] range
    lo, hi = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD), expected
    out = pre(_images(2, 20))
    assert torch.all(out >= lo[None, :, None, None] - 1e-6) and torch.all(out <= hi[None, :, None, None] + 1e-6)


def test_dinov2_preprocessing_matches_a_pil_bicubic_resize() -> None:
    # dgm-eval resizes PIL images; ours should agree to within about one uint8 level on average.
    from PIL import Image

    array = np.random.default_rng(0).integers(0, 256, (40, 40, 3)).astype(np.uint8)
    pil = np.asarray(Image.fromarray(array).resize((224, 224), Image.BICUBIC)).astype(np.float32) / 255
    ours = DinoV2.preprocessing(torch.from_numpy(array).permute(2, 0, 1)[None])[0]
    ours = ours * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    diff = (ours.permute(1, 2, 0).numpy() - pil) * 255
    assert np.abs(diff).mean() < 0.5 and np.median(np.abs(diff)) < 0.01


def test_fashion_preprocessing_converts_rgb_to_grey() -> None:
    pre = FashionCNN.preprocessing
    red = torch.zeros(1, 3, 28, 28, dtype=torch.uint8)
    red[:, 0] = 255
    out = pre(red)
    assert out.shape == (1, 1, 28, 28)
    torch.testing.assert_close(out, torch.full_like(out, (0.299 - 0.2860) / 0.3530))


def test_preprocessing_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="1 or 3"):
        InceptionV3.preprocessing(torch.zeros(1, 4, 8, 8, dtype=torch.uint8))


# ---------------------------------------------------------------- Inception-v3


def test_inception_architecture_matches_the_fid_checkpoint_layout() -> None:
    model = InceptionV3()
    keys = model.state_dict()
    # torchvision's Inception-v3 without the aux head has 23,834,568 parameters; +8 classes (1008) adds 16,392.
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    assert keys["fc.weight"].shape == (1008, 2048)
    assert keys["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert keys["Conv2d_1a_3x3.bn.running_var"].shape == (32,)
    assert not any(k.startswith("AuxLogits") for k in keys)


def test_inception_forward_shapes_and_determinism() -> None:
    torch.manual_seed(0)
    model = InceptionV3().eval()
    images = _images(2, 32)
    out = model(images)
    assert out.features.shape == (2, 2048) and out.logits.shape == (2, 1008)
    torch.testing.assert_close(out.logits, out.features @ model.fc.weight.T)  # IS logits carry no bias
    assert torch.all(out.features >= 0)  # average of ReLU outputs
    # the same image alone gives the same features: eval mode, no cross-sample coupling
    torch.testing.assert_close(model(images[:1]).features, out.features[:1], rtol=1e-4, atol=1e-5)


def test_inception_loads_a_weights_file_from_the_environment(tmp_path, monkeypatch) -> None:
    torch.manual_seed(1)
    path = tmp_path / "pt_inception.pth"
    torch.save(InceptionV3().state_dict(), path)
    monkeypatch.setenv("DFM_INCEPTION_WEIGHTS", str(path))
    model = build_extractor("inception-v3")
    assert model.weights_sha256 == sha256_file(path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model.state_dict()["fc.bias"], torch.load(path)["fc.bias"])


def test_missing_weights_error_says_how_to_get_them(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DFM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsNotFoundError, match="DFM_INCEPTION_WEIGHTS") as info:
        build_extractor("inception-v3")
    assert "pt_inception-2015-12-05" in str(info.value) and "network unreachable" in str(info.value)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        build_extractor("inception-v3", weights=tmp_path / "nope.pth")


def test_unknown_extractor_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown feature extractor 'resnet'"):
        build_extractor("resnet")


# ---------------------------------------------------------------- DINOv2


def test_dinov2_vitl14_layout_on_meta_device() -> None:
    with torch.device("meta"):
        model = DinoV2()
    keys = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 304_368_640  # published ViT-L/14 size
    assert keys["pos_embed"].shape == (1, 1370, 1024)
    assert keys["blocks.23.ls2.gamma"].shape == (1024,)
    assert keys["blocks.0.attn.qkv.weight"].shape == (3072, 1024)
    assert {"cls_token", "mask_token", "patch_embed.proj.weight", "norm.weight"} <= set(keys)


def test_reduced_dinov2_features_are_layer_normalised_and_deterministic() -> None:
    torch.manual_seed(0)
    model = DinoV2(dim=64, depth=2, heads=4).eval()
    images = _images(3, 40)
    out = model(images).features
    assert out.shape == (3, 64) and model(images).logits is None
    # final LayerNorm with unit weight and zero bias: each feature vector has mean 0 and variance 1
    torch.testing.assert_close(out.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    # (variance v / (v + eps) is a little below 1: the random-init CLS stream is tiny next to eps = 1e-6)
    torch.testing.assert_close(out.var(1, unbiased=False), torch.ones(3), atol=1e-2, rtol=0)
    torch.testing.assert_close(model(images).features, out, rtol=0, atol=0)


def test_dinov2_position_embedding_resizes_to_the_patch_grid() -> None:
    model = DinoV2(dim=32, depth=1, heads=2)
    assert model.interpolate_pos_embed(37, 37) is model.pos_embed
    resized = model.interpolate_pos_embed(16, 16)
    assert resized.shape == (1, 1 + 256, 32)
    torch.testing.assert_close(resized[:, 0], model.pos_embed[:, 0])


# ---------------------------------------------------------------- EfficientNet-Lite0 (offline, real weights)


def test_efficientnet_lite0_runs_offline_with_bundled_weights() -> None:
    model = build_extractor("efficientnet-lite0")
    assert model.weights_sha256 and model.weights_path.endswith(".pth")
    images = _images(2, 24)
    out = model(images)
    assert out.features.shape == (2, 1280) and out.logits.shape == (2, 1000)
    assert torch.all(out.features >= 0) and torch.all(out.features <= 6)  # mean of ReLU6 outputs
    torch.testing.assert_close(model(images).features, out.features, rtol=0, atol=0)


def test_efficientnet_lite0_channels_last_gives_the_nchw_features() -> None:
    model = build_extractor("efficientnet-lite0")
    assert model.channels_last
    images = _images(3, 32)
    fast = model(images).features
    reference = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    reference.channels_last = False
    slow = reference(images).features
    assert next(reference.parameters()).is_contiguous() and not next(model.net._conv_stem.parameters()).is_contiguous()
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_efficientnet_lite0_recognises_a_natural_image() -> None:
    # matplotlib ships Grace Hopper's portrait; ImageNet class 652 is "military uniform".
    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as image:
        array = torch.from_numpy(np.array(image.convert("RGB")))
    model = build_extractor("efficientnet-lite0")
    logits = model(array.permute(2, 0, 1)[None]).logits
    assert logits.argmax(1).item() == 652


# ---------------------------------------------------------------- Fashion-MNIST CNN


def test_fashion_cnn_shapes() -> None:
    model = FashionCNN().eval()
    out = model(_images(4, 28, channels=1))
    assert out.features.shape == (4, 128) and out.logits.shape == (4, 10)
    assert torch.all(out.features >= 0)


def test_fashion_cnn_without_weights_says_to_train_it(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DFM_FASHION_CNN_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dfm eval train-classifier") as info:
        build_extractor("fashion-cnn")
    # issue 24: where it was looked for and how to make it, not "download None on a machine with internet"
    cached = tmp_path / "checkpoints" / "dfm_fashion_cnn.safetensors"
    message = str(info.value)
    assert "None" not in message and "download" not in message
    assert f"none at {cached}" in message and f"dfm eval train-classifier --out {cached}" in message
    assert "$DFM_FASHION_CNN_WEIGHTS" in message and "--weights fashion-cnn=PATH" in message


def test_classifier_training_is_deterministic(tmp_path) -> None:
    from dfm.eval.extractors.classifier import train_fashion_classifier

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (96, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(96) % 10
    runs = [
        train_fashion_classifier(
            tmp_path / f"c{i}.safetensors",
            images,
            labels,
            images[:20],
            labels[:20],
            epochs=1,
            batch_size=32,
            log=lambda _: None,
        )
        for i in range(2)
    ]
    assert runs[0]["sha256"] == runs[1]["sha256"]  # byte-identical files
    model = build_extractor("fashion-cnn", weights=tmp_path / "c0.safetensors")
    assert model.weights_sha256 == runs[0]["sha256"]
