"""Small helpers shared by the baselines.

Their objectives return :class:`dfm.objective.LossOutput` like DFM's. The trainer only reads ``loss``,
``stage_losses`` and ``stage_counts`` of it, and only moves ``main_stage``, ``t`` and ``noise`` of a draw to the device,
so every baseline draw keeps its randomness in those three fields.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dfm.objective import LossOutput

#: The baselines' losses are :class:`dfm.objective.LossOutput` records (this name is kept for old imports).
StageLoss = LossOutput


def stage_statistics(per_sample: Tensor, stage: Tensor, num_stages: int) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, stage_losses, stage_counts) from per-sample MSEs (B,) and the stage (B,) each sample trained."""
    onehot = torch.nn.functional.one_hot(stage.long(), num_stages).to(per_sample.dtype)  # (B, S)
    counts = onehot.sum(0)
    stage_losses = (per_sample.detach()[:, None] * onehot).sum(0) / counts.clamp(min=1)
    return per_sample.mean(), stage_losses, counts


def unwrap(model: Any) -> Any:
    """The module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while isinstance(model, nn.Module) and (hasattr(model, "module") or hasattr(model, "_orig_mod")):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def mse_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    """(B,) mean squared error over every element of each sample, computed in float32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)
