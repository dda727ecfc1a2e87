"""A training run's log: ``metrics.jsonl`` (one JSON row per logged step), the progress bar and TensorBoard.

A resumed run first drops the rows after the step it resumes from (it writes them again) and a last row torn by a
crash or a full disk (:func:`truncate_log`), so the file always reads as one run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dfm.checkpoint import atomic_write_text
from dfm.visual import read_metrics

METRICS_FILE = "metrics.jsonl"


def truncate_log(run_dir: Path, step: int, name: str = METRICS_FILE) -> None:
    """Drop the log rows after ``step`` and a torn last row."""
    f = run_dir / name
    if f.is_file():
        keep = [row for row in read_metrics(f) if row.get("step", 0) <= step]
        atomic_write_text(f, "".join(json.dumps(row) + "\n" for row in keep))


class TrainingLog:
    """Where the rows of a run go: the metrics file (always), a progress bar and TensorBoard (optional)."""

    def __init__(self, run_dir: Path, total: int, initial: int, progress: bool = True, tensorboard: bool = False,
                 name: str = METRICS_FILE) -> None:  # fmt: skip
        self.bar = (
            tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, mininterval=1.0) if progress else None
        )
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError("train.tensorboard needs tensorboard: pip install 'dfm[tensorboard]'") from err
            self.writer = SummaryWriter(str(run_dir / "tb"))
        self.file = open(run_dir / name, "a")

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def write(self, row: dict[str, Any]) -> None:
        """One logged step: ``step``, ``loss`` and ``stage_loss`` (a list), and anything else."""
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.bar is not None:
            stages = " ".join(f"{v:.3f}" for v in row.get("stage_loss", []))
            speed = f" {row['images_per_s']:.0f} img/s" if "images_per_s" in row else ""
            self.bar.set_postfix_str(f"loss {row['loss']:.4f} [{stages}]{speed}")
        if self.writer is not None:
            self.writer.add_scalar("loss", row["loss"], row["step"])
            for s, v in enumerate(row.get("stage_loss", [])):
                self.writer.add_scalar(f"stage_loss/{s + 1}", v, row["step"])
            if "lr" in row:
                self.writer.add_scalar("lr", row["lr"], row["step"])

    def close(self) -> None:
        for handle in (self.bar, self.file, self.writer):
            if handle is not None:
                handle.close()
