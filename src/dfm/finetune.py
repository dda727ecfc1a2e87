"""Fine-tune a pretrained one-stage flow model as a DFM (the paper's FLUX recipe, for our own DiT and, through
:mod:`dfm.adapters`, for diffusers FLUX / SD3 transformers: :func:`diffusers_finetune_config`).

Conversion of a one-stage :class:`~dfm.models.DFMDiT` (a ``--method fm`` run, or any standard DiT saved with
``save_pretrained``) into a multi-stage one whose output at initialisation *is* the pretrained model's:

- the transformer blocks, the class embedding and the final norm are copied;
- the pretrained patch embedding, timestep embedder and output head become the **coarsest** stage's. The coarse
  level is seen as if lifted ``f``x (nearest) onto the pretrained grid, so the pretrained ``p x p`` patch acts as
  a ``p/f x p/f`` patch: its embedding weights are summed over each ``f x f`` block (lift, then embed, exactly),
  and the head's outputs are averaged over each ``f x f`` block (average pooling undoes the nearest lift);
- every new stage's modules start at zero: patch embedding (its level adds nothing to the tokens), the last
  layer of its timestep embedder (zeroing both layers would freeze it: SiLU(0) = 0), its output head, and the
  stage-index embedding. A new stage's network output is therefore 0 at initialisation (its velocity is the
  preconditioning's skip term ``c_skip x``, as for any freshly initialised preconditioned stage).

We lift inside the model (the weight arithmetic above) rather than storing a lifted level in the decomposition:
the pyramid, the objective and the sampler stay the ones of a DFM trained from scratch, and the coarse stage keeps
its small patch count. Both views give the same function at initialisation.

With preconditioning, the coarse stage keeps the pretrained model's data std (so that the input scaling is the
same); the new stages get the std measured on the fine-tuning data.

Example:
    >>> import torch
    >>> from dfm.models import DFMDiT, DiTConfig
    >>> from dfm.finetune import convert_one_stage
    >>> fm = DFMDiT(DiTConfig(input_size=(8, 8), in_channels=1, patch_size=2, hidden_size=32, depth=1, num_heads=2,
    ...                       num_classes=3, stage_factors=(1,)))
    >>> dfm = convert_one_stage(fm, stage_factors=(2, 1))
    >>> dfm.config.stage_factors, dfm.config.stage_patch_size(0)
    ((2, 1), 1)
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dfm.config import DataConfig, MethodConfig, ModelConfig, OptimConfig, RunConfig, SamplerConfig, TrainConfig
from dfm.methods import get_method
from dfm.models import DFMDiT
from dfm.models.surgery import lift_patch_embedding, pool_head
from dfm.presets import PRESETS, get_preset
from dfm.resolve import resolve
from dfm.text import diffusers_kind

#: DiTConfig fields a target model must share with its one-stage source (everything but the stages)
SHARED_FIELDS = ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio",
                 "num_classes", "pos", "rope_base")  # fmt: skip


def check_compatible(target: DFMDiT, source: DFMDiT) -> None:
    """Raise ``ValueError`` unless ``source`` is a one-stage model with ``target``'s backbone."""
    if source.config.num_stages != 1:
        raise ValueError(f"the source model has {source.config.num_stages} stages: conversion starts from one stage")
    if target.config.specialise != "none" or source.config.specialise != "none":
        raise ValueError("conversion needs specialise='none' (per-stage experts have no pretrained counterpart)")
    diff = [f"{k}: {getattr(source.config, k)} vs {getattr(target.config, k)}" for k in SHARED_FIELDS
            if getattr(source.config, k) != getattr(target.config, k)]  # fmt: skip
    if diff:
        raise ValueError(f"the pretrained model and the DFM differ in {'; '.join(diff)}: fine-tune the same backbone")


@torch.no_grad()
def init_from_one_stage(target: DFMDiT, source: DFMDiT) -> DFMDiT:
    """Fill ``target`` (a multi-stage DFMDiT) from a one-stage ``source`` as described in the module docstring."""
    check_compatible(target, source)
    cfg = target.config
    c, p, f = cfg.in_channels, cfg.patch_size, cfg.stage_factors[0]
    src = source.state_dict()
    shared = {k: v for k, v in src.items() if not k.startswith(("x_embedders.", "t_embedders.", "final_layers."))}
    missing = target.load_state_dict(shared, strict=False).missing_keys
    unexpected = [k for k in missing if not k.startswith(("x_embedders.", "t_embedders.", "final_layers.", "stage_"))]
    if unexpected:
        raise ValueError(f"the source model lacks {unexpected[:3]}")
    coarse_embed, coarse_head = target.x_embedders[0], target.final_layers[0]
    coarse_embed.weight.copy_(lift_patch_embedding(source.x_embedders[0].weight, c, p, f))
    coarse_embed.bias.copy_(source.x_embedders[0].bias)
    target.t_embedders[0].load_state_dict(source.t_embedders[0].state_dict())
    coarse_head.adaLN_modulation.load_state_dict(source.final_layers[0].adaLN_modulation.state_dict())
    coarse_head.linear.weight.copy_(pool_head(source.final_layers[0].linear.weight, c, p, f))
    coarse_head.linear.bias.copy_(pool_head(source.final_layers[0].linear.bias, c, p, f))
    for s in range(1, cfg.num_stages):
        _zero(target.x_embedders[s])
        _zero(target.t_embedders[s].mlp[2])
        _zero(target.final_layers[s].linear)
        _zero(target.final_layers[s].adaLN_modulation[-1])
    if target.stage_embedder is not None:
        target.stage_embedder.weight.zero_()
    return target


