"""Offline photo-crop and glyph data sets (dfm.data.photos), on small synthetic photographs and Pillow's own fonts.

Nothing here needs the Debian wallpaper or font packages: the "photographs" are drawn with numpy, and the fonts
are Pillow's built-in ones (its FreeType default font at a size, its bitmap font, and a transposed font).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from dfm.data import build_dataset
from dfm.data import photos as P
from dfm.decomposition import LaplacianPyramid, estimate_level_std

RES = (16, 32)
SMALL = dict(resolutions=RES, crops_per_photo=4, scales=(0.5, 1.0), min_size=100, val_fraction=0.17,
             test_fraction=0.17, progress=False)  # fmt: skip


def _photo(rng: np.random.Generator, w: int = 300, h: int = 200) -> Image.Image:
    """A fake photograph: a colour gradient, noise texture and a few hard-edged rectangles."""
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.stack([xx, yy, 1 - xx], -1) * rng.uniform(80, 200, 3) + rng.normal(0, 18, (h, w, 3))
    for _ in range(4):
        x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
        img[y0 : y0 + rng.integers(10, 40), x0 : x0 + rng.integers(10, 40)] = rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    """6 good photographs (PNG, JPEG), a copy, a smaller variant, a flat gradient, a tiny and a transparent image."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        _photo(rng).save(src / ("sub" if i % 2 else "") / f"p{i}.{'png' if i < 3 else 'jpg'}", quality=95)
    shutil.copy(src / "p0.png", src / "copy-of-p0.png")  # the same bytes: one photograph
    Image.open(src / "p2.png").resize((150, 100)).save(src / "p2_150x100.png")  # a smaller variant of p2
    grad = np.linspace(0, 255, 300)[None, :, None].repeat(200, 0).repeat(3, 2)
    Image.fromarray(grad.astype(np.uint8)).save(src / "gradient.png")  # flat: no fine detail
    _photo(rng, 60, 50).save(src / "tiny.png")
    Image.new("RGBA", (300, 200), (255, 0, 0, 0)).save(src / "transparent.png")
    (src / "notes.txt").write_text("not an image")
    return src


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _manifest(root: Path) -> dict:
    info = json.loads((root / "manifest.json").read_text())
    info.pop("build")
    return info


def test_photos_split_by_source_sizes_and_counts(photo_dir: Path, tmp_path: Path) -> None:
    info = P.build_photo_dataset([photo_dir], tmp_path / "out", seed=0, **SMALL)
    kept = info["photographs"]
    assert len(kept) == 6 and info["counts"] == {"fit": 16, "val": 4, "test": 4}
    assert sorted(r["split"] for r in kept) == ["fit"] * 4 + ["test", "val"]
    reasons = {Path(s["file"]).name: s["reason"] for s in info["skipped"]}
    assert set(reasons) == {"gradient.png", "tiny.png", "transparent.png"}
    names = sorted(sorted(Path(f).name for f in [r["file"], *r["variants"]]) for r in kept)
    assert names[:2] == [["copy-of-p0.png", "p0.png"], ["p1.png"]] and ["p2.png", "p2_150x100.png"] in names
    p2 = next(r for r in kept if "p2" in r["file"])
    assert Path(p2["file"]).name == "p2.png"  # of the variants of one photograph, the largest is used
    split_of = {r["sha256"][:12]: r["split"] for r in kept}
    for r in RES:
        for split in P.SPLITS:
            files = sorted((tmp_path / "out" / str(r) / split).iterdir())
            assert len(files) == info["counts"][split]
            for f in files:  # every crop of a photograph lies in that photograph's split, at the right size
                assert split_of[f.name[:12]] == split
                assert Image.open(f).size == (r, r) and Image.open(f).mode == "RGB"
    assert {item["source"] for item in info["images"]} == set(split_of)
    assert all(split_of[item["source"]] == item["file"].split("/")[0] for item in info["images"])
    assert (tmp_path / "out" / "sheet_32.png").is_file()


