"""Moving Fashion-MNIST: determinism per clip, shapes, range, objects stay in the frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfm.data import MovingFashionMNIST, build_dataset
from dfm.data import fashion_mnist as fm


@pytest.fixture
def fake_fashion(monkeypatch):
    """Replace the Fashion-MNIST files with 20 bright random items (no files needed)."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(100, 256, size=(20, 28, 28), dtype=np.uint8))
    labels = torch.arange(20) % 10

    def fake_load(root=None, split="train", download=False):
        return (images, labels) if split == "train" else (images[:10].flip(-1).contiguous(), labels[:10])

    monkeypatch.setattr("dfm.data.moving_objects.load_fashion_mnist", fake_load)
    return images, labels


def test_clip_is_identical_across_objects_and_distinct_across_indices(fake_fashion):
    a = MovingFashionMNIST(num_clips=10, frames=8, size=32, objects=2, seed=3)
    b = MovingFashionMNIST(num_clips=10, frames=8, size=32, objects=2, seed=3)
    for i in (0, 7):
        xa, ya = a[i]
        xb, yb = b[i]
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], a[1][0])
    other_seed = MovingFashionMNIST(num_clips=10, frames=8, size=32, objects=2, seed=4)
    assert not torch.equal(a[0][0], other_seed[0][0])


@pytest.mark.parametrize("frames, size, objects", [(8, 32, 1), (16, 64, 1), (4, 48, 3)])
def test_shapes_range_and_label(fake_fashion, frames, size, objects):
    _, labels = fake_fashion
    ds = MovingFashionMNIST(num_clips=5, frames=frames, size=size, objects=objects)
    x, y = ds[2]
    assert x.shape == (1, frames, size, size) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() <= 1.0 and x.max() > 0  # background and bright items
    assert y.dtype == torch.int64 and y.item() == labels[ds.trajectory(2).image_indices[0]].item()
    assert ds.sample_shape == (1, frames, size, size) and ds.frames == frames and ds.num_classes == 10
    assert ds.object_size == round(size * 28 / 64)


def test_objects_stay_inside_and_pixels_outside_are_background(fake_fashion):
    ds = MovingFashionMNIST(num_clips=40, frames=12, size=32, objects=2, speed=(6.0, 12.0))
    room = 32 - ds.object_size
    moved = False
    for i in range(len(ds)):
        track = ds.trajectory(i)
        assert track.positions.shape == (12, 2, 2)
        assert track.positions.min() >= 0 and track.positions.max() <= room
        moved |= bool(np.any(track.positions[0] != track.positions[-1]))
        x, _ = ds[i]
        inside = torch.zeros(12, 32, 32, dtype=torch.bool)
        for t in range(12):
            for row, col in track.positions[t]:
                inside[t, row : row + ds.object_size, col : col + ds.object_size] = True
        assert torch.all(x[0][~inside] == -1.0)
        assert torch.all(x[0][inside] > -1.0)  # fake items are bright everywhere
    assert moved


def test_bounce_reverses_direction(fake_fashion):
    ds = MovingFashionMNIST(num_clips=30, frames=40, size=32, speed=(6.0, 8.0))
    steps = np.diff(ds.trajectory(0).positions[:, 0], axis=0)  # (T-1, 2)
    # with 40 frames at >= 3 px/frame in a 18 px room, each axis with motion changes sign
    for axis in range(2):
        if np.abs(steps[:, axis]).sum() > 0:
            assert (steps[:, axis] > 0).any() and (steps[:, axis] < 0).any()


def test_split_changes_the_items(fake_fashion):
    train = MovingFashionMNIST(num_clips=3, frames=4, size=32, split="train")
    test = MovingFashionMNIST(num_clips=3, frames=4, size=32, split="test")
    assert not torch.equal(train[0][0], test[0][0])


def test_bad_settings_are_rejected(fake_fashion):
    with pytest.raises(ValueError, match="object_size=40"):
        MovingFashionMNIST(num_clips=3, size=32, object_size=40)
    with pytest.raises(ValueError, match="num_clips=0"):
        MovingFashionMNIST(num_clips=0)
    with pytest.raises(IndexError, match="clip index 3"):
        MovingFashionMNIST(num_clips=3, size=32)[3]


def test_build_dataset_moving_fashion_mnist(fake_fashion):
    ds = build_dataset("moving-fashion-mnist", resolution=32, frames=8, num_clips=12, train=False)
    assert isinstance(ds, MovingFashionMNIST) and len(ds) == 12 and ds.split == "test"
    x, y = ds.get_batch(torch.tensor([0, 5]))
    assert x.shape == (2, 1, 8, 32, 32) and y.shape == (2,)


@pytest.mark.skipif(fm.find_fashion_mnist(split="test") is None, reason="Fashion-MNIST files not installed")
def test_real_fashion_mnist_clip():
    ds = MovingFashionMNIST(num_clips=2, frames=8, size=32, split="test")
    x, y = ds[0]
    assert x.shape == (1, 8, 32, 32) and 0 <= y.item() < 10
