"""The cascade's two models in one module, their save/load, and the weight surgery that starts stage 2 from
stage 1 (see :mod:`dfm.baselines.cascade`)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from dfm.baselines.conditioned_dit import ConditionedDiT
from dfm.decomposition.base import _INTERP_MODES
from dfm.models.config import DiTConfig
from dfm.models.dit import DFMDiT
from dfm.models.precondition import flow_preconditioning
from dfm.models.surgery import repeat_head, spread_patch_embedding

CASCADE_CONFIG = "cascade.json"
MODEL_TYPE = "dfm-cascade"


class CascadeModel(nn.Module):
    """The two cascade stages in one module (so that one optimiser, one EMA and one checkpoint hold both).

    ``forward(x, t, y, stage=0)`` runs stage 1 on a low-resolution state; ``forward(x, t, y, stage=1, cond=...,
    cond_t=...)`` runs stage 2 on a full-resolution state with the upsampled conditioning image.

    Example:
        >>> import torch
        >>> from dfm.models import DiTConfig
        >>> cfg = DiTConfig(input_size=(16, 16), in_channels=1, patch_size=2, hidden_size=32, depth=1,
        ...                 num_heads=2, num_classes=3, stage_factors=(1,))
        >>> model = CascadeModel.from_config(cfg)
        >>> model.stage1.config.input_size, model.stage1.config.patch_size, model.stage1.config.num_tokens
        ((8, 8), 1, 64)
    """

    def __init__(self, stage1: DFMDiT, stage2: ConditionedDiT, factor: int = 2, mode: str = "bilinear") -> None:
        super().__init__()
        if mode not in _INTERP_MODES:
            raise ValueError(f"mode must be one of {_INTERP_MODES}, got {mode!r}")
        c1, c2 = stage1.config, stage2.config
        low = (*c2.input_size[:-2], *(s // factor for s in c2.input_size[-2:]))
        if c1.num_stages != 1 or c1.input_size != low or c1.in_channels != c2.in_channels:
            raise ValueError(
                f"stage 1 must be a one-stage model on {low} x {c2.in_channels} channels (stage 2's size / {factor}), "
                f"got input_size={c1.input_size}, in_channels={c1.in_channels}, stage_factors={c1.stage_factors}"
            )
        if c1.num_classes != c2.num_classes:
            raise ValueError(f"both stages need the same classes, got {c1.num_classes} and {c2.num_classes}")
        self.stage1 = stage1
        self.stage2 = stage2
        self.factor = int(factor)
        self.mode = mode  #: the filter of down(X) in training and of up(cond); the sampler must use the same
        # Saved with the weights so that a resumed run (and its EMA) knows whether the switch already happened.
        self.register_buffer("stage2_initialised", torch.zeros((), dtype=torch.bool))

    @classmethod
    def from_config(cls, config: DiTConfig, factor: int = 2, mode: str = "bilinear") -> CascadeModel:
        """Stage 2 from a one-stage full-resolution ``config``; stage 1 at size / factor with patch / factor."""
        if config.num_stages != 1:
            config = dataclasses.replace(config, stage_factors=(1,))
        if config.patch_size % factor or any(s % factor for s in config.input_size[-2:]):
            raise ValueError(
                f"patch_size={config.patch_size} and input_size={config.input_size} must be divisible by the cascade "
                f"factor {factor} (stage 1 uses patch {config.patch_size}/{factor} on the {factor}x smaller image)"
            )
        low = (*config.input_size[:-2], *(s // factor for s in config.input_size[-2:]))
        config1 = dataclasses.replace(config, input_size=low, patch_size=config.patch_size // factor)
        return cls(DFMDiT(config1), ConditionedDiT(config), factor, mode)

    # -- the model contract used by the trainer and the samplers ---------------------------------------------
    @property
    def config(self) -> DiTConfig:
        return self.stage2.config

    @property
    def num_stages(self) -> int:
        return 2

    @property
    def num_classes(self) -> int:
        return self.stage2.num_classes

    @property
    def null_class(self) -> int:
        return self.stage2.null_class

    @property
    def blocks(self) -> list[nn.Module]:
        """Both stages' transformer blocks (the trainer shards them one by one under FSDP)."""
        return [*self.stage1.blocks, *self.stage2.blocks]

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        stage: int = 1,
        cond: Tensor | None = None,
        cond_t: Tensor | None = None,
    ) -> Tensor:
        if stage == 0:
            return self.stage1([x], t.reshape(-1), y)[0]
        if stage == 1:
            return self.stage2(x, t, y, cond, cond_t)
        raise ValueError(f"the cascade has stages 0 and 1, got stage={stage}")

    @torch.no_grad()
    def init_stage2(self) -> None:
        """Fine-tuning start: stage 2 from the stage-1 weights (see :func:`init_stage2_from_stage1`)."""
        init_stage2_from_stage1(self.stage2, self.stage1)
        self.stage2_initialised.fill_(True)

    # -- save / load -------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """``cascade.json`` plus ``stage1/`` and ``stage2/`` in the DFMDiT format."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.stage1.save_pretrained(path / "stage1")
        self.stage2.save_pretrained(path / "stage2")
        meta = {
            "model_type": MODEL_TYPE,
            "factor": self.factor,
            "mode": self.mode,
            "stage2_initialised": bool(self.stage2_initialised),
        }
        tmp = path / (CASCADE_CONFIG + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, path / CASCADE_CONFIG)
        return path

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], device: str | torch.device = "cpu", format1: bool = False
    ) -> CascadeModel:
        """Load what :meth:`save_pretrained` wrote (``format1``: as :meth:`DFMDiT.from_pretrained`)."""
        path = Path(directory)
        if not (path / CASCADE_CONFIG).is_file():
            raise FileNotFoundError(
                f"{path / CASCADE_CONFIG} not found: expected a directory written by save_pretrained"
            )
        meta = json.loads((path / CASCADE_CONFIG).read_text())
        if meta.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{path / CASCADE_CONFIG} has model_type={meta.get('model_type')!r}, not {MODEL_TYPE!r}")
        stage1 = DFMDiT.from_pretrained(path / "stage1", format1=format1)
        stage2 = ConditionedDiT.from_pretrained(path / "stage2", format1=format1)
        model = cls(stage1, stage2, meta["factor"], meta.get("mode", "bilinear"))
        model.stage2_initialised.fill_(bool(meta.get("stage2_initialised", True)))
        return model.to(device)


