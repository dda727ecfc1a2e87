"""Checkpoints that survive a kill at any moment, and carry no pickled code.

Layout of a run directory::

    run/config.json                      the resolved RunConfig
    run/checkpoints/step_00001000/       one checkpoint (a directory, renamed into place when complete)
        model.safetensors, ema.safetensors   weights (safetensors)
        state.pt                             optimizer, LR schedule, RNG and step (loaded with weights_only=True)
    run/checkpoints/latest               name of the newest complete checkpoint (replaced atomically)

A checkpoint is first written to a temporary directory and renamed into place with ``os.replace``, then
``latest`` is rewritten through a temporary file; a kill at any point leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
LATEST = "latest"


def _state_to_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it and delete all but the newest ``keep_last``."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f".tmp_{name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_state_to_cpu(model_state), tmp / MODEL_FILE)
    save_file(_state_to_cpu(ema_state), tmp / EMA_FILE)
    torch.save(train_state, tmp / STATE_FILE)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # a re-save of the same step (e.g. after resume): replace the old one
        old = root / f".old_{name}_{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    atomic_write_text(root / LATEST, name + "\n")
    for stale in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    for junk in root.glob(".tmp_*"):  # leftovers of killed saves
        shutil.rmtree(junk, ignore_errors=True)
    return final


def _complete(path: Path) -> bool:
    return all((path / f).is_file() for f in (MODEL_FILE, EMA_FILE, STATE_FILE))


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and _complete(p))


def find_latest(ckpt_root: str | Path) -> Path | None:
    """The checkpoint named by ``latest`` (or the newest complete one if that file is missing or stale)."""
    root = Path(ckpt_root)
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if cand.is_dir() and _complete(cand):
            return cand
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint directory: ``{"model": ..., "ema": ..., "state": ...}`` (no pickled code is run)."""
    path = Path(path)
    if not _complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (needs {MODEL_FILE}, {EMA_FILE}, {STATE_FILE})")
    return {
        "model": load_file(path / MODEL_FILE, device=str(map_location)),
        "ema": load_file(path / EMA_FILE, device=str(map_location)),
        "state": torch.load(path / STATE_FILE, map_location=map_location, weights_only=True),
    }


def load_weights(path: str | Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """Only the (EMA) weights of a checkpoint directory."""
    path = Path(path)
    file = path / (EMA_FILE if ema else MODEL_FILE)
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} is not a checkpoint directory")
    return load_file(file)