def _zero(layer: nn.Linear) -> None:
    layer.weight.zero_()
    layer.bias.zero_()


def convert_one_stage(source: DFMDiT, stage_factors: Sequence[int] = (2, 1)) -> DFMDiT:
    """A new multi-stage DFMDiT with ``stage_factors``, initialised from the one-stage ``source``. A preconditioned
    source stays exact when the coarsest stage keeps its data std (:func:`source_data_std`)."""
    target = DFMDiT(dataclasses.replace(source.config, stage_factors=tuple(stage_factors)))
    return init_from_one_stage(target.to(next(source.parameters()).device), source)


def source_data_std(source: RunConfig, m: MethodConfig, measured: tuple[float, ...]) -> tuple[float, ...]:
    """The data stds of a run that starts from ``source``'s weights: with preconditioning, the pretrained stage(s)
    keep the source's std (so that their input scaling is the one they were trained with), the new stages get the
    std ``measured`` on the fine-tuning data."""
    src = source.method.data_std
    if not (m.precondition and source.method.precondition and src):
        return measured
    return tuple(src) if len(src) == len(measured) else (src[0], *measured[1:])


def load_source(target: nn.Module, source_network: nn.Module, source: RunConfig, cfg: RunConfig) -> None:
    """Fill ``target`` from the pretrained network of ``train.init_from``: copied (same stages) or converted (one
    stage -> the run's stages); ``ValueError`` naming ``train.init_from`` when that cannot be exact."""
    where = f"train.init_from={cfg.train.init_from}"
    if not isinstance(source_network, DFMDiT) or not isinstance(target, DFMDiT):
        raise ValueError(f"{where}: fine-tuning starts from a DFM-DiT (not {type(source_network).__name__})")
    if source.method.precondition != cfg.method.precondition:
        on = str(source.method.precondition).lower()
        raise ValueError(f"{where} was trained with precondition={on}: set -o method.precondition={on} (dfm finetune "
                         "does this for you)")  # fmt: skip
    if cfg.method.precondition and source.method.prediction != cfg.method.prediction:
        raise ValueError(f"{where} was trained with prediction={source.method.prediction}: set -o "
                         f"method.prediction={source.method.prediction} (dfm finetune does this for you)")  # fmt: skip
    std, src_std = cfg.method.data_std, source.method.data_std
    if cfg.method.precondition and std and src_std and std[0] != src_std[0]:
        raise ValueError(f"{where}: the coarsest stage's data std {std[0]} must be the pretrained model's {src_std[0]} "
                         "for an exact conversion; leave method.data_std unset")  # fmt: skip
    try:
        if source_network.config.num_stages == target.config.num_stages:
            if source_network.config != target.config:
                raise ValueError("its config differs from this run's model: fine-tune the same model")
            target.load_state_dict(source_network.state_dict())
        else:
            init_from_one_stage(target, source_network)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def is_video(data: DataConfig) -> bool:
    """Whether ``data`` names clips (frames per clip set, or the built-in moving Fashion-MNIST), not images."""
    return data.frames is not None or data.dataset.lower().replace("_", "-").startswith("moving-fashion")


