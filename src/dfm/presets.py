"""Named run configs (``dfm train --preset NAME``) and the baselines' twins of a DFM config.

Example:
    >>> from dfm.presets import get_preset, with_method
    >>> fm = with_method(get_preset("quickstart"), "fm")
    >>> fm.method.stages, fm.sampler.steps
    (1, (20,))
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from dfm.config import DataConfig, MethodConfig, ModelConfig, OptimConfig, RunConfig, SamplerConfig, TrainConfig
from dfm.methods import get_method
from dfm.resolve import resolve


def with_method(cfg: RunConfig, method: str) -> RunConfig:
    """The same run with another method: same backbone, data, optimiser and number of network evaluations.

    ``fm`` becomes one stage with all sampling steps; ``cascade`` and ``pyramidal`` keep DFM's stages and split the
    steps equally among them (the paper's 20 + 20 for the two-stage cascade, equal steps per stage for Pyramidal
    Flow, which also runs three or more stages).
    """
    entry = get_method(method)
    if method == cfg.method.name:
        return copy.deepcopy(cfg)
    if cfg.method.name != "dfm":
        raise ValueError(f"switch to {method} from a DFM config (this one is {cfg.method.name})")
    return resolve(entry.from_dfm(copy.deepcopy(cfg)))


def _fmnist() -> tuple[MethodConfig, SamplerConfig]:
    """The method and sampler of the Fashion-MNIST presets, measured best at CPU budgets (docs/RESULTS.md): p(Q=1) =
    0.5 instead of the paper's 0.9 (the fine level needs more of the training signal), the EDM loss weighting (each
    stage's error in its network's unit-variance target space, so the quiet fine level gets its share), the network
    predicting the clean data rather than the velocity (better for DFM and Flow Matching on garments, photographs and
    glyphs alike), Heun with 15 + 5 steps (39 network evaluations, as many as 30 + 10 Euler steps less one), and
    the threshold τ = 0.9 instead of the paper's 0.7 at 512 px (a lower FD with data prediction on all three kinds of
    data, on two seeds; the paper calls 0.9 the robust default)."""
    return (MethodConfig(stage_probs=(0.5, 0.5), loss_weighting="edm", prediction="data"),
            SamplerConfig(steps=(15, 5), thresholds=(0.9,), solver="heun"))  # fmt: skip


def _quickstart() -> RunConfig:
    # 2 CPU cores, about 10 minutes: a 1.4M-parameter DiT on 32x32 Fashion-MNIST, 64 tokens, fp32 (bf16 autocast is
    # slower than fp32 for a model this small on a CPU). Short runs need a larger learning rate and a short warm-up.
    method, sampler = _fmnist()
    return RunConfig(
        method=method,
        sampler=sampler,
        model=ModelConfig("DFM-DiT-Tiny"),
        data=DataConfig("fashion-mnist", resolution=32),
        optim=OptimConfig(lr=1e-3, warmup_steps=200, ema_decay=0.999),
        train=TrainConfig(
            steps=1800, batch_size=64, precision="fp32", log_every=25, sample_every=600, ckpt_every=600, keep_last=2
        ),
        preset="quickstart",
    )


def _fashion_mnist() -> RunConfig:
    # The method.md section 9 setting (1.3M DiT, 64 tokens, 3,000 steps of batch 64) with the Fashion-MNIST method.
    cfg = _quickstart()
    cfg.train = TrainConfig(steps=3000, batch_size=64, precision="fp32", log_every=50, sample_every=1000,
                            ckpt_every=1000)  # fmt: skip
    return cfg


def _imagenet512(model: str, steps: int) -> RunConfig:
    # Paper: FLUX-VAE latents of ImageNet-512 (64x64x16 for FLUX; 4 channels for SD-VAE), batch 256, lr 1e-4 with
    # 10k warm-up, EMA 0.9999, 30 + 10 Euler steps at τ = 0.7. Point data.dataset at a `dfm prepare` directory.
    return RunConfig(
        method=MethodConfig(),
        sampler=SamplerConfig(steps=(30, 10), thresholds=(0.7,)),
        model=ModelConfig(model, {"num_classes": 1000}),
        data=DataConfig("data/imagenet512-latents", resolution=None, random_flip=False, num_workers=8),
        optim=OptimConfig(),
        train=TrainConfig(steps=steps, batch_size=256, precision="bf16", ckpt_every=10000, sample_every=10000),
    )


def _video_quickstart() -> RunConfig:
    # Moving Fashion-MNIST clips (8 frames of 32x32, one item bouncing), a spatial pyramid per frame as in the
    # paper, per-stage standardisation on (the paper's video setting). Patch 8 keeps it at 16 tokens per frame,
    # 128 per clip, so that it trains on 2 CPU cores.
    return RunConfig(
        method=MethodConfig(stage_probs=(0.7, 0.3), standardize=True),
        sampler=SamplerConfig(steps=(20, 20), thresholds=(0.7,)),
        model=ModelConfig("DFM-DiT-Tiny", {"patch_size": 8}),
        data=DataConfig("moving-fashion-mnist", resolution=32, frames=8, num_clips=20000),
        optim=OptimConfig(lr=1e-3, warmup_steps=200, ema_decay=0.999),
        train=TrainConfig(
            steps=2000,
            batch_size=32,
            precision="fp32",
            log_every=25,
            sample_every=500,
            ckpt_every=500,
            keep_last=2,
            num_sample_images=16,
        ),  # fmt: skip
        preset="video-quickstart",
    )


def _video_gpu() -> RunConfig:
    # A GPU-sized video run: 16 frames of 64x64, DiT-S with patch 4 (256 tokens per frame, 4096 per clip).
    return RunConfig(
        method=MethodConfig(standardize=True),
        sampler=SamplerConfig(steps=(30, 10), thresholds=(0.7,)),
        model=ModelConfig("DFM-DiT-S/4", {"num_classes": 10}),
        data=DataConfig("moving-fashion-mnist", resolution=64, frames=16, num_clips=100000, num_workers=8),
        optim=OptimConfig(lr=2e-4, warmup_steps=1000, ema_decay=0.9999),
        train=TrainConfig(
            steps=100_000, batch_size=64, precision="bf16", sample_every=5000, ckpt_every=5000, num_sample_images=16
        ),  # fmt: skip
        preset="video-s",
    )


def _named(make: Callable[[], RunConfig], name: str, method: str = "dfm") -> Callable[[], RunConfig]:
    def preset() -> RunConfig:
        cfg = with_method(resolve(make()), method)
        cfg.preset = name
        return cfg

    return preset


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "quickstart": _named(_quickstart, "quickstart"),
    "quickstart-fm": _named(_quickstart, "quickstart-fm", "fm"),
    "fmnist-dfm": _named(_fashion_mnist, "fmnist-dfm"),
    "fmnist-fm": _named(_fashion_mnist, "fmnist-fm", "fm"),
    "video-quickstart": _named(_video_quickstart, "video-quickstart"),
    "video-quickstart-fm": _named(_video_quickstart, "video-quickstart-fm", "fm"),
    "video-s": _named(_video_gpu, "video-s"),
    "imagenet512-xl": _named(lambda: _imagenet512("DFM-DiT-XL/2", 500_000), "imagenet512-xl"),
    "imagenet512-b": _named(lambda: _imagenet512("DFM-DiT-B/2", 600_000), "imagenet512-b"),
}


def get_preset(name: str) -> RunConfig:
    """A fresh, resolved copy of the preset ``name``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
