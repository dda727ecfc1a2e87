"""Fashion-MNIST loading: idx parsing, lookup order, errors, and the dataset's transforms."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dfm.data import build_dataset
from dfm.data import fashion_mnist as fm
from dfm.data.fashion_mnist import FashionMNIST, IdxFormatError, load_fashion_mnist, read_idx


def write_idx(path: Path, array: np.ndarray, magic_type: int = 0x08, compress: bool = True) -> None:
    header = struct.pack(">HBB", 0, magic_type, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_split(directory: Path, split: str, n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    image_name, label_name = fm.FILES[split]
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / image_name, images)
    write_idx(directory / label_name, labels)
    return images, labels


@pytest.fixture(autouse=True)
def no_default_locations(monkeypatch, tmp_path):
    """Point the system locations at empty folders so tests see only the files they make."""
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(fm, "CACHE_DIR", tmp_path / "no-cache")
    monkeypatch.delenv("DFM_DATA_DIR", raising=False)


def test_read_idx_round_trip_gz_and_plain(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "a.idx", array, compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz", ndim=3), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx", ndim=3), array)


def test_load_explicit_root_gives_exact_arrays(tmp_path):
    images, labels = make_split(tmp_path / "fashion-mnist", "test")
    x, y = load_fashion_mnist(tmp_path / "fashion-mnist", split="test")
    assert x.dtype == torch.uint8 and x.shape == (6, 28, 28)
    assert y.dtype == torch.int64
    np.testing.assert_array_equal(x.numpy(), images)
    np.testing.assert_array_equal(y.numpy(), labels)
    # root/fashion-mnist works too
    x2, _ = load_fashion_mnist(tmp_path, split="test")
    assert torch.equal(x, x2)


def test_lookup_order_env_before_cache(tmp_path, monkeypatch):
    env_images, _ = make_split(tmp_path / "env" / "fashion-mnist", "train", seed=1)
    make_split(tmp_path / "no-cache", "train", seed=2)
    monkeypatch.setenv("DFM_DATA_DIR", str(tmp_path / "env"))
    x, _ = load_fashion_mnist(split="train")
    np.testing.assert_array_equal(x.numpy(), env_images)
    monkeypatch.delenv("DFM_DATA_DIR")
    x, _ = load_fashion_mnist(split="train")
    assert not np.array_equal(x.numpy(), env_images)  # now the cache directory's copy


def test_repeated_loads_hit_memory_cache(tmp_path):
    make_split(tmp_path, "test")
    a, _ = load_fashion_mnist(tmp_path, "test")
    b, _ = load_fashion_mnist(tmp_path, "test")
    assert a is b


def test_missing_files_error_says_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_fashion_mnist(tmp_path / "empty", "train")
    assert "--data-dir" in str(info.value)


def test_bad_split_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="split=.validation."):
        load_fashion_mnist(tmp_path, "validation")


@pytest.mark.parametrize(
    "corruption, message",
    [
        ("magic", "magic"),
        ("truncated", "declares shape"),
        ("not-gzip", "cannot read"),
    ],
)
def test_corrupt_image_file_names_the_file(tmp_path, corruption, message):
    make_split(tmp_path, "test")
    path = tmp_path / fm.FILES["test"][0]
    array = np.zeros((6, 28, 28), np.uint8)
    if corruption == "magic":
        write_idx(path, array, magic_type=0x0D)  # float data instead of unsigned bytes
    elif corruption == "truncated":
        raw = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(raw[:-10]))
    else:
        path.write_bytes(b"this is not gzip")
    with pytest.raises(IdxFormatError, match=message) as info:
        load_fashion_mnist(tmp_path, "test")
    assert str(path) in str(info.value)


def test_label_count_mismatch_is_an_error(tmp_path):
    make_split(tmp_path, "test", n=6)
    write_idx(tmp_path / fm.FILES["test"][1], np.zeros(5, np.uint8))
    with pytest.raises(IdxFormatError, match="6 images but .* 5"):
        load_fashion_mnist(tmp_path, "test")


def test_dataset_pads_to_32_with_background(tmp_path):
    images, labels = make_split(tmp_path, "test")
    ds = FashionMNIST(tmp_path, split="test")
    x, y = ds[1]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert y.item() == labels[1]
    # the 2-pixel border is background (-1), the centre is the image mapped to [-1, 1]
    assert torch.all(x[:, :2] == -1) and torch.all(x[:, -2:] == -1) and torch.all(x[:, :, :2] == -1)
    expected = torch.from_numpy(images[1]).float() / 127.5 - 1
    torch.testing.assert_close(x[0, 2:30, 2:30], expected)
    assert ds.num_classes == 10 and ds.channels == 1 and ds.resolution == 32
    assert ds.class_names[9] == "Ankle boot" and not ds.needs_vae


def test_dataset_resolutions_and_tensors(tmp_path):
    images, _ = make_split(tmp_path, "test")
    native = FashionMNIST(tmp_path, split="test", resolution=28)
    torch.testing.assert_close(native[0][0][0], torch.from_numpy(images[0]).float() / 127.5 - 1)
    big = FashionMNIST(tmp_path, split="test", resolution=64)
    x, y = big.tensors()
    assert x.shape == (6, 1, 64, 64) and y.shape == (6,)
    assert x.min() >= -1 and x.max() <= 1
    batch_x, batch_y = big.get_batch(torch.tensor([3, 0]))
    torch.testing.assert_close(batch_x, x[[3, 0]])
    assert batch_y.tolist() == [3, 0]


def test_random_flip(tmp_path):
    make_split(tmp_path, "test")
    ds = FashionMNIST(tmp_path, split="test", random_flip=True)
    plain, _ = ds.tensors()
    flipped, _ = ds.get_batch(torch.arange(6), generator=torch.Generator().manual_seed(0))
    for a, b in zip(plain, flipped):
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)
    assert not torch.equal(plain, flipped)


def test_build_dataset_fashion_mnist(tmp_path):
    make_split(tmp_path, "train")
    ds = build_dataset("fashion-mnist", data_dir=tmp_path)
    assert isinstance(ds, FashionMNIST) and len(ds) == 6 and ds.sample_shape == (1, 32, 32)


def test_build_dataset_unknown_name():
    with pytest.raises(ValueError, match="'imagenet-9000'"):
        build_dataset("imagenet-9000")


@pytest.mark.skipif(
    not (Path("/usr/share/datasets/fashion-mnist") / fm.FILES["test"][0]).is_file(),
    reason="Debian dataset-fashion-mnist is not installed",
)
def test_real_debian_files(monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_DIR", Path("/usr/share/datasets/fashion-mnist"))
    x, y = load_fashion_mnist(split="test")
    assert x.shape == (10_000, 28, 28) and y.shape == (10_000,)
    assert torch.bincount(y).tolist() == [1000] * 10


def test_download_writes_files_atomically(tmp_path, monkeypatch):
    source = tmp_path / "server"
    images, _ = make_split(source, "test")
    requested = []

    class Response:
        def __init__(self, url):
            requested.append(url)
            self.data = (source / url.rsplit("/", 1)[1]).read_bytes()

        def read(self):
            return self.data

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

    monkeypatch.setattr(fm.urllib.request, "urlopen", lambda url, timeout: Response(url))
    x, _ = load_fashion_mnist(tmp_path / "dl", "test", download=True)
    np.testing.assert_array_equal(x.numpy(), images)
    assert requested == [fm.URL + name for name in fm.FILES["test"]]
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == sorted(fm.FILES["test"])


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise fm.urllib.error.URLError("no network")

    monkeypatch.setattr(fm.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match="download failed.*apt-get install"):
        load_fashion_mnist(tmp_path / "dl", "test", download=True)
    assert list((tmp_path / "dl").iterdir()) == []  # no half-written files
