"""The exponential moving average of a model's weights, sampled by default.

Our DiT keeps a full copy (:func:`create_ema`); a diffusers backbone only its trainable parameters
(:class:`TrainableEMA`): its frozen weights never change, and a copy of a 12B transformer would double the memory.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class TrainableEMA:
    """EMA of a model's trainable parameters only; its state dict is keyed by the model's parameter names."""

    def __init__(self, model: nn.Module) -> None:
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def parameters(self) -> Iterator[Tensor]:
        return iter(self.shadow.values())

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().to(self.shadow[name].dtype), 1.0 - decay)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise RuntimeError(f"EMA keys differ: missing {sorted(set(self.shadow) - set(state))[:3]}, unexpected "
                               f"{sorted(set(state) - set(self.shadow))[:3]}")  # fmt: skip
        for name, value in state.items():
            self.shadow[name].copy_(value)

    def copy_into(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with the averaged weights."""
        full = copy.deepcopy(model)
        full.load_state_dict(self.state_dict(), strict=False)
        return full.eval()


def create_ema(model: nn.Module, enabled: bool = True) -> nn.Module | TrainableEMA | None:
    """The EMA of ``model``: None when disabled; trainable parameters only for a diffusers backbone."""
    if not enabled:
        return None
    if hasattr(model, "trainable_state_dict"):
        return TrainableEMA(model)
    return copy.deepcopy(model).requires_grad_(False).eval()


@torch.no_grad()
def update_ema(ema: nn.Module | TrainableEMA | None, model: nn.Module, decay: float) -> None:
    """``ema ← decay · ema + (1 - decay) · model``."""
    if isinstance(ema, TrainableEMA):
        ema.update(model, decay)
    elif ema is not None:
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1.0 - decay)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """EMA decay at optimiser step ``step`` (1-based); the warm-up keeps short runs from averaging the init."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay
