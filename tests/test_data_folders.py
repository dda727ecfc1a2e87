"""Image and video folders: discovery, ADM centre crop, errors on bad files."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dfm.data import ImageFolderDataset, VideoFolderDataset, build_dataset
from dfm.data.image_folder import center_crop_adm


def save_image(path: Path, height: int, width: int, value: int | None = None, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    if value is None:
        array = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    else:
        array = np.full((height, width, 3), value, np.uint8)
    Image.fromarray(array).save(path)
    return array


@settings(max_examples=40, deadline=None)
@given(width=st.integers(16, 400), height=st.integers(16, 400), resolution=st.integers(1, 16))
def test_center_crop_adm_exact_size(width, height, resolution):
    image = Image.new("RGB", (width, height), (10, 20, 30))
    out = center_crop_adm(image, resolution)
    assert out.size == (resolution, resolution)
    assert np.asarray(out)[resolution // 2, resolution // 2].tolist() == [10, 20, 30]


def test_center_crop_adm_takes_the_centre():
    # left third black, middle white, right third black: a crop of the centre square is all white
    array = np.zeros((32, 96, 3), np.uint8)
    array[:, 32:64] = 255
    out = np.asarray(center_crop_adm(Image.fromarray(array), 16))
    assert out.min() >= 250


def test_image_folder_classes_and_range(tmp_path):
    for name, count in [("cat", 2), ("dog", 3)]:
        for i in range(count):
            save_image(tmp_path / name / f"{i}.png", 40, 30, seed=i)
    save_image(tmp_path / "dog" / "nested" / "x.jpg", 20, 20)
    ds = ImageFolderDataset(tmp_path, resolution=16, random_flip=False)
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert len(ds) == 6 and [y for _, y in ds.samples] == [0, 0, 1, 1, 1, 1]
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.item() == 0
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5 and x.max() > 0.5


def test_image_folder_exact_values_and_grey_mode(tmp_path):
    save_image(tmp_path / "a.png", 16, 16, value=255)
    ds = ImageFolderDataset(tmp_path, resolution=16, random_flip=False, mode="L")
    x, y = ds[0]
    assert x.shape == (1, 16, 16) and torch.all(x == 1.0) and y.item() == 0
    assert ds.class_names == [tmp_path.name]


def test_image_folder_flip(tmp_path):
    save_image(tmp_path / "a.png", 8, 8, seed=3)
    ds = ImageFolderDataset(tmp_path, resolution=8, random_flip=True)
    plain, _ = ds.load(0, augment=False)
    outcomes = []
    for seed in range(20):
        x, _ = ds.load(0, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(x, plain) or torch.equal(x, plain.flip(-1))
        outcomes.append(torch.equal(x, plain))
    assert any(outcomes) and not all(outcomes)


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path, resolution=8)


def test_corrupt_image_error_names_file(tmp_path):
    save_image(tmp_path / "a" / "good.png", 16, 16)
    (tmp_path / "a" / "bad.png").write_bytes(b"\x89PNG not really")
    ds = ImageFolderDataset(tmp_path, resolution=8)
    with pytest.raises(ValueError, match="bad.png"):
        ds[0]  # sorted: bad.png comes first


def test_too_small_image_error_and_upscale(tmp_path):
    save_image(tmp_path / "small.png", 6, 10)
    with pytest.raises(ValueError, match=r"small.png is 10x6, smaller than resolution 8"):
        ImageFolderDataset(tmp_path, resolution=8)[0]
    x, _ = ImageFolderDataset(tmp_path, resolution=8, upscale=True)[0]
    assert x.shape == (3, 8, 8)


def test_skip_bad_warns_and_drops(tmp_path):
    save_image(tmp_path / "a" / "good.png", 16, 16)
    save_image(tmp_path / "a" / "tiny.png", 4, 4)
    (tmp_path / "a" / "broken.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipped 2"):
        ds = ImageFolderDataset(tmp_path, resolution=8, skip_bad=True)
    assert [p.name for p, _ in ds.samples] == ["good.png"]


def test_skip_bad_decodes_and_leaves_out_a_truncated_jpeg(tmp_path):
    # Image.verify() does not decode: a JPEG without its last 50 bytes passed the check, then failed mid-run
    save_image(tmp_path / "a" / "0.png", 16, 16, seed=0)
    save_image(tmp_path / "a" / "1.jpg", 20, 24, seed=1)
    save_image(tmp_path / "b" / "2.jpeg", 24, 20, seed=2)
    cut = tmp_path / "b" / "cut.jpg"
    save_image(cut, 32, 32, seed=3)
    cut.write_bytes(cut.read_bytes()[:-50])

    ds = ImageFolderDataset(tmp_path, resolution=8)
    assert [p.name for p, _ in ds.samples] == ["0.png", "1.jpg", "2.jpeg", "cut.jpg"]
    with pytest.raises(ValueError, match=r"cannot read image .*cut\.jpg: image file is truncated.*--skip-bad"):
        ds.get_batch(torch.arange(4))

    with pytest.warns(UserWarning, match=r"skipped 1 .*b/cut\.jpg \(OSError: image file is truncated"):
        ds = ImageFolderDataset(tmp_path, resolution=8, skip_bad=True)
    assert [p.name for p, _ in ds.samples] == ["0.png", "1.jpg", "2.jpeg"]
    for indices in (torch.arange(3), torch.tensor([2, 0]), torch.tensor([1])):  # every batch loads
        x, y = ds.get_batch(indices, generator=torch.Generator().manual_seed(0))
        assert x.shape == (len(indices), 3, 8, 8) and y.tolist() == [[0, 0, 1][i] for i in indices]
    # the same files give the same items at every start (a resume draws the same batches)
    with pytest.warns(UserWarning, match="skipped 1"):
        again = ImageFolderDataset(tmp_path, resolution=8, skip_bad=True)
    assert again.samples == ds.samples
    torch.testing.assert_close(again.get_batch(torch.arange(3), augment=False)[0],
                               ds.get_batch(torch.arange(3), augment=False)[0])  # fmt: skip


def save_grey(path: Path, size: int, seed: int = 0, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, size=(size, size), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path)


def test_grey_folder_gives_one_channel(tmp_path):
    save_grey(tmp_path / "a" / "0.png", 12, seed=0)
    save_grey(tmp_path / "a" / "1.jpg", 12, seed=1)
    save_grey(tmp_path / "b" / "2.png", 12, seed=2, mode="LA")  # grey with alpha is grey too
    for skip_bad in (False, True):
        ds = build_dataset(tmp_path, resolution=8, train=False, skip_bad=skip_bad)
        assert ds.channels == 1 and ds.sample_shape == (1, 8, 8) and ds.mode == "L"
        x, y = ds.get_batch(torch.arange(3))
        assert x.shape == (3, 1, 8, 8) and y.tolist() == [0, 0, 1]
    expected = torch.from_numpy(np.asarray(center_crop_adm(Image.open(tmp_path / "a" / "0.png"), 8)).copy())
    torch.testing.assert_close(ds[0][0][0], expected.float() / 127.5 - 1)
    # asked for: RGB all the same (the grey repeated on the three channels)
    rgb = ImageFolderDataset(tmp_path, resolution=8, random_flip=False, mode="RGB")
    assert rgb.sample_shape == (3, 8, 8)
    x = rgb[0][0]
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]) and torch.equal(x[0], ds[0][0][0])


def test_mixed_grey_and_colour_folder_is_rgb(tmp_path):
    save_grey(tmp_path / "0.png", 12)
    save_image(tmp_path / "1.png", 12, 12, seed=1)
    save_grey(tmp_path / "2.png", 12, seed=2)
    ds = ImageFolderDataset(tmp_path, resolution=8, random_flip=False)
    assert ds.channels == 3 and ds.sample_shape == (3, 8, 8)
    grey = ds[0][0]
    assert grey.shape == (3, 8, 8) and torch.equal(grey[0], grey[2])
    assert ImageFolderDataset(tmp_path, resolution=8, mode="L").sample_shape == (1, 8, 8)
    with pytest.raises(ValueError, match="mode='CMYK' is not supported"):
        ImageFolderDataset(tmp_path, resolution=8, mode="CMYK")


def test_too_small_error_names_what_the_user_can_pass(tmp_path):
    save_image(tmp_path / "small.png", 6, 10)
    with pytest.raises(ValueError, match=r"allow upscaling \(upscale=True\)"):
        ImageFolderDataset(tmp_path, resolution=8)[0]
    with pytest.raises(ValueError, match=r"smaller --resolution, remove the image, or allow upscaling with --upscale$"):
        ImageFolderDataset(tmp_path, resolution=8, upscale_flag="--upscale")[0]


def test_pad_adds_a_recorded_border_before_resizing(tmp_path):
    save_image(tmp_path / "a.png", 28, 28)
    padded = ImageFolderDataset(tmp_path, resolution=32, pad=2, random_flip=False)
    assert padded.padding == 2 and padded.sample_shape == (3, 32, 32)
    x, _ = padded[0]
    assert torch.equal(x[:, 2:-2, 2:-2], ImageFolderDataset(tmp_path, 28, random_flip=False)[0][0])  # unscaled
    border = torch.ones(3, 32, 32, dtype=torch.bool)
    border[:, 2:-2, 2:-2] = False
    assert bool((x[border] == -1).all())  # black, as Fashion-MNIST's background
    assert ImageFolderDataset(tmp_path, resolution=64, pad=2, upscale=True).padding == 4  # scaled with the image
    assert ImageFolderDataset(tmp_path, resolution=16, pad=2).padding == 1
    assert ImageFolderDataset(tmp_path, resolution=20, pad=2).padding == 0  # 1.25 pixels: not a whole border
    assert ImageFolderDataset(tmp_path, resolution=32).padding == 0
    with pytest.raises(ValueError, match=r"is 28x28 with a border of 1, smaller than resolution 32; .* pad=2$"):
        ImageFolderDataset(tmp_path, resolution=32, pad=1)[0]
    with pytest.raises(ValueError, match="-o data.pad=-1 must be a whole number"):
        ImageFolderDataset(tmp_path, resolution=32, pad=-1, pad_flag="-o data.pad")
    flags = {"upscale_flag": "-o data.upscale=true", "pad_flag": "-o data.pad"}
    with pytest.raises(ValueError, match=r"upscaling with -o data.upscale=true, or add a border with -o data.pad=2$"):
        ImageFolderDataset(tmp_path, resolution=32, **flags)[0]
    with pytest.warns(UserWarning, match="skipped 1"):  # skip_bad counts the border in
        save_image(tmp_path / "b.png", 20, 20)
        assert [p.name for p, _ in ImageFolderDataset(tmp_path, 32, pad=2, skip_bad=True).samples] == ["a.png"]


def test_mixed_layout_is_an_error(tmp_path):
    save_image(tmp_path / "loose.png", 8, 8)
    save_image(tmp_path / "cls" / "a.png", 8, 8)
    with pytest.raises(ValueError, match="both images"):
        ImageFolderDataset(tmp_path, resolution=8)


def test_build_dataset_folder_needs_resolution(tmp_path):
    save_image(tmp_path / "a.png", 8, 8)
    with pytest.raises(ValueError, match="resolution"):
        build_dataset(tmp_path)
    ds = build_dataset(tmp_path, resolution=8, train=False)
    assert isinstance(ds, ImageFolderDataset) and not ds.random_flip


# ----------------------------------------------------------------------------- video folders


def make_clip(directory: Path, frames: int, size: int = 12) -> list[np.ndarray]:
    return [save_image(directory / f"{t:03d}.png", size, size, value=10 * t) for t in range(frames)]


def test_video_folder_frames_in_order(tmp_path):
    make_clip(tmp_path / "walk" / "clip0", 6)
    make_clip(tmp_path / "run" / "clip0", 4)
    ds = VideoFolderDataset(tmp_path, frames=4, resolution=8, random_offset=False)
    assert ds.class_names == ["run", "walk"] and len(ds) == 2
    x, y = ds[1]
    assert x.shape == (3, 4, 8, 8) and y.item() == 1
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([0, 10, 20, 30]) / 127.5 - 1)
    assert ds.sample_shape == (3, 4, 8, 8) and ds.frames == 4 and ds.is_video


def test_video_folder_random_offset_and_stride(tmp_path):
    make_clip(tmp_path / "clip0", 10)
    ds = VideoFolderDataset(tmp_path, frames=3, resolution=8, stride=2)
    starts = set()
    for seed in range(30):
        x, _ = ds.load(0, generator=torch.Generator().manual_seed(seed))
        values = torch.round((x[0, :, 0, 0] + 1) * 127.5).tolist()
        assert values[1] - values[0] == 20 and values[2] - values[1] == 20
        starts.add(values[0])
    assert starts == {0, 10, 20, 30, 40, 50}  # span 5 of 10 frames: starts 0..5


def test_video_folder_short_clip_error(tmp_path):
    make_clip(tmp_path / "clip0", 3)
    ds = VideoFolderDataset(tmp_path, frames=5, resolution=8)
    with pytest.raises(ValueError, match="clip0 has 3 frames but 5"):
        ds[0]


def test_video_folder_gif_and_missing_imageio(tmp_path, monkeypatch):
    pytest.importorskip("imageio")
    frames = [Image.fromarray(np.full((12, 12, 3), 40 * t, np.uint8)) for t in range(4)]
    for name in ("jump", "sit"):
        (tmp_path / name).mkdir()
        frames[0].save(tmp_path / name / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    ds = build_dataset(tmp_path, resolution=8, frames=4, train=False)
    assert ds.class_names == ["jump", "sit"] and len(ds) == 2
    x, y = ds[1]
    assert x.shape == (3, 4, 8, 8) and y.item() == 1
    torch.testing.assert_close(x[0, :, 4, 4], torch.tensor([0.0, 40, 80, 120]) / 127.5 - 1, atol=0.02, rtol=0)
    monkeypatch.setitem(sys.modules, "imageio", None)
    monkeypatch.setitem(sys.modules, "imageio.v3", None)
    with pytest.raises(ImportError, match=r'pip install "dfm\[video\]"'):
        VideoFolderDataset(tmp_path, frames=4, resolution=8)


def test_video_folder_empty_is_an_error(tmp_path):
    (tmp_path / "cls").mkdir()
    with pytest.raises(ValueError, match="no clips"):
        VideoFolderDataset(tmp_path, frames=2, resolution=8)
