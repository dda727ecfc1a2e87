"""Small helpers shared by the baselines.

Their objectives return :class:`dfm.objective.LossOutput` like DFM's. The trainer only reads ``loss``,
``stage_losses`` and ``stage_counts`` of it, and only moves ``main_stage``, ``t`` and ``noise`` of a draw to the device,
so every baseline draw keeps its randomness in those three fields.
"""

from __future__ import annotations

import torch
from torch import Tensor


def stage_statistics(per_sample: Tensor, stage: Tensor, num_stages: int) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, stage_losses, stage_counts) from per-sample MSEs (B,) and the stage (B,) each sample trained."""
    onehot = torch.nn.functional.one_hot(stage.long(), num_stages).to(per_sample.dtype)  # (B, S)
    counts = onehot.sum(0)
    stage_losses = (per_sample.detach()[:, None] * onehot).sum(0) / counts.clamp(min=1)
    return per_sample.mean(), stage_losses, counts


def mse_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    """(B,) mean squared error over every element of each sample, computed in float32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)
