"""Checkpoints that survive a kill at any moment, and carry no pickled code.

Layout of a run directory::

    run/config.json                      the resolved RunConfig
    run/checkpoints/step_00001000/       one checkpoint (a directory, renamed into place when complete)
        model.safetensors, ema.safetensors   weights (safetensors)
        state.pt                             optimizer, LR schedule, RNG and step (loaded with weights_only=True)
    run/checkpoints/latest               name of the newest complete checkpoint (replaced atomically)

A checkpoint is first written to a temporary directory and renamed into place with ``os.replace``, then
``latest`` is rewritten through a temporary file; a kill at any point leaves the previous checkpoint intact.
What a killed save leaves behind is tidied by :func:`clean_leftovers` at the next save or start: half-written
directories are deleted, and a checkpoint moved aside for a re-save of its step is put back if its
replacement never arrived. A file that cannot be written or read raises :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import errno
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


class CheckpointError(ValueError):
    """A checkpoint file that cannot be written (full disk, file-size limit) or read (damaged)."""


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


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
    clean_leftovers(root)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f".tmp_{name}_{os.getpid()}"
    try:
        tmp.mkdir()
        save_file(_state_to_cpu(model_state), tmp / MODEL_FILE)
        save_file(_state_to_cpu(ema_state), tmp / EMA_FILE)
        torch.save(train_state, tmp / STATE_FILE)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except Exception as err:  # OSError, or what safetensors and torch make of one (disk full, file-size limit)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"cannot write checkpoint {final}: {_first_line(err)}; free disk space or raise the file-size limit "
            "(ulimit -f), then resume: the previous checkpoint is intact"
        ) from err
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
    return final


def clean_leftovers(ckpt_root: str | Path) -> None:
    """Tidy what killed saves left in ``ckpt_root`` without ever touching a complete checkpoint's only copy.

    ``.tmp_*`` directories and ``latest.tmp*`` files are half-written and go. A ``.old_<name>_<pid>`` directory
    is a complete checkpoint moved aside for a re-save of its step: deleted if ``<name>`` is back in place,
    renamed back to ``<name>`` if the kill came before its replacement arrived.
    """
    root = Path(ckpt_root)
    if not root.is_dir():
        return
    for junk in root.glob(".tmp_*"):
        shutil.rmtree(junk, ignore_errors=True)
    for junk in root.glob(LATEST + ".tmp*"):
        junk.unlink(missing_ok=True)
    for old in root.glob(".old_step_*"):
        name = "_".join(old.name[len(".old_") :].split("_")[:2])  # .old_step_00000040_1234 -> step_00000040
        final = root / name
        if not (final.is_dir() and _complete(final)) and _complete(old):
            if final.exists():
                shutil.rmtree(final)
            os.replace(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)


def ensure_writable(directory: str | Path) -> Path:
    """Create ``directory`` if needed and check that files can be written in it, before any long work."""
    directory = Path(directory)
    probe = directory / f".write_test{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(
            f"cannot write to {directory}: {err.strerror or err}; choose a writable output directory"
        ) from None
    return directory


def _read(file: Path, load):
    """``load(file)``, with any failure to parse it reported as a damaged checkpoint file."""
    try:
        return load(file)
    except Exception as err:  # UnpicklingError, SafetensorError, truncated zip...: the file is damaged
        raise CheckpointError(
            f"cannot read checkpoint file {file}: {_first_line(err)}; the file is damaged: delete {file.parent} "
            "to fall back to the previous checkpoint, or pick another one"
        ) from None


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
        "model": _read(path / MODEL_FILE, lambda f: load_file(f, device=str(map_location))),
        "ema": _read(path / EMA_FILE, lambda f: load_file(f, device=str(map_location))),
        "state": _read(path / STATE_FILE, lambda f: torch.load(f, map_location=map_location, weights_only=True)),
    }


def load_weights(path: str | Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """Only the (EMA) weights of a checkpoint directory."""
    path = Path(path)
    file = path / (EMA_FILE if ema else MODEL_FILE)
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} is not a checkpoint directory")
    return _read(file, load_file)


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold an inf or a NaN."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def describe_os_error(err: OSError) -> str:
    """One line for an ``OSError``: the file, what went wrong and what to do about it."""
    where = f"{err.filename}: " if err.filename else ""
    what = err.strerror or str(err)
    hint = {
        errno.EACCES: "choose a writable location or fix its permissions",
        errno.EPERM: "choose a writable location or fix its permissions",
        errno.EROFS: "choose a location on a writable file system",
        errno.ENOSPC: "free disk space, then run the command again",
        errno.EFBIG: "raise the file-size limit (ulimit -f), then run the command again",
        errno.ENOTDIR: "a part of this path is a file, not a folder: choose another path",
    }.get(err.errno, "check the path and run the command again")
    return f"{where}{what}; {hint}"
