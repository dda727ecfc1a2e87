"""Shared by the tests that train real (tiny) runs: the tiny model settings and the Fashion-MNIST skip marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
#: skip a test where Fashion-MNIST is not installed (Debian package dataset-fashion-mnist, or $DFM_DATA_DIR)
needs_data = pytest.mark.skipif(
    not FMNIST.exists() and not os.environ.get("DFM_DATA_DIR"), reason="Fashion-MNIST not installed"
)
#: `dfm train` overrides for a model that trains in well under a second per step on one thread
TINY_RUN = [
    "-o", "model.overrides.depth=1", "-o", "model.overrides.hidden_size=32", "-o", "model.overrides.num_heads=2",
    "-o", "train.num_sample_images=2", "-o", "optim.warmup_steps=2", "-o", "train.threads=1",
    "-o", "train.sample_every=0",
]  # fmt: skip
