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

from dfm.checkpoint import find_latest, save_checkpoint
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


def load_weights_into(model: nn.Module, ema: Any, checkpoint: dict, path: Path) -> None:
    """The checkpoint's weights into the model and its EMA (before any sharding)."""
    try:
        load = getattr(model, "load_trainable_state_dict", model.load_state_dict)
        load(checkpoint["model"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
    except (RuntimeError, ValueError) as err:
        raise TrainingError(f"checkpoint {path} does not fit this model: {str(err).splitlines()[0]}") from None


def load_training_state(checkpoint: dict, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        fsdp: bool) -> int:  # fmt: skip
    """Optimizer, schedule and CPU RNG from a checkpoint; returns its step."""
    st = checkpoint["state"]
    load_optimizer_state_dict(model, optimizer, st["optimizer"], fsdp)
    scheduler.load_state_dict(st["scheduler"])
    torch.set_rng_state(st["rng_cpu"])
    return int(st["step"])
