"""Offline image sets with real fine detail: crops of photographs, and glyphs rendered from fonts.

Both builders write, under ``out``, one image folder per resolution and split that ``build_dataset`` reads::

    out/manifest.json                     what was built from what (see below), and the per-level energy
    out/sheet_<R>.png                     8 x 8 random fit images, to look at
    out/<R>/{fit,val,test}/*.png          photos: flat folders (unconditional, one class)
    out/<R>/{fit,val,test}/<NN_X>/*.png   glyphs: one subfolder per character, named so sorted names keep
                                          the class order (``00_A`` ... ``35_9``); every split has all of them

so ``build_dataset("out/64/fit", resolution=64)`` trains on photos and ``build_dataset("out/32/fit",
resolution=32, mode="L")`` on glyphs (white strokes on black, grey PNGs; ``mode="L"`` makes sure that they load
as one channel). What the builders guarantee:

* Splits are by source: every crop of a photograph, and every glyph of a font, lies in one split only. The
  split depends on the seed and the sources' content (a SHA-256 rank), not on file names or order.
* Deterministic: the same arguments and sources give the same bytes (Pillow's PNG writer has no timestamps).
* Atomic and cached: everything is written to a hidden temporary folder beside ``out`` and renamed into place
  at the end, so an interrupted build leaves nothing half-written; a later call with the same arguments and
  the same source files (path, size, mtime) finds the finished build and returns at once.
* ``manifest["energy"][R][S]`` is the standard deviation of each level of ``LaplacianPyramid(stages=S)``
  over the fit split, pixels in [-1, 1] as loaded: ``estimate_level_std`` on that split, summed in float64.

Photographs come from the wallpaper packages (``PHOTO_DIRS``, or only the photographs among them with the
source ``"debian-photos"``). Variants of one picture (sizes, portrait, dark/light, KDE's ``<Name>/contents/
images*``) count as one photograph and only the largest is used; small, transparent and flat images (gradients:
fine-level energy below ``min_detail``) are skipped, but sharp-edged artwork passes those checks.
Fonts are deduplicated by family (the regular face is kept) and again by near-identical renderings (e.g.
Liberation Sans and Arimo); symbol fonts and fonts covering under half of the characters are skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from dfm.data.base import to_model_range
from dfm.data.derived import (
    FORMAT,
    SPLITS,
    build_atomically,
    cached_build,
    check_common,
    dpkg_owners,
    energy_stages,
    file_keys,
    finish,
    rank_splits,
    seeded_rng,
    sha256_file,
)
from dfm.data.image_folder import open_image
from dfm.decomposition import LaplacianPyramid

__all__ = ["DEBIAN_PHOTOS", "FONT_DIRS", "PHOTO_DIRS", "SPLITS", "add_data_parser", "build_glyph_dataset",
           "build_photo_dataset", "energy_stages"]  # fmt: skip

PHOTO_DIRS = (Path("/usr/share/backgrounds"), Path("/usr/share/wallpapers"), Path("/usr/share/pixmaps/backgrounds"))
FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"))
#: ``--source debian-photos``: the photographs among Debian 12's wallpapers, by package (the rest is artwork:
#: renders, paintings and gradients that no simple image statistic told apart from photographs reliably).
DEBIAN_PHOTOS = {
    "mate-backgrounds": ("/usr/share/backgrounds/mate/nature/*.jpg",),
    "lomiri-wallpapers-16.04": tuple(f"/usr/share/backgrounds/{n}_by_*.jpg" for n in (
        "Bridge", "Dragonfly", "Picture_0B", "Picture_1A", "Wine", "aitzgorri", "analogpattern", "free", "friends",
        "greentock", "life", "picosdeeuropa", "seeding", "sunset")),
    "lomiri-wallpapers-20.04": ("/usr/share/backgrounds/Kleiber_by_*.jpg",),
    "plasma-workspace-wallpapers": tuple(f"/usr/share/wallpapers/{n}/contents/images/*" for n in (
        "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite",
        "OneStandsOut", "Path", "summer_1am")),
}  # fmt: skip
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
FONT_EXTENSIONS = (".ttf", ".otf", ".ttc")
DEFAULT_CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
Font = Any  # a font file path or a Pillow font object (FreeTypeFont, ImageFont, TransposedFont)

# Fonts whose letters are pictures (they map ASCII codes to symbols, so no missing-glyph test catches them).
_SYMBOL_FONT = re.compile(r"symbol|dingbat|d050000l|wingding|webding|emoji|keyboard|awesome|music|braille", re.I)
_STYLE_ORDER = ("regular", "book", "roman", "normal", "medium", "text")
_SUPERSAMPLE = 4  # glyphs are drawn at 4x and box-reduced: exact area antialiasing of thin strokes
_GLYPH_HEIGHT = 0.6  # the font's tallest glyph fills this fraction of the image height before jitter


# -- photographs ----------------------------------------------------------------------------------------------
def _group_key(path: Path) -> str:
    """One key per picture: KDE's ``<Name>/contents/images*/WxH``, or the stem without size/orientation/theme."""
    parts = path.parts
    if "contents" in parts[1:]:
        return str(Path(*parts[: parts.index("contents")]))
    stem = re.sub(r"[_-]?\d{3,5}x\d{3,5}", "", path.stem.lower())
    stem = re.sub(r"([_-]?(portrait|landscape))+$", "", stem)
    return str(path.parent / re.sub(r"[_-](d|l|dark|light|day|night)$", "", stem))


