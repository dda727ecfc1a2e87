"""Convert pretrained diffusers text-to-image flow transformers (FLUX, SD3) into DFM models (paper Sec. 5).

Each adapter is an ``nn.Module`` with the package's model contract (t = 0 noise, t = 1 data)::

    model(levels_t, t, y=None, main_stage=None) -> velocities
    levels_t:   list of S latents (B, 16, H / f_s, W / f_s), coarse to fine (stage factors f_s, default (2, 1);
                (1,) is the unchanged transformer, one stage, for plain Flow Matching fine-tuning)
    t:          (B, S) float in [0, 1]
    y:          TextCondition(prompt_embeds (B, L, D), pooled (B, D)), or None for the empty prompt
                (set it once with ``set_empty_prompt``)
    main_stage: (B,) long; stages s > main_stage are inactive (inputs and times zeroed). None = last stage.

At initialisation the coarse stage reproduces the pretrained model (on the nearest-neighbour lift of the coarse
level, output average-pooled) and every new stage outputs 0; see :mod:`dfm.adapters.common`. diffusers (and peft
for LoRA) are optional dependencies (``pip install dfm[finetune]``); they are imported when an adapter is built.

:func:`load_adapter` builds an adapter from a diffusers FLUX / SD3 directory (``model_index.json`` +
``transformer/``), which is what ``dfm finetune --from DIR`` and the trainer do (``model.backbone=flux|sd3``,
``model.pretrained=DIR``).
"""

from dfm.adapters.build import ADAPTER_CLASSES, load_adapter, load_saved_adapter
from dfm.adapters.common import (
    AdapterConfig,
    StageAdapter,
    TextCondition,
    flux_image_ids,
    fsdp_wrap_modules,
    pack,
    unpack,
)
from dfm.adapters.flux import FluxDFMAdapter
from dfm.adapters.lora import DEFAULT_LORA_TARGETS, add_lora, lora_target_names
from dfm.adapters.sd3 import SD3DFMAdapter

__all__ = [
    "ADAPTER_CLASSES",
    "load_adapter",
    "load_saved_adapter",
    "DEFAULT_LORA_TARGETS",
    "AdapterConfig",
    "FluxDFMAdapter",
    "SD3DFMAdapter",
    "StageAdapter",
    "TextCondition",
    "add_lora",
    "flux_image_ids",
    "fsdp_wrap_modules",
    "lora_target_names",
    "pack",
    "unpack",
]
