"""A training run's checkpoints and log: what resuming reads and what a save writes (files: :mod:`dfm.checkpoint`).

A checkpoint holds the model's weights (a diffusers backbone: its ``trainable_state_dict``), the EMA's, and the
training state: optimizer, learning-rate schedule, CPU RNG and step. Nothing that holds an inf or a NaN is ever
written, so ``latest`` always names weights that resume and sample.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfm.checkpoint import (
    EMA_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    check_state,
    find_latest,
    first_mismatch,
    is_optimizer_state,
    is_step,
    list_checkpoints,
    non_finite,
    optimizer_mismatch,
    save_checkpoint,
    state_dict_error,
)
from dfm.config import RunConfig, config_diff
from dfm.run import CHECKPOINTS, CONFIG_FILE, adopt_measurements, resume_conflicts
from dfm.training.distributed import Dist, full_state_dict, load_optimizer_state_dict, optimizer_state_dict
from dfm.training.ema import TrainableEMA


class TrainingError(RuntimeError):
    """A problem the user can act on (bad data, diverged loss, mismatching checkpoint)."""


def resume_checkpoint(run_dir: Path, resume: str | None, cfg: RunConfig, main: bool = True) -> Path | None:
    """The checkpoint to resume from (``resume``: None, ``"auto"`` or a checkpoint directory). A run directory that
    already holds checkpoints is never started over; a checkpoint of a run trained with other settings is refused.
    What the run measured at its start (stds, the cascade's switch step) is adopted into ``cfg``."""
    root = run_dir / CHECKPOINTS
    if resume in (None, "", "none"):
        if root.is_dir() and find_latest(root):
            raise TrainingError(f"{run_dir} already holds checkpoints: pass --resume auto to continue it, "
                                "or choose another --out")  # fmt: skip
        return None
    path = find_latest(root) if resume == "auto" else Path(resume)
    if path is None:
        return None  # --resume auto on a fresh run directory starts from scratch
    if not path.is_dir():
        raise TrainingError(f"checkpoint {path} does not exist")
    saved = run_dir / CONFIG_FILE if resume == "auto" else path.parent.parent / CONFIG_FILE
    if saved.is_file():
        old = RunConfig.load(saved)
        adopt_measurements(old, cfg)
        diffs = resume_conflicts(old, cfg)
        if diffs:
            raise TrainingError(f"checkpoint {path} was trained with another config ({'; '.join(diffs[:4])}): "
                                "resume with the same settings or start a new run")  # fmt: skip
        changed = [line for line in config_diff(old, cfg) if line.startswith("sampler.")]
        if changed and main:
            print(f"note: sampling settings changed on resume ({'; '.join(changed)}); they do not affect training",
                  file=sys.stderr)  # fmt: skip
    return path


def model_state(model: nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds of the model (a collective under FSDP)."""
    state = full_state_dict(model, fsdp)
    trainable = getattr(model, "trainable_state_dict", None)
    return trainable(state) if trainable is not None else state


def ema_state(ema: nn.Module | TrainableEMA | None, fsdp: bool) -> dict[str, torch.Tensor]:
    if ema is None:
        return {}  # no EMA: samples use the model's weights
    return ema.state_dict() if isinstance(ema, TrainableEMA) else full_state_dict(ema, fsdp)


def save(run_dir: Path, step: int, model: nn.Module, ema: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
         d: Dist, fsdp: bool, keep_last: int) -> Path | None:  # fmt: skip
    """Write checkpoint ``step`` (rank 0; every rank takes part in the FSDP gathers)."""
    weights, averaged = model_state(model, fsdp), ema_state(ema, fsdp)
    optim = optimizer_state_dict(model, optimizer, fsdp)
    if not d.main:
        return None
    state = {"optimizer": optim, "scheduler": scheduler.state_dict(), "rng_cpu": torch.get_rng_state(), "step": step}
    return save_checkpoint(run_dir / CHECKPOINTS, step, weights, averaged, state, keep_last)


#: what a trainer's ``state.pt`` holds (:func:`save`), checked before any of it is used
TRAINING_STATE = {
    "optimizer": (is_optimizer_state, "an optimizer state (a dict of state and param_groups)"),
    "scheduler": (lambda v: isinstance(v, dict), "a learning-rate schedule state (a dict)"),
    "rng_cpu": (lambda v: torch.is_tensor(v) and v.dtype == torch.uint8 and v.ndim == 1, "a CPU RNG state (bytes)"),
    "step": (is_step, "a step number"),
}  # fmt: skip


def _earlier(path: Path) -> str:
    """What to resume from instead of the checkpoint ``path``: the newest checkpoint before it, if one is left."""
    before = [p for p in list_checkpoints(path.parent) if p.name < path.name]
    if before:
        return f"resume from an earlier checkpoint with --resume {before[-1]}, or start a new run with a lower optim.lr"
    return "no earlier checkpoint is left: start a new run (another --out) with a lower optim.lr"


def _require_finite(state: dict[str, torch.Tensor], file: Path, path: Path) -> None:
    bad = non_finite(state)
    if bad:
        raise CheckpointError(f"checkpoint {path} holds inf or NaN weights ({len(bad)} tensors, e.g. {bad[0]} in "
                              f"{file}): the run had diverged; {_earlier(path)}")  # fmt: skip


def load_weights_into(model: nn.Module, ema: Any, checkpoint: dict, path: Path) -> None:
    """The checkpoint's weights into the model and its EMA (before any sharding). Weights of another shape, or that
    hold inf or NaN, are refused with an error naming the file (and, for the shape, the first weight that differs)."""
    parts = [(model, checkpoint["model"], MODEL_FILE, getattr(model, "load_trainable_state_dict", None))]
    if ema is not None:
        parts.append((ema, checkpoint["ema"], EMA_FILE, None))
    for module, state, name, load in parts:
        file = path / name
        _require_finite(state, file, path)
        try:
            reason = first_mismatch(module.state_dict(), state)
            if reason is None:
                (load or module.load_state_dict)(state)
        except (RuntimeError, ValueError, KeyError) as err:
            reason = state_dict_error(err)
        if reason is not None:
            raise CheckpointError(f"checkpoint file {file} does not fit this model: {reason}; it belongs to another "
                                  "run (resume from this run's own checkpoints), or the config was edited")  # fmt: skip


def load_training_state(checkpoint: dict, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        fsdp: bool, path: Path) -> int:  # fmt: skip
    """Optimizer, schedule and CPU RNG from the checkpoint ``path``; returns its step. A state that is not a training
    state, or that belongs to another model, is refused with an error naming the file."""
    file = path / STATE_FILE
    st = check_state(checkpoint["state"], file, TRAINING_STATE)
    moments = {f"optimizer state {k}": v for k, v in _tensors(st["optimizer"]["state"])}
    _require_finite(moments, file, path)
    # Under FSDP the saved state is keyed by parameter name, and torch's own checks stand.
    why = None if fsdp else optimizer_mismatch(optimizer, st["optimizer"])
    if why is None:
        try:
            load_optimizer_state_dict(model, optimizer, st["optimizer"], fsdp)
            scheduler.load_state_dict(st["scheduler"])
            torch.set_rng_state(st["rng_cpu"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
            why = state_dict_error(err)
    if why is not None:
        raise CheckpointError(f"checkpoint file {file} holds the training state of another model ({why}): it "
                              "belongs to another run; resume from this run's own checkpoints, or start a new run "
                              "(another --out)")  # fmt: skip
    return int(st["step"])


def _tensors(state: dict) -> list[tuple[str, torch.Tensor]]:
    """(parameter.entry, tensor) for the tensors of an optimizer's per-parameter state."""
    return [(f"{k}.{name}", v) for k, entries in state.items() if isinstance(entries, dict)
            for name, v in entries.items() if torch.is_tensor(v)]  # fmt: skip