def _detail(image: Image.Image) -> float:
    """Std of the finest Laplacian level of the grey image at about 256 px: ~0 for gradients and flat art."""
    grey = image.convert("L")
    grey = grey.reduce(max(1, min(grey.size) // 256))
    x = to_model_range(torch.from_numpy(np.asarray(grey)[: grey.height // 2 * 2, : grey.width // 2 * 2].copy()))
    return float(LaplacianPyramid(stages=2).decompose(x[None, None])[1].std())


def _resize_crop(image: Image.Image, box: tuple[int, int, int, int], resolution: int) -> Image.Image:
    """Antialiased downscale of one crop (Pillow's Lanczos widens its kernel by the scale factor)."""
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box)


def _photo_files(sources: Sequence[Path] | None) -> list[Path]:
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else sources  # one folder alone is fine too
    if sources is None:
        roots = [d for d in PHOTO_DIRS if d.is_dir()]
    else:
        roots = [Path(s).expanduser() for s in sources if str(s) != "debian-photos"]
        if any(str(s) == "debian-photos" for s in sources):
            roots += [p for globs in DEBIAN_PHOTOS.values() for g in globs for p in Path("/").glob(g[1:])]
        for root in roots:
            if not root.exists():
                raise ValueError(f"photo source {root} does not exist; pass an existing folder or file with --source")
    found = set()
    for root in roots:
        found |= {root} if root.is_file() else {p for p in root.rglob("*") if p.is_file()}
    return sorted(p for p in found if p.suffix.lower() in PHOTO_EXTENSIONS and not p.name.startswith("."))


def _pick_photos(files: list[Path], min_size: int, progress: bool) -> tuple[list[dict], list[dict]]:
    """One record per picture (largest variant; exact copies merged) and the files skipped, with reasons."""
    by_sha, skipped = {}, []
    for path in tqdm(files, desc="photos: checking", disable=not progress):
        try:
            with Image.open(path) as image:
                size, alpha = image.size, image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
                if alpha:  # opaque alpha channels are common in PNG exports; only real transparency counts
                    alpha = image.getchannel("A").getextrema()[0] < 255 if "A" in image.getbands() else True
        except (OSError, ValueError, SyntaxError) as err:
            skipped.append({"file": str(path), "reason": f"unreadable ({err.__class__.__name__})"})
            continue
        if min(size) < min_size or alpha:
            reason = "transparent (not a photograph)" if alpha else f"short side {min(size)} < {min_size}"
            skipped.append({"file": str(path), "reason": reason})
            continue
        sha = sha256_file(path)
        rec = by_sha.setdefault(sha, {"file": str(path), "sha256": sha, "size": list(size), "variants": []})
        if rec["file"] != str(path):  # an exact copy or a link: name the real file, list the others
            rec["variants"].append(str(path))
            if Path(rec["file"]).is_symlink() and not path.is_symlink():
                rec["file"], rec["variants"][-1] = rec["variants"][-1], rec["file"]
    groups: dict[str, list[dict]] = {}
    for rec in by_sha.values():
        groups.setdefault(_group_key(Path(rec["file"])), []).append(rec)
    for members in groups.values():  # the largest variant stands for the picture, the others are listed
        members.sort(key=lambda r: (-r["size"][0] * r["size"][1], r["file"]))
        members[0]["variants"] += [v for r in members[1:] for v in [r["file"], *r["variants"]]]
        members[0]["variants"].sort()
    return sorted((members[0] for members in groups.values()), key=lambda r: r["sha256"]), skipped


def build_photo_dataset(
    sources: Sequence[str | os.PathLike] | None,
    out: str | os.PathLike,
    resolutions: Sequence[int] = (64, 128),
    crops_per_photo: int = 64,
    scales: Sequence[float] = (0.25, 0.35, 0.5, 0.7, 1.0),
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    min_size: int = 512,
    min_detail: float = 0.01,
    progress: bool = True,
) -> dict:
    """Crop photographs into ``out/<R>/{fit,val,test}`` (see the module doc); returns the manifest plus
    ``root`` and ``folders[R][split]``.

    Each accepted photograph gives ``crops_per_photo`` square crops, crop ``k`` of side ``scales[k % len]``
    times the short side (at least the largest resolution) at a seeded random place, each resized with
    Lanczos to every resolution. ``sources``: folders (searched recursively), files, or ``"debian-photos"``
    (``DEBIAN_PHOTOS``); ``None`` searches ``PHOTO_DIRS``, where the filters cannot catch all artwork.
    Photographs with a short side below ``min_size`` (or the largest resolution: crops are never enlarged) or
    a fine-level energy (at 256 px) below ``min_detail`` are skipped.
    """
    res = check_common(resolutions, val_fraction, test_fraction)
    scales = tuple(float(s) for s in scales)
    if crops_per_photo < 1 or not scales or not all(0 < s <= 1 for s in scales):
        raise ValueError(f"crops_per_photo={crops_per_photo} must be >= 1 and scales {scales} within (0, 1]")
    out, files = Path(out).expanduser(), _photo_files(sources)
    where = ", ".join(str(s) for s in (sources if sources is not None else PHOTO_DIRS))
    if not files:
        raise ValueError(f"no photographs ({', '.join(PHOTO_EXTENSIONS)}) found in {where}; install a wallpaper "
                         "package (e.g. apt-get install mate-backgrounds) or pass --source DIR")  # fmt: skip
    args = dict(resolutions=res, crops_per_photo=crops_per_photo, scales=scales, seed=seed, min_size=min_size,
                val_fraction=val_fraction, test_fraction=test_fraction, min_detail=min_detail)  # fmt: skip
    key = hashlib.sha256(json.dumps([FORMAT, args, file_keys(files)]).encode()).hexdigest()
    if (done := cached_build(out, "photos", key)) is not None:
        return done

    def write(tmp: Path) -> dict:
        photos, skipped = _pick_photos(files, max(min_size, res[-1]), progress)
        images, kept = [], []
        for r in res:
            (tmp / str(r) / "all").mkdir(parents=True)  # crops wait here until the split is known
        for rec in tqdm(photos, desc="photos: cropping", disable=not progress):
            image = open_image(Path(rec["file"]), "RGB")
            rec["detail"] = round(_detail(image), 5)
            if rec["detail"] < min_detail:
                skipped.append({"file": rec["file"], "reason": f"flat: detail {rec['detail']} < {min_detail}"})
                continue
            kept.append(rec)
            rng = seeded_rng(seed, rec["sha256"])  # from the content: crops do not depend on the file order
            short = min(image.size)
            for k in range(crops_per_photo):
                side = min(short, max(res[-1], round(scales[k % len(scales)] * short)))
                left, top = (int(rng.integers(0, n - side + 1)) for n in image.size)
                box = (left, top, left + side, top + side)
                name = f"{rec['sha256'][:12]}_{k:03d}.png"
                for r in res:
                    _resize_crop(image, box, r).save(tmp / str(r) / "all" / name, format="PNG")
                images.append({"file": name, "source": rec["sha256"][:12], "box": list(box)})
        if not kept:
            raise ValueError(f"no photographs in {where} passed the checks (short side >= {min_size}, opaque, "
                             f"detail >= {min_detail}); pass other --source folders or lower --min-size")  # fmt: skip
        split = rank_splits([r["sha256"] for r in kept], seed, val_fraction, test_fraction)
        owners = dpkg_owners(Path(r["file"]) for r in kept)
        for rec in kept:
            rec.update(split=split[rec["sha256"]], package=owners.get(rec["file"]))
        split_of = {r["sha256"][:12]: r["split"] for r in kept}
        for r in res:  # the crops were written before the split was known: move them into their split
            for split in SPLITS:
                (tmp / str(r) / split).mkdir()
            for item in images:
                (tmp / str(r) / "all" / item["file"]).rename(tmp / str(r) / split_of[item["source"]] / item["file"])
            (tmp / str(r) / "all").rmdir()
        for item in images:
            item["file"] = f"{split_of[item['source']]}/{item['file']}"
        counts = {s: sum(split_of[item["source"]] == s for item in images) for s in SPLITS}
        info = {"arguments": args, "counts": counts, "photographs": kept, "skipped": skipped, "images": images}
        return finish(tmp, res, "RGB", seed, info)

    return build_atomically(out, "photos", key, write)


# -- glyphs ---------------------------------------------------------------------------------------------------
def _ink(font: Font, ch: str) -> Image.Image | None:
    """``ch`` drawn white on black, cropped to its ink; ``None`` when nothing is drawn or it cannot be."""
    try:
        left, top, right, bottom = font.getbbox(ch)
        pad = 2 + (bottom - top) // 4  # some fonts draw a little outside their own bounding box
        image = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad))
        ImageDraw.Draw(image).text((pad - left, pad - top), ch, fill=255, font=font)
    except (UnicodeError, OSError, ValueError):  # e.g. a Latin-1 bitmap font asked for other characters
        return None
    box = image.getbbox()
    return image.crop(box) if box else None


def _masters(font: Font, characters: str) -> dict[str, Image.Image]:
    """The glyphs the font has: a missing one draws nothing or the same .notdef box as a surely absent one."""
    notdef = _ink(font, "\U0010fffd")  # a private-use code point in no real font
    masters = {ch: _ink(font, ch) for ch in characters}
    same = lambda a: notdef is not None and a.size == notdef.size and a.tobytes() == notdef.tobytes()  # noqa: E731
    return {ch: im for ch, im in masters.items() if im is not None and not same(im)}


def _draw_glyph(master: Image.Image, ref_height: int, resolution: int, jitter: Sequence[float]) -> Image.Image:
    """Scale, rotate and place one glyph at 4x, then box-reduce: ``jitter`` = (scale, degrees, dx, dy)."""
    scale, degrees, dx, dy = jitter
    canvas = _SUPERSAMPLE * resolution
    s = _GLYPH_HEIGHT * canvas / ref_height * scale
    glyph = master.resize((max(1, round(master.width * s)), max(1, round(master.height * s))), Image.Resampling.LANCZOS)
    glyph = glyph.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True)
    if max(glyph.size) > canvas - 2:  # very wide glyphs (W, M in wide fonts) shrink to fit
        f = (canvas - 2) / max(glyph.size)
        glyph = glyph.resize((max(1, int(glyph.width * f)), max(1, int(glyph.height * f))), Image.Resampling.LANCZOS)
    x = min(max(1, round(canvas * (0.5 + dx) - glyph.width / 2)), canvas - 1 - glyph.width)
    y = min(max(1, round(canvas * (0.5 + dy) - glyph.height / 2)), canvas - 1 - glyph.height)
    image = Image.new("L", (canvas, canvas))
    image.paste(glyph, (x, y))
    return image.reduce(_SUPERSAMPLE)


def _jitter(seed: int, font_id: str, ch: str, variant: int) -> tuple[float, ...]:
    """Seeded per glyph, so a glyph does not change when other fonts or characters are added."""
    rng = seeded_rng(seed, font_id, ord(ch), variant)
    return (float(rng.uniform(0.85, 1.1)), float(rng.uniform(-8, 8)), *(float(v) for v in rng.uniform(-0.08, 0.08, 2)))


def _load_fonts(fonts: Sequence[Font] | None, characters: str, master_px: int) -> tuple[list[dict], list[dict], list]:
    """One record per family (its regular face when there is one), the fonts skipped, the cache key part."""
    specs = [d for d in FONT_DIRS if d.is_dir()] if fonts is None else list(fonts)
    specs = [fonts] if isinstance(fonts, (str, os.PathLike)) else specs
    objects, files = [], set()
    for spec in specs:
        if isinstance(spec, (str, os.PathLike)):
            path = Path(spec).expanduser()
            if not path.exists():
                raise ValueError(f"font source {path} does not exist; pass a font file or folder with --fonts")
            files |= {path} if path.is_file() else {p for p in path.rglob("*") if p.is_file()}
        else:
            objects.append(spec)
    files = sorted(p for p in files if p.suffix.lower() in FONT_EXTENSIONS)
    faces, skipped = {}, []
    for path in files:
        try:
            family, style = ImageFont.truetype(str(path), 100).getname()
        except OSError as err:
            skipped.append({"font": str(path), "reason": f"unreadable ({err})"})
            continue
        rank = (_STYLE_ORDER.index(style.lower()) if style.lower() in _STYLE_ORDER else 99, len(style), str(path))
        if family not in faces or rank < faces[family][0]:
            faces[family] = (rank, path, style)
    records = []
    for family, (_, path, style) in sorted(faces.items()):
        if _SYMBOL_FONT.search(family):
            skipped.append({"font": family, "reason": "symbol font"})
            continue
        height = max((im.height for im in _masters(ImageFont.truetype(str(path), 100), characters).values()), default=0)
        font = ImageFont.truetype(str(path), max(8, round(100 * master_px / height))) if height else None
        records.append({"family": family, "style": style, "file": str(path), "font": font, "sha256": sha256_file(path)})
    for i, font in enumerate(objects):
        name = font.getname() if hasattr(font, "getname") else (f"{type(font).__name__}-{i}", "")
        if name[0] in {r["family"] for r in records}:
            continue
        ink = b"".join(im.tobytes() + bytes(str(im.size), "ascii") for im in _masters(font, characters).values())
        records.append({"family": name[0], "style": name[1], "file": None, "font": font,
                        "sha256": hashlib.sha256(ink).hexdigest()})  # fmt: skip
    return records, skipped, file_keys(files) + [r["sha256"] for r in records if r["file"] is None]


def _dedupe_renderings(records: list[dict], characters: str, distance: float) -> list[dict]:
    """Drop fonts whose upright glyphs (16 px) differ from a kept font's by under ``distance`` (mean |a - b|)."""
    kept: list[dict] = []
    for rec in records:
        rec["signature"] = {ch: np.asarray(_draw_glyph(m, rec["ref_height"], 16, (1, 0, 0, 0)), np.float32) / 255
                            for ch, m in rec["masters"].items()}  # fmt: skip
        for other in kept:
            a, b = rec["signature"], other["signature"]
            if a.keys() & b.keys() and np.mean([np.abs(a[c] - b[c]).mean() for c in a.keys() & b.keys()]) < distance:
                other["duplicates"].append(rec["family"])
                break
        else:
            kept.append(rec)
    return kept


def build_glyph_dataset(
    out: str | os.PathLike,
    fonts: Sequence[Font] | None = None,
    characters: str = DEFAULT_CHARACTERS,
    resolutions: Sequence[int] = (32, 64),
    per_font_variants: int = 8,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    min_coverage: float = 0.5,
    dedupe_distance: float = 0.015,
    progress: bool = True,
) -> dict:
    """Render every character of every font into ``out/<R>/{fit,val,test}/<class>`` (see the module doc).

    Class ``i`` is ``characters[i]``. Each glyph a font has is drawn ``per_font_variants`` times with a seeded
    size (x0.85 .. 1.1), rotation (+-8 degrees) and shift (+-8 % of the side), white on black, grey. ``fonts``:
    font files, folders of them, or Pillow font objects (e.g. ``ImageFont.load_default(size=24)``; they are
    drawn at their own size); ``None`` searches ``FONT_DIRS``. Fonts with fewer than ``min_coverage`` of the
    characters are skipped; ``dedupe_distance=0`` keeps near-identical designs.
    """
    res = check_common(resolutions, val_fraction, test_fraction)
    if not characters or len(set(characters)) != len(characters) or per_font_variants < 1:
        raise ValueError(f"characters {characters!r} must be distinct and non-empty, per_font_variants >= 1")
    out = Path(out).expanduser()
    records, skipped, sources = _load_fonts(fonts, characters, round(_SUPERSAMPLE * res[-1] * _GLYPH_HEIGHT * 1.15))
    if not records:
        raise ValueError(f"no fonts ({', '.join(FONT_EXTENSIONS)}) found in {fonts or [str(d) for d in FONT_DIRS]}; "
                         "install some (e.g. apt-get install fonts-dejavu-core) or pass --fonts DIR")  # fmt: skip
    args = dict(characters=characters, resolutions=res, per_font_variants=per_font_variants, seed=seed,
                val_fraction=val_fraction, test_fraction=test_fraction, min_coverage=min_coverage,
                dedupe_distance=dedupe_distance)  # fmt: skip
    key = hashlib.sha256(json.dumps([FORMAT, args, sources]).encode()).hexdigest()
    if (done := cached_build(out, "glyphs", key)) is not None:
        return done
    width = len(str(len(characters) - 1))
    classes = [f"{i:0{width}d}_{ch if ch.isascii() and ch.isalnum() else f'U{ord(ch):04X}'}"
               for i, ch in enumerate(characters)]  # fmt: skip

    def write(tmp: Path) -> dict:
        usable = []
        for rec in tqdm(records, desc="glyphs: checking fonts", disable=not progress):
            font = rec.pop("font")  # None: a font file without any of the characters
            rec["masters"] = _masters(font, characters) if font is not None else {}
            rec["missing"] = "".join(ch for ch in characters if ch not in rec["masters"])
            if len(rec["masters"]) < min_coverage * len(characters):
                skipped.append({"font": rec["family"], "reason": f"has {len(rec['masters'])} of the characters"})
                continue
            rec.update(ref_height=max(im.height for im in rec["masters"].values()), duplicates=[])
            usable.append(rec)
        kept = _dedupe_renderings(usable, characters, dedupe_distance) if dedupe_distance > 0 else usable
        split = rank_splits([r["sha256"] for r in kept], seed, val_fraction, test_fraction)
        owners = dpkg_owners(Path(r["file"]) for r in kept if r["file"])
        counts = dict.fromkeys(SPLITS, 0)
        for r, s, name in itertools.product(res, SPLITS, classes):  # all classes in all splits: labels agree
            (tmp / str(r) / s / name).mkdir(parents=True)
        for rec in tqdm(kept, desc="glyphs: drawing", disable=not progress):
            rec.update(split=split[rec["sha256"]], package=owners.get(rec["file"]))
            for i, ch in enumerate(characters):
                for v in range(per_font_variants if ch in rec["masters"] else 0):
                    jitter = _jitter(seed, rec["sha256"], ch, v)
                    for r in res:
                        path = tmp / str(r) / rec["split"] / classes[i] / f"{rec['sha256'][:10]}_{v:02d}.png"
                        _draw_glyph(rec["masters"][ch], rec["ref_height"], r, jitter).save(path, format="PNG")
                    counts[rec["split"]] += 1
        drop = ("masters", "signature")
        info = {"arguments": args, "classes": classes, "counts": counts, "skipped": skipped,
                "fonts": [{k: v for k, v in rec.items() if k not in drop} for rec in kept]}  # fmt: skip
        return finish(tmp, res, "L", seed, info)

    return build_atomically(out, "glyphs", key, write)


# -- command line ---------------------------------------------------------------------------------------------
def _numbers(text: str, flag: str, example: str, kind: type = int) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give comma-separated numbers, e.g. {flag} {example}") from None


def add_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``data photos`` and ``data glyphs`` to an ``argparse`` sub-parser set; returns the ``data`` parser."""
    parser = subparsers.add_parser("data", help="build offline image sets: photo crops or font glyphs",
                                   description=__doc__.split("\n\n")[0])  # fmt: skip
    sub = parser.add_subparsers(dest="data_command", required=True)
    photos = sub.add_parser("photos", help="square crops of the installed wallpaper photographs")
    everything = ", ".join(map(str, PHOTO_DIRS))
    photos.add_argument("--source", action="append", help="folder or file of photographs, or debian-photos: the "
                        f"Debian wallpapers that are photographs (repeatable; default: all {everything})")  # fmt: skip
    photos.add_argument("--resolutions", default="64,128", help="image sizes, comma-separated")
    photos.add_argument("--crops-per-photo", type=int, default=64)
    photos.add_argument("--scales", default="0.25,0.35,0.5,0.7,1.0", help="crop sides, fractions of the short side")
    photos.add_argument("--min-size", type=int, default=512, help="skip photographs with a shorter short side")
    photos.add_argument("--min-detail", type=float, default=0.01, help="skip flatter images (gradients)")
    glyphs = sub.add_parser("glyphs", help="characters rendered from the installed fonts, class = character")
    glyphs.add_argument("--fonts", action="append", help="font file or folder (repeatable; default: "
                        + ", ".join(str(d) for d in FONT_DIRS) + ")")  # fmt: skip
    glyphs.add_argument("--resolutions", default="32,64", help="image sizes, comma-separated")
    glyphs.add_argument("--characters", default=DEFAULT_CHARACTERS, help="one class per character")
    glyphs.add_argument("--variants", type=int, default=8, help="jittered renderings per glyph and font")
    for p in (photos, glyphs):
        p.add_argument("--out", required=True, help="output folder (created; rebuilt when the arguments change)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--val-fraction", type=float, default=0.1, help="share of the sources held aside (val)")
        p.add_argument("--test-fraction", type=float, default=0.1, help="share of the sources for test")
        p.add_argument("--no-progress", action="store_true")
        p.set_defaults(func=_run_data)
    return parser


def _run_data(args: argparse.Namespace) -> int:
    """Handler of ``dfm data photos|glyphs``: build (or find) the set and print where it is and its energy."""
    common = dict(out=args.out, resolutions=_numbers(args.resolutions, "--resolutions", "64,128"), seed=args.seed,
                  val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                  progress=not args.no_progress)  # fmt: skip
    if args.data_command == "photos":
        result = build_photo_dataset(args.source, crops_per_photo=args.crops_per_photo, min_size=args.min_size,
                                     scales=_numbers(args.scales, "--scales", "0.25,0.5,1", float),
                                     min_detail=args.min_detail, **common)  # fmt: skip
        sources = f"{len(result['photographs'])} photographs"
    else:
        result = build_glyph_dataset(fonts=args.fonts, characters=args.characters,
                                     per_font_variants=args.variants, **common)  # fmt: skip
        sources = f"{len(result['fonts'])} fonts, {len(result['classes'])} classes (load with mode='L')"
    counts = ", ".join(f"{s} {n}" for s, n in result["counts"].items())
    print(f"{result['root']}: {sources}; images per resolution: {counts} ({result['build']['seconds']} s to build)")
    for r, splits in result["folders"].items():
        print(f"  {r:>4} px  " + "  ".join(splits[s] for s in SPLITS))
    print("std of each Laplacian level on the fit split, coarse to fine, pixels in [-1, 1]:")
    for r, by_stages in result["energy"].items():
        for s, stds in by_stages.items():
            print(f"  {r:>4} px  {s} stages  " + "  ".join(f"{v:.4f}" for v in stds))
    return 0


if __name__ == "__main__":  # python -m dfm.data.photos data photos|glyphs ..., as `dfm data` would
    _parser = argparse.ArgumentParser(prog="python -m dfm.data.photos")
    add_data_parser(_parser.add_subparsers(dest="command", required=True))
    _args = _parser.parse_args()
    try:
        sys.exit(_args.func(_args))
    except ValueError as _err:
        sys.exit(f"dfm data: error: {_err}")
