"""Reference statistics files: the Gaussian fitted to one extractor's features of a reference set.

An `.npz` with `mu` (D,), `sigma` (D, D), `count`, `extractor` (name), `protocol` (JSON: the
extractor's preprocessing, weights file and sha256, and the source of the images) and optionally
`features` (N, D) so that precision/recall can also be computed against the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .frechet import FeatureStats
from .images import read_npz

__all__ = ["ReferenceStats", "save_reference", "load_reference", "is_reference_file"]


@dataclass
class ReferenceStats:
    extractor: str
    stats: FeatureStats
    protocol: dict
    features: np.ndarray | None = None

    @property
    def mu(self) -> np.ndarray:
        return self.stats.mean

    @property
    def sigma(self) -> np.ndarray:
        return self.stats.sigma


def save_reference(path: str | Path, reference: ReferenceStats) -> Path:
    """Write `reference` to `path` (.npz). The scatter matrix is recovered exactly from sigma and count."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"reference statistics are written as .npz; got output path {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "mu": reference.stats.mean,
        "sigma": reference.stats.sigma,
        "count": np.int64(reference.stats.count),
        "extractor": np.str_(reference.extractor),
        "protocol": np.str_(json.dumps(reference.protocol, sort_keys=True)),
    }
    if reference.features is not None:
        arrays["features"] = np.asarray(reference.features, dtype=np.float32)
    tmp = path.with_name(f".{path.stem}.tmp.npz")  # written whole, then renamed: never half-written
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def is_reference_file(path: str | Path) -> bool:
    """Whether ``path`` is an ``.npz`` of reference statistics (``mu`` and ``sigma``); a file that numpy cannot read
    safely is not (reading it as images then says what is wrong with it)."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return False
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            return False
        with data:
            return "mu" in data.files and "sigma" in data.files
    except Exception:  # noqa: BLE001 - not a readable npz: not a statistics file
        return False


def load_reference(path: str | Path) -> ReferenceStats:
    """Read a file written by `save_reference` (an ADM reference batch with mu/sigma also loads)."""
    data = read_npz(path, "reference statistics written by `dfm eval ref`")
    missing = {"mu", "sigma"} - set(data.keys())
    if missing:
        raise ValueError(f"{path} is not a reference-statistics file (missing {sorted(missing)})")
    try:
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        count = int(data["count"]) if "count" in data else 0
        extractor = str(data["extractor"]) if "extractor" in data else "inception-v3"
        protocol = json.loads(str(data["protocol"])) if "protocol" in data else {}
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a reference-statistics file of `dfm eval ref` ({err}); build it again "
                         "with dfm eval ref") from None  # fmt: skip
    features = data["features"] if "features" in data else None
    # An unknown count (ADM files) is only used for merging, never for the distance itself.
    m2 = sigma * max(count - 1, 1)
    return ReferenceStats(extractor, FeatureStats(len(mu), max(count, 2), mu, m2), protocol, features)