def test_photos_are_deterministic_and_depend_on_the_seed(photo_dir: Path, tmp_path: Path) -> None:
    P.build_photo_dataset([photo_dir], tmp_path / "a", seed=0, **SMALL)
    P.build_photo_dataset([photo_dir], tmp_path / "b", seed=0, **SMALL)
    P.build_photo_dataset([photo_dir], tmp_path / "c", seed=1, **SMALL)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    a.pop("manifest.json"), b.pop("manifest.json"), c.pop("manifest.json")
    assert a == b  # same seed: the same bytes
    assert _manifest(tmp_path / "a") == _manifest(tmp_path / "b")
    assert a != c  # another seed: other crops (and splits)


def test_photo_folders_load_with_build_dataset(photo_dir: Path, tmp_path: Path) -> None:
    info = P.build_photo_dataset([photo_dir], tmp_path / "out", **SMALL)
    for r in RES:
        for split in P.SPLITS:
            ds = build_dataset(info["folders"][str(r)][split], resolution=r, train=split == "fit")
            assert len(ds) == info["counts"][split] and ds.num_classes == 1
            x, y = ds[0]
            assert x.shape == (3, r, r) and x.dtype == torch.float32 and int(y) == 0
            assert -1 <= float(x.min()) < float(x.max()) <= 1


def test_energy_equals_estimate_level_std_on_the_loaded_fit_split(photo_dir: Path, tmp_path: Path) -> None:
    info = P.build_photo_dataset([photo_dir], tmp_path / "out", **SMALL)
    assert set(info["energy"]) == {"16", "32"} and set(info["energy"]["32"]) == {"2", "3"}
    for r, by_stages in info["energy"].items():
        ds = build_dataset(info["folders"][r]["fit"], resolution=int(r), train=False)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        for s, stds in by_stages.items():
            assert stds == pytest.approx(estimate_level_std(LaplacianPyramid(stages=int(s)), x), rel=1e-4)
            assert len(stds) == int(s) and all(v > 0.01 for v in stds)


def test_energy_stages() -> None:
    assert [P.energy_stages(r) for r in (16, 32, 64, 128, 256)] == [(2,), (2, 3), (2, 3), (3, 4), (4, 5)]


