"""Shared machinery of the derived image sets (``dfm.data.photos``): atomic, cached builds into a folder,
splits by source, the per-level energy of the fit split, contact sheets and Debian package look-ups.

A build writes into a hidden ``.<out>.tmp-<pid>-<random>`` folder beside ``out`` and renames it to ``out`` only
when it is complete, with ``out/manifest.json`` holding ``kind``, ``key`` (a hash of the arguments and the source
files) and ``energy``; a build whose ``key`` is already in ``out`` returns that manifest without work.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dfm.data.base import to_model_range
from dfm.data.image_folder import open_image
from dfm.decomposition import LaplacianPyramid

__all__ = ["FORMAT", "SPLITS", "build_atomically", "cached_build", "check_common", "contact_sheet", "dpkg_owners",
           "energy_stages", "file_keys", "finish", "rank_splits", "seeded_rng", "sha256_file"]  # fmt: skip

SPLITS = ("fit", "val", "test")
FORMAT = 1  # bump when the output of the same arguments changes, so that old caches are rebuilt


def check_common(resolutions: Sequence[int], val_fraction: float, test_fraction: float) -> tuple[int, ...]:
    res = tuple(int(r) for r in resolutions)
    if not res or min(res) < 8:
        raise ValueError(f"resolutions {res}: every resolution must be at least 8; pass e.g. --resolutions 64,128")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val/test fractions {val_fraction}, {test_fraction} must be >= 0 with a sum below 1")
    return tuple(sorted(set(res)))


def energy_stages(resolution: int) -> tuple[int, ...]:
    """Pyramid depths reported for ``resolution``: the two deepest with a coarsest level of at least 16 px
    (64 -> 2, 3; 128 -> 3, 4), else the two shallowest that divide it (32 -> 2, 3)."""
    fits = [s for s in range(2, 12) if resolution % 2 ** (s - 1) == 0 and resolution // 2 ** (s - 1) >= 8]
    deep = [s for s in fits if resolution // 2 ** (s - 1) >= 16]
    return tuple(deep[-2:] if len(deep) >= 2 else fits[:2])


class _LevelStats:
    """Running per-level std of uint8 images, computed as ``estimate_level_std`` would on all of them."""

    def __init__(self, resolution: int) -> None:
        self.pyramids = {s: LaplacianPyramid(stages=s) for s in energy_stages(resolution)}
        self.sums = {s: np.zeros((s, 3)) for s in self.pyramids}  # per level: count, sum, sum of squares

    def add(self, images: np.ndarray) -> None:
        x = to_model_range(torch.from_numpy(images))  # the loader's own mapping to [-1, 1]
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        for s, pyramid in self.pyramids.items():
            for i, level in enumerate(pyramid.decompose(x)):
                level = level.double()
                self.sums[s][i] += (level.numel(), float(level.sum()), float((level * level).sum()))

    def result(self) -> dict[str, list[float]]:
        return {str(s): [math.sqrt(max(q - m * m / n, 0.0) / (n - 1)) if n > 1 else 0.0 for n, m, q in acc]
                for s, acc in self.sums.items()}  # fmt: skip


def _stats_from_folder(folder: Path, resolution: int, mode: str) -> dict[str, list[float]]:
    stats, files = _LevelStats(resolution), sorted(folder.rglob("*.png"))
    for i in range(0, len(files), 256):
        stats.add(np.stack([np.asarray(open_image(p, mode)) for p in files[i : i + 256]]))
    return stats.result() if files else {}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def seeded_rng(*parts: object) -> np.random.Generator:
    """A generator seeded by a hash of ``parts`` (e.g. the seed and a source's SHA-256)."""
    return np.random.default_rng(int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:16], 16))