def finetune_config(source: RunConfig, method: str = "dfm", steps: int = 800, like: str = "quickstart",
                    source_video: bool | None = None) -> RunConfig:  # fmt: skip
    """The run config of ``dfm finetune``: the pretrained run's model, data, optimiser and training settings, with

    - the method: ``dfm`` takes the method settings of the DFM preset ``like`` (stages, p(Q), sampling steps), with
      as many stages as that preset, which must be made for the source's kind of data (images or videos;
      ``source_video``: whether the source generates videos, default: read from its data settings); ``fm`` keeps
      the source's one-stage method (plain fine-tuning, the baseline);
    - preconditioning and its prediction target as the pretrained model had them (an exact conversion needs the
      same input scaling and output parametrisation);
    - the learning rate a tenth of the source's (the paper: 1e-4 pretraining, 1e-5 fine-tuning) and a warm-up of
      at most a tenth of the steps;
    - ``train.init_from`` left for the caller to set (the pretrained directory).
    """
    if source.method.name not in ("fm", "dfm"):
        raise ValueError(f"fine-tuning starts from a DFM-DiT run (fm or dfm), not from method {source.method.name}")
    cfg = copy.deepcopy(source)
    if method == "dfm":
        if source.method.stages != 1:
            raise ValueError("--method dfm converts a one-stage (Flow Matching) model; this one already has stages")
        template = get_preset(like)
        if template.method.name != "dfm":
            raise ValueError(f"--like {like}: choose a DFM preset for the method settings (e.g. quickstart)")
        video = is_video(source.data) if source_video is None else source_video
        if is_video(template.data) != video:
            kind = "video" if video else "image"
            fits = [name for name in PRESETS if get_preset(name).method.name == "dfm"
                    and is_video(get_preset(name).data) == video]  # fmt: skip
            raise ValueError(f"--like {like}: a preset for {'images' if video else 'videos'}, but the pretrained "
                             f"model is a{'' if video else 'n'} {kind} model; choose a DFM preset for "
                             f"{kind}s: {', '.join(fits)}")  # fmt: skip
        cfg.method = dataclasses.replace(template.method, precondition=source.method.precondition,
                                         prediction=source.method.prediction, data_std=None)  # fmt: skip
        cfg.sampler = dataclasses.replace(template.sampler)
    elif method == "fm":
        if source.method.name != "fm":
            raise ValueError("--method fm fine-tunes a one-stage (Flow Matching) model as it is; this one is a DFM")
        cfg.method = dataclasses.replace(source.method, data_std=None)
    else:
        raise ValueError(f"--method {method}: choose dfm (convert, then fine-tune as a DFM) or fm (plain fine-tuning)")
    cfg.optim = dataclasses.replace(source.optim, lr=source.optim.lr / 10,
                                    warmup_steps=min(source.optim.warmup_steps, steps // 10))  # fmt: skip
    cfg.train = dataclasses.replace(source.train, steps=steps, init_from=None)
    cfg.preset = f"finetune-{method}"
    return resolve(cfg)


def diffusers_finetune_config(
    pretrained: str | os.PathLike[str], method: str = "dfm", steps: int = 1000, data: str | None = None
) -> RunConfig:
    """The paper's fine-tuning recipe for a diffusers FLUX / SD3 directory (``dfm finetune --from DIR``).

    - model: ``model.backbone=flux|sd3`` (read from ``transformer/config.json``), ``model.pretrained=DIR``; FLUX's
      guidance-distilled input fixed at 1.0; no preconditioning (these models are not preconditioned);
    - method ``dfm``: two stages, factors (2, 1), p(Q) = (0.9, 0.1), sampling 30 + 10 = 40 Euler steps with
      threshold 0.7; ``fm``: the same transformer unchanged as plain Flow Matching, 40 Euler steps (the baseline:
      same data, steps and batch); both sample with true classifier-free guidance, scale 3.0;
    - 10% caption dropout (to the empty prompt);
    - AdamW betas (0.9, 0.99), eps 1e-8, lr 1e-5, weight decay 0.01, linear warm-up over min(1000, steps / 10)
      steps, gradient clipping at 1.0, no EMA (``optim.ema``: it doubles the memory of a full fine-tune);
    - bf16 autocast, batch 16, a checkpoint every 1000 steps, 8 images in the periodic samples.

    ``data``: the captioned latents (``dfm prepare --text-encoder``); the caller may set it later.
    """
    if method not in ("dfm", "fm"):
        raise ValueError(f"--method {method}: choose dfm (convert, then fine-tune as a DFM) or fm (plain fine-tuning)")
    kind = diffusers_kind(pretrained)
    cfg = RunConfig(
        method=MethodConfig(name="dfm", stages=2, precondition=False, label_dropout=0.1),
        sampler=SamplerConfig(steps=(30, 10), thresholds=(0.7,), guidance=(3.0,)),
        model=ModelConfig(backbone=kind, pretrained=str(Path(pretrained).resolve()), distilled_guidance=1.0),
        data=DataConfig(dataset=data or "", resolution=None),
        optim=OptimConfig(
            lr=1e-5, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, warmup_steps=min(1000, steps // 10), ema=False
        ),  # fmt: skip
        train=TrainConfig(steps=steps, batch_size=16, precision="bf16", ckpt_every=1000, num_sample_images=8),
        preset=f"finetune-{kind}-{method}",
    )
    if method == "fm":
        cfg = get_method("fm").from_dfm(cfg)
    return resolve(cfg)
