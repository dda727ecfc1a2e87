"""Model names -> config factories (``DiT-XL/2``, ``DFM-DiT-XL/2``, small CPU presets), and parameter counts.

The number after the slash is the patch size of the finest stage. ``DiT-*`` names are one-stage models (plain
Flow Matching), ``DFM-DiT-*`` names have two stages with a factor 2 between them. Any field of
:class:`DiTConfig` can be overridden: ``create_model("DFM-DiT-B/2", input_size=(64, 64), num_classes=10)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import partial

import torch

from dfm.models.config import DiTConfig
from dfm.models.dit import DFMDiT

# (depth, hidden size, heads) of the DiT paper.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
# Small presets for CPU work: 32x32 single-channel inputs (padded Fashion-MNIST), 10 classes, patch 4 -> 64
# tokens. Tiny is ~1.3M and Mini ~7M parameters with two stages.
SMALL_SIZES: dict[str, tuple[int, int, int]] = {
    "Tiny": (4, 128, 4),
    "Mini": (6, 256, 4),
}

MODEL_REGISTRY: dict[str, Callable[..., DiTConfig]] = {}
for _size, (_depth, _width, _heads) in DIT_SIZES.items():
    for _patch in (2, 4, 8):
        for _prefix, _factors in (("DiT", (1,)), ("DFM-DiT", (2, 1))):
            MODEL_REGISTRY[f"{_prefix}-{_size}/{_patch}"] = partial(
                DiTConfig, depth=_depth, hidden_size=_width, num_heads=_heads, patch_size=_patch,
                stage_factors=_factors,
            )  # fmt: skip
for _size, (_depth, _width, _heads) in SMALL_SIZES.items():
    for _prefix, _factors in (("DiT", (1,)), ("DFM-DiT", (2, 1))):
        MODEL_REGISTRY[f"{_prefix}-{_size}"] = partial(
            DiTConfig, input_size=(32, 32), in_channels=1, num_classes=10, patch_size=4, depth=_depth,
            hidden_size=_width, num_heads=_heads, stage_factors=_factors,
        )  # fmt: skip


def create_config(name: str, **overrides: object) -> DiTConfig:
    """The config registered under ``name`` with ``overrides`` applied."""
    if name not in MODEL_REGISTRY:
        close = difflib.get_close_matches(name, MODEL_REGISTRY, n=3)
        hint = f"did you mean {close}?" if close else f"choose one of {sorted(MODEL_REGISTRY)}"
        raise ValueError(f"unknown model {name!r}; {hint}")
    try:
        return MODEL_REGISTRY[name](**overrides)
    except TypeError as err:  # an unknown keyword
        raise ValueError(f"bad override for {name!r}: {err}") from None


def create_model(name: str, **overrides: object) -> DFMDiT:
    """Build the model registered under ``name``, e.g. ``create_model("DFM-DiT-XL/2")``."""
    return DFMDiT(create_config(name, **overrides))


def count_parameters(config: DiTConfig | str, **overrides: object) -> int:
    """Number of parameters of a config (or registry name), counted on the meta device without allocating."""
    if isinstance(config, str):
        config = create_config(config, **overrides)
    elif overrides:
        raise ValueError("overrides are only accepted together with a registry name")
    with torch.device("meta"):
        model = DFMDiT(config)
    return sum(p.numel() for p in model.parameters())
