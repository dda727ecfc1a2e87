"""Finding network weights: an explicit path, an environment variable, or a download where possible."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["WeightsSpec", "WeightsNotFoundError", "resolve_weights", "sha256_file", "load_state_dict"]


class WeightsNotFoundError(FileNotFoundError):
    """No local weights file and no way to download it."""


@dataclass(frozen=True)
class WeightsSpec:
    """Where the published weights of an extractor live."""

    filename: str
    url: str | None
    env_var: str


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_weights(name: str, spec: WeightsSpec, path: str | Path | None = None, download: bool = True) -> Path:
    """Return a local weights file: `path`, else $env_var, else the torch hub cache (downloading if allowed)."""
    candidate = path or os.environ.get(spec.env_var)
    if candidate:
        candidate = Path(candidate).expanduser()
        if not candidate.is_file():
            raise WeightsNotFoundError(
                f"{name}: weights file {candidate} does not exist; fix the path or unset ${spec.env_var}"
            )
        return candidate
    cached = Path(torch.hub.get_dir()) / "checkpoints" / spec.filename
    if cached.is_file():
        return cached
    how = (
        f"download {spec.url} on a machine with internet and pass it with --weights {name}=PATH "
        f"or export {spec.env_var}=PATH"
    )
    if spec.url is None or not download:
        raise WeightsNotFoundError(f"{name}: no weights file found; {how}")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(spec.url, str(cached), progress=True)
    except Exception as error:  # no network, proxy refusal, truncated file...
        raise WeightsNotFoundError(
            f"{name}: could not download weights ({type(error).__name__}: {error}); {how}"
        ) from error
    return cached


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint holding a plain state dict (or one under a 'state_dict'/'model' key)."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, SafetensorError, a truncated zip...: not a weights file
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"cannot read weights file {path}: {first}; pass the right file with --weights") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    return obj
