"""A run config resolved for use: the checks that need the method and model registries, made in one place.

:class:`dfm.config.RunConfig` is plain data and checks only what it can see alone. :func:`resolve` adds what needs
the registries (the method's own checks and typed options, the model's fields, the diffusers backbones) and fills
in the method's option defaults; :func:`apply_overrides` parses ``section.key=value`` settings and resolves the
result. Presets, the trainer, run loading and the benchmark all resolve through here.

Example:
    >>> from dfm.presets import get_preset
    >>> cfg = apply_overrides(get_preset("quickstart"), ["train.steps=100", "method.stage_probs=0.7,0.3"])
    >>> cfg.train.steps, cfg.method.stage_probs
    (100, (0.7, 0.3))
"""

from __future__ import annotations

import copy
import dataclasses
import typing

from dfm.config import RunConfig, coerce_json, fits, parse_value
from dfm.methods import get_method, method_names
from dfm.models.config import DiTConfig

SECTIONS = ("method", "sampler", "model", "data", "optim", "train")


def resolve(cfg: RunConfig) -> RunConfig:
    """Check ``cfg`` completely and fill in its method's option defaults (in place); returns it.

    Every error is a ``ValueError`` that names the setting and says what to change."""
    cfg.validate()
    m = cfg.method
    method = get_method(m.name)
    _resolve_options(cfg)  # first, so that the method's own checks see its typed options
    method.validate(cfg)
    cfg.sampler.validate(m.stages, method.uses_thresholds)
    if m.stage_probs is not None and not method.uses_stage_probs:
        raise ValueError(f"method {m.name} does not draw a main stage: remove method.stage_probs (set it to none)")
    if cfg.train.distributed == "fsdp" and not method.supports_fsdp:
        raise ValueError(f"method {m.name} does not support FSDP: use train.distributed=ddp")
    if m.prediction not in method.predictions:
        raise ValueError(f"method {m.name} implements method.prediction={' or '.join(method.predictions)}, "
                         f"not {m.prediction}")  # fmt: skip
    n_std = method.num_data_std(m)
    if m.data_std is not None and (len(m.data_std) != n_std or min(m.data_std) <= 0):
        raise ValueError(f"method.data_std={m.data_std} needs {n_std} positive values (one per stage), or none")
    fields = typing.get_type_hints(DiTConfig)
    for name, value in cfg.model.overrides.items():
        if name not in fields:
            raise ValueError(
                f"unknown model setting model.overrides.{name}; DiTConfig fields: {', '.join(sorted(fields))}"
            )
        if not fits(value, fields[name]):
            kind = fields[name].__name__ if isinstance(fields[name], type) else str(fields[name])
            raise ValueError(
                f"model.overrides.{name}={value!r} must be of type {kind}: give it as e.g. true, 2, 0.5 or 2,1"
            )
    _check_backbone(cfg)
    return cfg


def _check_backbone(cfg: RunConfig) -> None:
    """The diffusers backbones (flux, sd3): what they support, each error saying what to set."""
    mc, m = cfg.model, cfg.method
    if mc.backbone == "dit":
        if mc.lora_rank or mc.gradient_checkpointing or mc.pretrained:
            raise ValueError(
                "model.lora_rank, model.gradient_checkpointing and model.pretrained apply to model.backbone=flux|sd3; "
                "our DiT starts from train.init_from"
            )
        return
    if not mc.pretrained:
        raise ValueError(f"model.backbone={mc.backbone} needs model.pretrained=<diffusers model directory>")
    if m.name not in ("dfm", "fm"):
        raise ValueError(f"model.backbone={mc.backbone} trains with method dfm or fm, not {m.name}")
    if m.precondition:
        raise ValueError(f"model.backbone={mc.backbone} is not preconditioned: set method.precondition=false")
    if m.standardize or m.loss_weighting != "velocity":
        raise ValueError(
            f"model.backbone={mc.backbone} converts the pretrained model exactly only without method.standardize "
            "and with method.loss_weighting=velocity"
        )
    if mc.overrides:
        raise ValueError(f"model.overrides set DiT fields; model.backbone={mc.backbone} takes its shape from the model")
    if cfg.train.init_from:
        raise ValueError(f"model.backbone={mc.backbone} starts from model.pretrained: leave train.init_from unset")
    if cfg.optim.ema and cfg.train.distributed == "fsdp":
        raise ValueError(f"model.backbone={mc.backbone} with FSDP keeps no EMA: set optim.ema=false")


def _resolve_options(cfg: RunConfig) -> None:
    """Check ``method.options`` against the method's ``Options`` and fill in its defaults (in place)."""
    m = cfg.method
    options_cls = get_method(m.name).Options
    hints = typing.get_type_hints(options_cls)
    unknown = sorted(set(m.options) - set(hints))
    if unknown:
        known = ", ".join(sorted(hints)) or "none"
        raise ValueError(f"method.options {unknown} are not settings of method {m.name}; its options: {known}")
    for name, value in m.options.items():
        if not fits(value, hints[name]):
            raise ValueError(f"method.options.{name}={value!r} must be of type {hints[name]}")
    options = options_cls(**{k: coerce_json(v, hints[k]) for k, v in m.options.items()})
    m.options = dataclasses.asdict(options)


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A copy of ``cfg`` with ``section.key=value`` overrides applied (tuples as ``a,b``), resolved."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.steps=1000")
        key, text = item.split("=", 1)
        key, text = key.strip(), text.strip()
        parts = key.split(".")
        if parts[:2] == ["model", "overrides"] and len(parts) == 3:
            fields = typing.get_type_hints(DiTConfig)
            if parts[2] not in fields:
                raise ValueError(f"unknown model setting {key}; DiTConfig fields: {', '.join(sorted(fields))}")
            value = parse_value(text, fields[parts[2]], key)
            cfg.model.overrides[parts[2]] = list(value) if isinstance(value, tuple) else value  # as JSON reads it
            continue
        if parts[:2] == ["method", "options"] and len(parts) == 3:
            fields = typing.get_type_hints(get_method(cfg.method.name).Options)
            if parts[2] not in fields:
                known = ", ".join(sorted(fields)) or "none"
                raise ValueError(f"unknown setting {key} of method {cfg.method.name}; its options: {known}")
            cfg.method.options[parts[2]] = parse_value(text, fields[parts[2]], key)
            continue
        if len(parts) != 2:
            raise ValueError(f"override key {key!r} must be section.key (sections: {', '.join(SECTIONS)})")
        section, name = parts
        sub = getattr(cfg, section, None) if section in SECTIONS else None
        if sub is None:
            raise ValueError(f"unknown config section {section!r} (sections: {', '.join(SECTIONS)})")
        hints = typing.get_type_hints(type(sub))
        if name not in hints:
            raise ValueError(f"unknown setting {key}{_where_it_is(section, name)}; known: {', '.join(sorted(hints))}")
        setattr(sub, name, parse_value(text, hints[name], key))
    return resolve(cfg)


def _where_it_is(section: str, name: str) -> str:
    """A hint for a setting asked for in the wrong section: another section's key, or a method's option."""
    for other in SECTIONS:
        if other != section and name in typing.get_type_hints(type(getattr(RunConfig(), other))):
            return f" (it is {other}.{name})"
    if section == "method":
        for method in method_names():
            if name in typing.get_type_hints(get_method(method).Options):
                return f" (a setting of method {method}: method.options.{name})"
    return ""
