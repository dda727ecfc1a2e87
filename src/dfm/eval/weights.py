"""Finding network weights: an explicit path, an environment variable, or a download where possible."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dfm.checkpoint import first_mismatch, load_error_reason, state_dict_error

__all__ = ["WeightsSpec", "WeightsNotFoundError", "resolve_weights", "sha256_file", "load_state_dict", "load_into"]


class WeightsNotFoundError(FileNotFoundError):
    """No local weights file and no way to download it."""


@dataclass(frozen=True)
class WeightsSpec:
    """Where the published weights of an extractor live."""

    filename: str
    url: str | None
    env_var: str
    #: how to make the file when it cannot be downloaded (``url`` None), e.g. a dfm command
    make: str | None = None


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
    if spec.url is None:  # nothing to download: say where it was looked for and how to make it
        make = f"make it with `{spec.make.format(path=cached)}`" if spec.make else "make it"
        raise WeightsNotFoundError(
            f"{name}: no weights file: none given with --weights {name}=PATH or ${spec.env_var}, and none at "
            f"{cached}; {make}, or pass one with --weights {name}=PATH or export {spec.env_var}=PATH"
        )
    how = (
        f"download {spec.url} on a machine with internet and pass it with --weights {name}=PATH "
        f"or export {spec.env_var}=PATH"
    )
    if not download:
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
        raise ValueError(
            f"cannot read weights file {path}: it is not a file of network weights, or it is damaged "
            f"({load_error_reason(error)}); pass the right file with --weights"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"weights file {path} holds no state dict (a dict of tensors); pass the right file with "
                         "--weights")  # fmt: skip
    return obj


def load_into(module: nn.Module, path: str | Path, name: str) -> None:
    """The weights file ``path`` into ``module`` (all of its weights, and only those); a ``ValueError`` naming the
    file and the first weight that does not fit if it belongs to another network."""
    state = load_state_dict(path)
    try:
        reason = first_mismatch(module.state_dict(), state)
        if reason is None:
            module.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as error:
        reason = state_dict_error(error)
    if reason is not None:
        raise ValueError(f"{name}: weights file {path} does not fit the {name} network ({reason}); pass its own "
                         f"weights with --weights {name}=PATH")  # fmt: skip