@torch.no_grad()
def init_stage2_from_stage1(stage2: ConditionedDiT, stage1: DFMDiT) -> list[str]:
    """Copy the stage-1 weights into stage 2 where shapes allow; returns the names left at their initialisation.

    - Every tensor with the same name and shape is copied (blocks, timestep, label embedders, head modulation).
    - The patch embedding and the head change shape with the patch (p/f -> p): they are *lifted* so that stage 2
      on a nearest-upsampled image starts as stage 1 on the small one (our decision; the paper only says the
      model is fine-tuned from stage 1).
    - The conditioning embedders start as the lifted input embedder and a copy of the timestep embedder.
    """
    c1, c2 = stage1.config, stage2.config
    if (c1.hidden_size, c1.depth, c1.num_heads) != (c2.hidden_size, c2.depth, c2.num_heads):
        raise ValueError("stage 2 can only be initialised from a stage 1 with the same backbone (width, depth, heads)")
    factor = c2.patch_size // c1.patch_size
    src = stage1.state_dict()
    c = c2.in_channels
    lifted = {
        "x_embedders.0.weight": spread_patch_embedding(src["x_embedders.0.weight"], c, factor),
        "x_embedders.0.bias": src["x_embedders.0.bias"],
        "cond_embedder.weight": spread_patch_embedding(src["x_embedders.0.weight"], c, factor),
        "cond_embedder.bias": src["x_embedders.0.bias"],
        "final_layers.0.linear.weight": repeat_head(src["final_layers.0.linear.weight"], c, factor),
        "final_layers.0.linear.bias": repeat_head(src["final_layers.0.linear.bias"], c, factor),
    }
    for key, value in src.items():
        if key.startswith("t_embedders.0."):
            lifted["cond_t_embedder." + key.removeprefix("t_embedders.0.")] = value
    untouched = []
    for key, target in stage2.state_dict().items():
        value = lifted.get(key, src.get(key))
        if value is not None and value.shape == target.shape:
            target.copy_(value)
        else:
            untouched.append(key)
    return untouched


class CascadePreconditioned:
    """The cascade's velocity model: each stage's network preconditioned on its own path
    (:mod:`dfm.models.precondition`), with data std ``data_std[stage]`` (low resolution, then full).

    Stage 2's conditioning image lies on the same path as the low-resolution level (``cond = t_c low + (1 - t_c)
    ε``), so it gets the input scaling of its level t_c."""

    def __init__(self, network: CascadeModel, data_std: tuple[float, float]) -> None:
        self.network, self.data_std = network, tuple(float(v) for v in data_std)

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        stage: int = 1,
        cond: Tensor | None = None,
        cond_t: Tensor | None = None,
    ) -> Tensor:
        shape = (-1,) + (1,) * (x.ndim - 1)
        t = t.reshape(x.shape[0]).float()
        c_in, c_skip, c_out = (k.view(shape) for k in flow_preconditioning(t, self.data_std[stage]))
        if cond is not None:
            cond = flow_preconditioning(cond_t.reshape(x.shape[0]).float(), self.data_std[1])[0].view(shape) * cond
        return c_skip * x + c_out * self.network(c_in * x, t, y, stage, cond, cond_t)

    def __getattr__(self, name: str) -> object:
        return getattr(self.__dict__["network"], name)
