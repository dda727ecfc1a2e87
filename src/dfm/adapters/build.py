"""Build a DFM adapter from a diffusers FLUX / SD3 model directory, or load one saved with ``save_pretrained``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from dfm.adapters.common import ADAPTER_CONFIG, StageAdapter
from dfm.adapters.flux import FluxDFMAdapter
from dfm.adapters.lora import add_lora
from dfm.adapters.sd3 import SD3DFMAdapter
from dfm.text import diffusers_kind

#: backbone name (``model.backbone``) -> adapter class
ADAPTER_CLASSES: dict[str, type[StageAdapter]] = {"flux": FluxDFMAdapter, "sd3": SD3DFMAdapter}


def load_adapter(
    path: str | os.PathLike[str],
    stage_factors: Sequence[int] = (2, 1),
    guidance: float | None = 1.0,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    gradient_checkpointing: bool = False,
    torch_dtype: torch.dtype | None = None,
    kind: str | None = None,
) -> StageAdapter:
    """The transformer of the diffusers directory ``path`` (``subfolder="transformer"``) converted to a DFM with
    ``stage_factors`` ((1,): one stage, the transformer unchanged). ``guidance``: FLUX's guidance-distilled input
    (ignored for a FLUX without one and for SD3). ``lora_rank > 0`` adds LoRA (alpha defaults to the rank) and
    freezes the pretrained weights; the new stage modules always train fully."""
    found = diffusers_kind(path)
    if kind is not None and kind != found:
        raise ValueError(f"{path} holds a {found.upper()} transformer, not {kind.upper()}: set model.backbone={found}")
    kind = found
    cls = ADAPTER_CLASSES[kind]
    transformer = cls._transformer_class().from_pretrained(str(path), subfolder="transformer", torch_dtype=torch_dtype)
    if kind == "flux":
        adapter = cls(transformer, stage_factors, guidance if transformer.config.guidance_embeds else None)
    else:
        adapter = cls(transformer, stage_factors)
    if lora_rank > 0:
        add_lora(adapter, lora_rank, float(lora_alpha if lora_alpha is not None else lora_rank))
    if gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    return adapter


def load_saved_adapter(path: str | os.PathLike[str], torch_dtype: torch.dtype | None = None) -> StageAdapter:
    """An adapter written by :meth:`~dfm.adapters.common.StageAdapter.save_pretrained` (FLUX or SD3)."""
    settings = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    for cls in ADAPTER_CLASSES.values():
        if settings.get("model_type") == cls.model_type:
            return cls.from_pretrained(path, torch_dtype=torch_dtype)
    raise ValueError(f"{Path(path) / ADAPTER_CONFIG}: unknown adapter type {settings.get('model_type')!r}")
