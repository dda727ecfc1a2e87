"""A small Fashion-MNIST CNN: a domain feature extractor and a class-accuracy judge.

Its 128-d penultimate activations give a domain Fréchet distance (`fd_fashion-cnn`), and its
predictions give the class accuracy of class-conditional samples. Train it once with
`dfm eval train-classifier --out PATH` (deterministic: fixed seed, fixed order, fixed thread count).

Preprocessing: RGB -> grey (ITU-R 601 luma), antialiased bilinear resize to 28x28, then
(x - 0.2860) / 0.3530 (the Fashion-MNIST training-set mean and std).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..weights import WeightsSpec, load_into, resolve_weights, sha256_file
from .base import FeatureExtractor, FeatureOutput, Preprocessing, register_extractor

__all__ = ["FashionCNN", "train_fashion_classifier", "FASHION_CNN_WEIGHTS"]

FASHION_CNN_WEIGHTS = WeightsSpec(
    filename="dfm_fashion_cnn.safetensors",
    url=None,
    env_var="DFM_FASHION_CNN_WEIGHTS",
    make="dfm eval train-classifier --out {path}",
)
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


class FashionCNN(FeatureExtractor):
    """conv(1->32) -> pool -> conv(32->64) -> pool -> conv(64->64) -> fc(3136->128) -> fc(128->10)."""

    name = "fashion-cnn"
    feature_dim = 128
    num_classes = 10
    channels_last = True
    preprocessing = Preprocessing(
        size=28, interpolation="bilinear", antialias=True, mean=(FASHION_MEAN,), std=(FASHION_STD,), channels=1
    )

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def features_and_logits(self, x: torch.Tensor) -> FeatureOutput:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # (N, 32, 14, 14)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # (N, 64, 7, 7)
        x = F.relu(self.bn3(self.conv3(x)))
        features = F.relu(self.fc1(x.flatten(1)))  # (N, 128)
        return FeatureOutput(features, self.fc2(F.dropout(features, 0.3, self.training)))


@register_extractor(
    "fashion-cnn", "Fashion-MNIST domain CNN (train with `dfm eval train-classifier`)", FASHION_CNN_WEIGHTS.env_var
)
def build_fashion_cnn(weights: str | Path | None = None, download: bool = True) -> FashionCNN:
    path = resolve_weights("fashion-cnn", FASHION_CNN_WEIGHTS, weights, download=False)
    model = FashionCNN()
    load_into(model, path, "fashion-cnn")
    model.weights_path, model.weights_sha256 = str(path), sha256_file(path)
    return model


@torch.no_grad()
def classifier_accuracy(model: FashionCNN, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Fraction of images (uint8 (N, C, H, W)) whose argmax prediction equals the label."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size]).logits
        correct += (logits.argmax(1).cpu() == labels[start : start + batch_size]).sum().item()
    return correct / len(images)


def train_fashion_classifier(
    out: str | Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    threads: int = 2,
    log=print,
) -> dict:
    """Train FashionCNN with Adam and a cosine learning rate; save `out` (safetensors) and a summary JSON.

    images are uint8 (N, 1, 28, 28). Determinism: `seed` fixes initialisation and batch order, and the
    thread count is pinned because CPU reductions depend on it.
    """
    from safetensors.torch import save_file

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = FashionCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(images) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    x_all = model.preprocessing(images)  # preprocess once: the data is tiny
    started = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(images), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(model.features_and_logits(x_all[batch]).logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        log(f"epoch {epoch + 1}/{epochs}: train loss {total / len(images):.4f} ({time.time() - started:.0f}s)")
    accuracy = classifier_accuracy(model, test_images, test_labels)
    summary = {
        "test_accuracy": accuracy,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_count": len(images),
        "test_count": len(test_images),
        "seconds": round(time.time() - started, 1),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    # No safetensors metadata: its header order is not stable, and the same command must write the
    # same bytes. The training summary goes to a JSON file beside the weights instead.
    tmp = out.with_name(f".{out.name}.tmp")  # written whole, then renamed: never half-written
    save_file(state, str(tmp))
    tmp.replace(out)
    summary["sha256"] = sha256_file(out)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary
