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
replacement never arrived. A file that cannot be written or read raises :class:`CheckpointError` naming it, and
so does a ``state.pt`` that loads but is not a training state (:func:`check_state`). No message ever repeats a
library's advice to load a file unsafely (``weights_only=False``, ``allow_pickle``): :func:`load_error_reason`
says what is wrong with the file instead.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
from collections.abc import Callable, Mapping
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


def load_error_reason(err: BaseException) -> str:
    """Why a file did not load, in a few words, without the loader's advice (torch's ``weights_only=False``,
    numpy's ``allow_pickle``: loading an untrusted file that way runs any code it holds)."""
    text = str(err)
    if "contains pickled (object) data" in text:  # numpy: neither an .npz nor an .npy, so a pickle at best
        return "it is not a numpy archive: reading it would mean unpickling it, which runs any code it holds"
    if "Object arrays cannot be loaded" in text:
        return "it holds arrays of Python objects, which only unpickling would read"
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f"a pickled {found.group(1)}" if found else "pickled Python objects"
        return f"it holds {what}, not only tensors and numbers"
    if "allow_pickle" in text or "weights_only" in text:  # any other advice of that kind: not repeated
        return f"it cannot be read safely ({type(err).__name__})"
    first = _first_line(err)
    return re.split(r"(?<=[a-z\]])\. ", first, maxsplit=1)[0].rstrip(".")[:200]  # the first sentence


def _read(file: Path, load):
    """``load(file)``, with any failure to parse it reported as a damaged checkpoint file."""
    try:
        return load(file)
    except Exception as err:  # UnpicklingError, SafetensorError, truncated zip...: the file is damaged
        raise CheckpointError(
            f"cannot read checkpoint file {file}: it is not a checkpoint file written by dfm, or it is damaged "
            f"({load_error_reason(err)}); delete {file.parent} to fall back to the previous checkpoint, or pick "
            "another one"
        ) from None


def bad_state(file: Path, what: str) -> CheckpointError:
    """The error for a ``state.pt`` that loads but does not hold what dfm writes (``what``: what is wrong)."""
    return CheckpointError(
        f"checkpoint file {file} {what}: it is not a checkpoint written by dfm, or it is damaged; delete "
        f"{file.parent} to fall back to the previous checkpoint, or pick another one"
    )


def check_state(state: Any, file: Path, fields: Mapping[str, tuple[Callable[[Any], bool], str]]) -> dict[str, Any]:
    """``state`` if it is a dict whose every entry of ``fields`` (name -> (test, what it must be)) passes its test;
    else :func:`bad_state` naming ``file``, the first entry that does not, and what it must be."""
    if not isinstance(state, dict):
        raise bad_state(file, f"holds a {type(state).__name__} instead of a dict of training state")
    for name, (test, must) in fields.items():
        if name not in state:
            raise bad_state(file, f"has no {name!r} entry")
        try:
            ok = bool(test(state[name]))
        except Exception:  # noqa: BLE001 - a test that cannot even run on the value: it is not what it must be
            ok = False
        if not ok:
            raise bad_state(file, f"holds a {name!r} entry that is not {must}")
    return state


def is_step(value: Any) -> bool:
    """Whether ``value`` is a step number (an int >= 0, not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def first_mismatch(expected: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor]) -> str | None:
    """The first weight of ``loaded`` whose shape differs from ``expected``'s, both shapes in words (None: all
    shared weights have the same shape)."""
    for name, value in loaded.items():
        want = expected.get(name)
        if want is not None and torch.is_tensor(value) and tuple(value.shape) != tuple(want.shape):
            return f"weight {name} has shape {tuple(value.shape)} there but {tuple(want.shape)} in this model"
    return None


def optimizer_mismatch(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> str | None:
    """How a saved optimizer state (``optimizer.state_dict()`` of a checkpoint) does not fit ``optimizer``, in words
    (None: it fits): another number of parameters, or a moment whose shape is not its parameter's (torch's
    ``load_state_dict`` checks neither shape, and the first step then fails)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in saved["param_groups"] for i in group.get("params", [])]
    if len(ids) != len(params):
        return f"it holds the state of {len(ids)} parameters, this model has {len(params)}"
    for i, (key, param) in enumerate(zip(ids, params)):
        entries = saved["state"].get(key, {})
        for name, value in entries.items() if isinstance(entries, dict) else ():
            if torch.is_tensor(value) and value.ndim > 0 and tuple(value.shape) != tuple(param.shape):
                return f"{name} of parameter {i} has shape {tuple(value.shape)}, the parameter {tuple(param.shape)}"
    return None


def is_optimizer_state(value: Any) -> bool:
    """Whether ``value`` looks like ``optimizer.state_dict()``: a dict of ``state`` (a dict) and ``param_groups``."""
    return (
        isinstance(value, dict) and isinstance(value.get("state"), dict) and isinstance(value.get("param_groups"), list)
    )


def state_dict_error(err: BaseException) -> str:
    """The useful part of a ``load_state_dict`` error (its first line naming weights; torch puts them after a
    heading line), with torch's ``torch.Size([...])`` written as plain shapes."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "size mismatch" in line or "Missing key" in line or "Unexpected key" in line]
    line = (named or lines or [type(err).__name__])[0]
    size = re.match(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
                    r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)", line)  # fmt: skip
    if size:
        name, there, here = size.groups()
        return f"weight {name} has shape ({there}) there but ({here}) in this model"
    keys = re.match(r"(Missing|Unexpected) key\(s\) in state_dict: (.*)", line)
    if keys:
        names = re.findall(r'"([^"]+)"', keys.group(2)) or [keys.group(2)]
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        if keys.group(1) == "Missing":
            return f"it lacks weight {names[0]}{more}"
        return f"it holds weight {names[0]}{more} that this model does not have"
    return line[:300]


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


def load_state_file(file: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """A file written with ``torch.save``, loaded without running pickled code (``weights_only=True``); a
    :class:`CheckpointError` naming it when it cannot be read."""
    file = Path(file)
    return _read(file, lambda f: torch.load(f, map_location=map_location, weights_only=True))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint directory: ``{"model": ..., "ema": ..., "state": ...}`` (no pickled code is run). The
    state must be a dict with its ``step``; what else it must hold is its writer's to check (:func:`check_state`)."""
    path = Path(path)
    if not _complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (needs {MODEL_FILE}, {EMA_FILE}, {STATE_FILE})")
    state = load_state_file(path / STATE_FILE, map_location)
    check_state(state, path / STATE_FILE, {"step": (is_step, "a step number")})
    return {
        "model": _read(path / MODEL_FILE, lambda f: load_file(f, device=str(map_location))),
        "ema": _read(path / EMA_FILE, lambda f: load_file(f, device=str(map_location))),
        "state": state,
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