def test_second_call_is_cached_and_other_arguments_rebuild(photo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / f".out.tmp-{2**31 - 1}-dead").mkdir()  # left by a killed build: a process id that cannot run
    (tmp_path / f".out.tmp-{os.getpid()}-live").mkdir()  # a build still running (this process): kept
    first = P.build_photo_dataset([photo_dir], out, **SMALL)
    assert not (tmp_path / f".out.tmp-{2**31 - 1}-dead").exists()
    (tmp_path / f".out.tmp-{os.getpid()}-live").rmdir()
    stamp = (out / "manifest.json").stat().st_mtime_ns
    again = P.build_photo_dataset([photo_dir], out, **SMALL)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp and again["key"] == first["key"]
    other = P.build_photo_dataset([photo_dir], out, **{**SMALL, "crops_per_photo": 2})
    assert other["key"] != first["key"] and other["counts"]["fit"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # the old build is gone, nothing left over


def test_interrupted_build_leaves_nothing(photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = P._resize_crop

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "_resize_crop", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        P.build_photo_dataset([photo_dir], tmp_path / "out", **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_bad_input_raises_value_error(photo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        P.build_photo_dataset([tmp_path / "nowhere"], tmp_path / "out", **SMALL)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no photographs"):
        P.build_photo_dataset([tmp_path / "empty"], tmp_path / "out", **SMALL)
    with pytest.raises(ValueError, match="at least 8"):
        P.build_photo_dataset([photo_dir], tmp_path / "out", **{**SMALL, "resolutions": (4, 32)})
    with pytest.raises(ValueError, match="passed the checks"):
        P.build_photo_dataset([photo_dir], tmp_path / "out", **{**SMALL, "min_size": 1000})
    with pytest.raises(ValueError, match="not a dfm photos build"):
        P.build_photo_dataset(str(photo_dir), photo_dir, **SMALL)  # a lone folder is a source list of one
    assert not (tmp_path / "out").exists()


# -- glyphs ----------------------------------------------------------------------------------------------------
def _fonts() -> list:
    """Three distinct fonts that every Pillow >= 10.1 has: FreeType default, bitmap default, upside-down default."""
    if not hasattr(ImageFont, "load_default_imagefont"):
        pytest.skip("needs Pillow >= 10.1 (ImageFont.load_default(size) and load_default_imagefont)")
    default = ImageFont.load_default(size=24)
    return [default, ImageFont.load_default_imagefont(), ImageFont.TransposedFont(default, Image.Transpose.ROTATE_180)]


GLYPHS = dict(characters="AB12", resolutions=RES, per_font_variants=2, val_fraction=0.2, test_fraction=0.2,
              progress=False)  # fmt: skip


def test_glyphs_split_by_font_and_load_with_labels(tmp_path: Path) -> None:
    info = P.build_glyph_dataset(tmp_path / "g", fonts=_fonts(), **GLYPHS)
    assert info["classes"] == ["0_A", "1_B", "2_1", "3_2"]
    assert sorted(f["split"] for f in info["fonts"]) == ["fit", "test", "val"]
    assert info["counts"] == {"fit": 8, "val": 8, "test": 8}
    split_of = {f["sha256"][:10]: f["split"] for f in info["fonts"]}
    for r in RES:
        for split in P.SPLITS:
            root = tmp_path / "g" / str(r) / split
            assert sorted(p.name for p in root.iterdir()) == info["classes"]  # every class in every split
            for f in root.rglob("*.png"):
                assert split_of[f.name[:10]] == split and Image.open(f).size == (r, r)
            ds = build_dataset(root, resolution=r, train=False, mode="L")
            assert ds.class_names == info["classes"] and len(ds) == 8
            for i in range(len(ds)):
                x, y = ds[i]
                assert x.shape == (1, r, r) and ds.class_names[int(y)] == ds.samples[i][0].parent.name
                assert float(x[0, 0, 0]) == -1.0 and float(x.max()) > 0.5  # white strokes on black


def test_glyph_energy_and_determinism(tmp_path: Path) -> None:
    info = P.build_glyph_dataset(tmp_path / "a", fonts=_fonts(), **GLYPHS)
    P.build_glyph_dataset(tmp_path / "b", fonts=_fonts(), **GLYPHS)
    P.build_glyph_dataset(tmp_path / "c", fonts=_fonts(), seed=3, **GLYPHS)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert {k: v for k, v in a.items() if k != "manifest.json"} == {k: v for k, v in b.items() if k != "manifest.json"}
    assert a != c
    for r, by_stages in info["energy"].items():
        ds = build_dataset(info["folders"][r]["fit"], resolution=int(r), train=False, mode="L")
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        for s, stds in by_stages.items():
            assert stds == pytest.approx(estimate_level_std(LaplacianPyramid(stages=int(s)), x), rel=1e-4)


def test_missing_glyphs_are_detected() -> None:
    default, bitmap, _ = _fonts()
    assert set(P._masters(default, "A\ue000Z")) == {"A", "Z"}  # a private-use code point draws .notdef
    assert set(P._masters(bitmap, "A\u0416")) == {"A"}  # Latin-1 only
    ttf = sorted(Path("/usr/share/fonts").rglob("DejaVuSans.ttf"))
    if ttf:  # a real TrueType font, where one is installed
        assert set(P._masters(ImageFont.truetype(str(ttf[0]), 40), "Ab\ue000")) == {"A", "b"}


def test_fonts_are_deduplicated_by_family_and_rendering(tmp_path: Path) -> None:
    default = _fonts()[0]
    same = dict(GLYPHS, val_fraction=0, test_fraction=0)
    info = P.build_glyph_dataset(tmp_path / "a", fonts=[default, ImageFont.load_default(size=40)], **same)
    assert len(info["fonts"]) == 1  # one family
    info = P.build_glyph_dataset(tmp_path / "b", fonts=[default, ImageFont.TransposedFont(default)], **same)
    assert len(info["fonts"]) == 1 and info["fonts"][0]["duplicates"] == ["TransposedFont-1"]
    info = P.build_glyph_dataset(tmp_path / "c", fonts=[default, ImageFont.TransposedFont(default)],
                                 **{**same, "dedupe_distance": 0})  # fmt: skip
    assert len(info["fonts"]) == 2


def test_glyph_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        P.build_glyph_dataset(tmp_path / "g", fonts=[tmp_path / "nofonts"], **GLYPHS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no fonts"):
        P.build_glyph_dataset(tmp_path / "g", fonts=[tmp_path / "empty"], **GLYPHS)
    with pytest.raises(ValueError, match="distinct"):
        P.build_glyph_dataset(tmp_path / "g", fonts=_fonts(), **{**GLYPHS, "characters": "AA"})
    with pytest.raises(ValueError, match="usable sources"):
        P.build_glyph_dataset(tmp_path / "g", fonts=_fonts()[:1], **GLYPHS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_command_line(photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser(prog="dfm")
    P.add_data_parser(parser.add_subparsers(dest="command", required=True))
    argv = ["data", "photos", "--source", str(photo_dir), "--out", str(tmp_path / "out"), "--resolutions", "16,32",
            "--crops-per-photo", "2", "--scales", "0.5,1", "--min-size", "100", "--no-progress"]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "6 photographs" in text and str(tmp_path / "out" / "32" / "fit") in text and "3 stages" in text
    args = parser.parse_args([*argv[:7], "4,32", *argv[8:]])
    with pytest.raises(ValueError, match="at least 8"):
        args.func(args)
    args = parser.parse_args([*argv[:7], "16,x", *argv[8:]])
    with pytest.raises(ValueError, match="comma-separated"):
        args.func(args)


def test_bench_reference_draws_from_every_photograph_of_the_split(photo_dir: Path, tmp_path: Path) -> None:
    """Crops are listed photograph by photograph; the bench's reference is a fixed random draw, not the first few."""
    from dfm.bench.quality import QualitySettings, reference_images

    info = P.build_photo_dataset([photo_dir], tmp_path / "out", **{**SMALL, "val_fraction": 0.34})
    val = Path(info["folders"]["16"]["val"])
    files = sorted(val.glob("*.png"))
    sources = {f.name.rsplit("_", 1)[0] for f in files}
    assert len(sources) >= 2 and len(files) == 4 * len(sources)
    fit = info["folders"]["16"]["fit"]
    settings = QualitySettings(
        reference="val", num_reference=4, overrides=(f"data.dataset={fit}", "data.resolution=16")
    )
    ref = np.load(reference_images(tmp_path / "cache", settings))["arr_0"]
    crops = {f: np.asarray(Image.open(f).convert("RGB")) for f in files}
    drawn = [next(f for f, c in crops.items() if np.array_equal(c, r)) for r in ref]
    assert len(set(drawn)) == 4 and len({f.name.rsplit("_", 1)[0] for f in drawn}) >= 2
    again = np.load(reference_images(tmp_path / "cache2", settings))["arr_0"]
    assert np.array_equal(ref, again)  # the same draw every time
    train = dataclasses.replace(settings, reference="fit")
    fit_crops = [np.asarray(Image.open(f).convert("RGB")) for f in sorted(Path(fit).glob("*.png"))]
    ref = np.load(reference_images(tmp_path / "cache", train))["arr_0"]
    assert len(ref) == 4 and all(any(np.array_equal(c, r) for c in fit_crops) for r in ref)
    with pytest.raises(ValueError, match="--reference fit needs a data set built with splits"):
        reference_images(tmp_path / "cache", QualitySettings(reference="fit"))  # Fashion-MNIST