def rank_splits(ids: Sequence[str], seed: int, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Split source ids by their rank under a seeded hash: exact counts, independent of the input order."""
    order = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    n_test = max(1, round(len(ids) * test_fraction)) if test_fraction > 0 else 0
    n_val = max(1, round(len(ids) * val_fraction)) if val_fraction > 0 else 0
    if len(ids) - n_test - n_val < 1:
        raise ValueError(f"only {len(ids)} usable sources for the fit/val/test splits; add sources (--source, "
                         "--fonts) or set --val-fraction/--test-fraction to 0")  # fmt: skip
    return {i: "test" if k < n_test else "val" if k < n_test + n_val else "fit" for k, i in enumerate(order)}


def dpkg_owners(paths: Iterable[Path]) -> dict[str, str]:
    """Debian package of each path that one owns (read from dpkg's file lists; empty elsewhere)."""
    wanted, owners = {str(p) for p in paths}, {}
    for listing in sorted(Path("/var/lib/dpkg/info").glob("*.list")):
        for line in listing.read_text(errors="replace").splitlines():
            if line in wanted:
                owners[line] = listing.stem.split(":")[0]
    return owners


def file_keys(files: Iterable[Path]) -> list[tuple[str, int, int]]:
    return [(str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in files]


def cached_build(out: Path, kind: str, key: str) -> dict | None:
    """The finished build in ``out`` if it has this key; an error if ``out`` is something else."""
    manifest = out / "manifest.json"
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        if info.get("kind") == kind:
            return _result(out, info) if info.get("key") == key else None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not a dfm {kind} build; choose a new or empty folder")
    return None


def _result(out: Path, info: dict) -> dict:
    folders = {r: {s: str(out / r / s) for s in SPLITS} for r in info["energy"]}
    return {**info, "root": str(out), "folders": folders}


def _alive(pid: str) -> bool:
    """Whether process ``pid`` runs (of any user); ``False`` for a name that is no process id."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def build_atomically(out: Path, kind: str, key: str, write: Callable[[Path], dict]) -> dict:
    """Run ``write(tmp)`` in a temporary folder beside ``out`` and rename it to ``out`` when it has finished."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed build (its process is gone)
        if not _alive(stale.name.split("-")[-2]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir()
    try:
        started = time.time()
        info = {"kind": kind, "format": FORMAT, "key": key, **write(tmp)}
        info["build"] = {"seconds": round(time.time() - started, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        (tmp / "manifest.json").write_text(json.dumps(info, indent=1) + "\n")
        done = cached_build(out, kind, key)  # a concurrent build of the same thing finished first
        if done is not None:
            shutil.rmtree(tmp)
            return done
        old = out.parent / f".{out.name}.tmp-{os.getpid()}-old"
        if out.exists():
            out.rename(old)  # a rename cannot replace a non-empty folder: move the old build aside first
        try:
            tmp.rename(out)
        except BaseException:
            if old.exists():
                old.rename(out)  # put the previous build back rather than leave no build at all
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _result(out, info)


def contact_sheet(folder: Path, target: Path, seed: int, n: int = 64) -> None:
    files = sorted(folder.rglob("*.png"))
    if not files:
        return
    picked = [files[i] for i in sorted(np.random.default_rng(seed).permutation(len(files))[:n])]
    tiles = [Image.open(p).convert("RGB") for p in picked]
    side, cols = tiles[0].width + 2, 8
    sheet = Image.new("RGB", (cols * side + 2, math.ceil(len(tiles) / cols) * side + 2), (128, 128, 128))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (2 + i % cols * side, 2 + i // cols * side))
    sheet.save(target)


def finish(tmp: Path, res: tuple[int, ...], mode: str, seed: int, info: dict) -> dict:
    """Add the per-level energy of every resolution's fit split and write its contact sheet."""
    for r in res:
        contact_sheet(tmp / str(r) / "fit", tmp / f"sheet_{r}.png", seed)
    return {**info, "energy": {str(r): _stats_from_folder(tmp / str(r) / "fit", r, mode) for r in res}}
