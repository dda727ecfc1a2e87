"""Run configuration: typed dataclasses, named presets and ``section.key=value`` overrides.

Every setting of the method lives in :class:`MethodConfig`, with the paper's default beside it. A run's resolved
configuration is saved as ``config.json`` in its directory and is what ``dfm sample`` and ``--resume`` read back.

Example:
    >>> from dfm.config import get_preset, apply_overrides
    >>> cfg = apply_overrides(get_preset("quickstart"), ["train.steps=100", "method.stage_probs=0.7,0.3"])
    >>> cfg.train.steps, cfg.method.stage_probs
    (100, (0.7, 0.3))
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfm.methods import get_method, method_names
from dfm.models.config import DiTConfig

LOSS_WEIGHTINGS = ("velocity", "edm")


@dataclass
class MethodConfig:
    """The settings of DFM (method.md sections 3, 4 and 6); ``method="fm"`` is plain Flow Matching (one stage)."""

    method: str = "dfm"
    decomposition: str = "laplacian"  #: laplacian | haar | dct (paper Table 6: all equally good)
    stages: int = 2
    factors: tuple[int, ...] | None = None  #: spatial factor per stage jump; None = 2 everywhere
    temporal_factors: tuple[int, ...] | None = None  #: videos: frame factor per jump; None = spatial pyramid only
    resample: str = "bilinear"  #: pyramid filter; the paper names none, bilinear/align_corners=False is common
    stage_probs: tuple[float, ...] | None = None  #: p(Q); None = (0.9, 0.1) for 2 stages (paper)
    main_loc: float = 0.0  #: t_Q ~ LogitNormal(main_loc, main_scale) (paper: 0, 1)
    main_scale: float = 1.0
    prev_loc: float = 1.5  #: t_s<Q ~ LogitNormal(prev_loc, prev_scale) (paper: 1.5, 1)
    prev_scale: float = 1.0
    tied: bool = False  #: ablation: one t shared by all active stages (paper: far worse)
    standardize: bool = False  #: per-stage unit std before noising (paper: off for images, on for video)
    level_std: tuple[float, ...] | None = None  #: stds used by ``standardize``; None = estimated from data
    label_dropout: float = 0.1  #: classifier-free guidance training (paper: 10%)
    #: per-stage EDM input/output scaling of the network (paper Sec. 3.3, for DFM and its baselines alike); each
    #: stage's network input and target get unit variance from that stage's data std (dfm.models.precondition)
    precondition: bool = True
    #: std of the level each stage's network sees (after ``standardize``); None = measured from the training data
    #: at the start of a run (2,048 images), then saved in config.json
    data_std: tuple[float, ...] | None = None
    #: ``velocity``: Σ_s MSE of the velocity (the paper's loss); ``edm``: each stage's error in the network's own
    #: unit-variance target space, i.e. the velocity MSE divided by c_out(t_s)² (weights low-std levels up)
    loss_weighting: str = "velocity"
    # sampling
    steps: tuple[int, ...] = (30, 10)  #: Euler steps per stage (paper: 30 + 10)
    thresholds: tuple[float, ...] = (0.7,)  #: τ per stage jump (paper: 0.7 at 512 px, 0.9 robust default)
    solver: str = "euler"
    guidance: float = 1.0
    #: FLUX's resolution-dependent time shift of the sampling grid (dfm.adapters.flux_time_shift, one token count,
    #: the finest latent's, for all stages): more steps at high noise for larger images
    time_shift: bool = False
    #: the method's own settings (``-o method.options.KEY=VALUE``), typed by its registry entry's ``Options``
    #: (dfm.methods): e.g. the cascade's ``cond_noise``, Pyramidal Flow's ``windows``; filled with the defaults
    options: dict[str, Any] = field(default_factory=dict)


BACKBONES = ("dit", "flux", "sd3")


@dataclass
class ModelConfig:
    name: str = "DFM-DiT-Tiny"  #: a name of dfm.models' registry
    overrides: dict[str, Any] = field(default_factory=dict)  #: DiTConfig fields to change (hidden_size, depth...)
    #: ``dit``: our DiT (``name``, ``overrides``); ``flux`` / ``sd3``: the transformer of the diffusers directory
    #: ``pretrained`` converted to the method's stages (dfm.adapters), text-conditioned
    backbone: str = "dit"
    pretrained: str | None = None  #: flux / sd3: a diffusers model directory (model_index.json + transformer/)
    lora_rank: int = 0  #: flux / sd3: LoRA rank (0 = full fine-tuning); the new stage modules always train fully
    lora_alpha: float | None = None  #: LoRA alpha (None = the rank)
    gradient_checkpointing: bool = False  #: flux / sd3: recompute the blocks' activations in backward
    guidance: float = 1.0  #: FLUX-dev's guidance-distilled input, fixed during fine-tuning and sampling (paper: 1.0)


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  #: built-in name, an image folder, or a prepared latent directory
    resolution: int | None = 32  #: None = the dataset's native size
    data_dir: str | None = None  #: where built-in datasets live (default: standard locations)
    random_flip: bool = False
    num_workers: int = 0
    frames: int | None = None  #: videos: frames per clip (None = the dataset's default)
    num_clips: int | None = None  #: generated video sets: number of clips (None = the dataset's default)
    skip_bad: bool = False  #: image folders: check every file at start and leave out unreadable ones (warning)
    classes: tuple[int, ...] | None = None  #: train on these classes only (labels keep their values); None = all


@dataclass
class OptimConfig:
    lr: float = 1e-4  #: paper: 1e-4
    betas: tuple[float, float] = (0.9, 0.99)  #: paper: Adam(0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 10000  #: linear warm-up (paper: 10k)
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True  #: decay_k = min(ema_decay, (1 + k) / (10 + k)), so short runs get a useful EMA
    #: keep an EMA of the weights (sampled by default); flux / sd3: of the trainable parameters only (off in their
    #: fine-tuning recipe: it doubles the memory of a full fine-tune)
    ema: bool = True


@dataclass
class TrainConfig:
    steps: int = 600_000
    batch_size: int = 256  #: global batch (all ranks and accumulation micro-steps together)
    grad_accum: int = 1
    #: fp32 | bf16 (autocast). bf16 is for GPUs: on a CPU without bf16 units it can be far slower (a 7M DiT step
    #: took 10 s in bf16 against 0.42 s in fp32 on a 2-vCPU AMD EPYC, `dfm bench speed --precision bf16`).
    precision: str = "fp32"
    seed: int = 0
    distributed: str = "ddp"  #: ddp | fsdp (FSDP2 fully_shard), used when launched with torchrun
    compile: bool = False
    log_every: int = 50  #: >= 1; the last step is always logged
    sample_every: int = 0  #: 0 = only at the end
    ckpt_every: int = 5000  #: 0 = only at the end (the last step is always saved)
    keep_last: int = 3
    num_sample_images: int = 40  #: images in the periodic sample grids
    tensorboard: bool = False
    threads: int = 0  #: CPU threads (0 = torch default)
    #: start from these weights (a run or a ``pretrained/`` directory) instead of a fresh model; a one-stage model
    #: is converted to the method's stages, exactly the pretrained model at initialisation (dfm.finetune)
    init_from: str | None = None


@dataclass
class RunConfig:
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        kwargs: dict[str, Any] = {}
        hints = typing.get_type_hints(cls)
        data = _upgrade_legacy(data)
        for name, value in data.items():
            if name not in hints:
                raise ValueError(f"unknown config section {name!r}")
            sub = hints[name]
            if dataclasses.is_dataclass(sub):
                known = {f.name for f in dataclasses.fields(sub)}
                unknown = set(value) - known
                if unknown:
                    raise ValueError(f"unknown keys {sorted(unknown)} in config section {name!r}")
                sub_hints = typing.get_type_hints(sub)
                kwargs[name] = sub(**{k: _coerce_json(v, sub_hints[k]) for k, v in value.items()})
            else:
                kwargs[name] = value
        cfg = cls(**kwargs)
        validate(cfg)
        return cfg

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


#: settings of the baselines that MethodConfig carried before they became the methods' own ``method.options``
_LEGACY_OPTIONS = {
    "cascade": {"cascade_stage1_fraction": "stage1_fraction", "cascade_switch_step": "switch_step",
                "cond_loc": "cond_loc", "cond_scale": "cond_scale", "cond_noise": "cond_noise"},
    "pyramidal": {"pyramid_windows": "windows", "pyramid_gamma": "gamma", "pyramid_time": "time"},
}  # fmt: skip


def _upgrade_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """Read config.json files written by earlier versions.

    - Before preconditioning was a method setting, runs trained without it, unless they asked the model for it
      (``model.overrides.precondition``, which then used data_std or 1.0 per stage).
    - Before ``method.options``, the baselines' settings were fields of MethodConfig (``cond_noise``,
      ``pyramid_windows``, ...): they move into the options of the method that reads them; the other method's
      ones had no effect and are dropped.
    """
    method = data.get("method")
    if not isinstance(method, dict):
        return data
    method = dict(method)
    data = {**data, "method": method}
    if any(old in method for names in _LEGACY_OPTIONS.values() for old in names):
        options = dict(method.get("options", {}))
        for name, names in _LEGACY_OPTIONS.items():
            for old, new in names.items():
                if old in method:
                    value = method.pop(old)
                    if method.get("method") == name:
                        options[new] = value
        method["options"] = options
    if "precondition" in method:
        return data
    method["precondition"] = False
    overrides = dict(data.get("model", {}).get("overrides", {}))
    if "precondition" in overrides:
        on = overrides.pop("precondition")
        std = overrides.pop("data_std", None)
        if on is True:
            stages = 2 if method.get("method") == "cascade" else int(method.get("stages", 2))
            method.update(precondition=True, data_std=std or [1.0] * stages)
        data["model"] = {**data["model"], "overrides": overrides}
    return data


def _coerce_json(value: Any, hint: Any) -> Any:
    """JSON turns tuples into lists; turn them back so that configs compare equal after a round trip."""
    if isinstance(value, list) and "tuple" in str(hint):
        return tuple(value)
    return value


def _parse_value(text: str, hint: Any, key: str) -> Any:
    """Parse a command-line string into the type of a dataclass field."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", ""):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _parse_value(text, inner[0], key)
    try:
        if hint is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        if hint is str:
            return text
        if origin is tuple:  # "a,b", also written as JSON "[a, b]"
            elem = args[0]
            inner = text.strip()
            if inner[:1] in "[(" and inner[-1:] in ")]":
                inner = inner[1:-1]
            return tuple(_parse_value(p.strip(), elem, key) for p in inner.split(",") if p.strip())
        if origin is dict:
            return json.loads(text)
    except ValueError:
        pass
    hint_text = " (use true or false)" if hint is bool else ""
    raise ValueError(f"cannot parse {key}={text!r} as {getattr(hint, '__name__', hint)}{hint_text}")


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Return a copy of ``cfg`` with ``section.key=value`` overrides applied (tuples as ``a,b``)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.steps=1000")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] == "model" and len(parts) == 3 and parts[1] == "overrides":
            fields = _model_fields()
            if parts[2] not in fields:
                raise ValueError(f"unknown model setting {key}; DiTConfig fields: {', '.join(sorted(fields))}")
            value = _parse_value(text.strip(), fields[parts[2]], key)
            cfg.model.overrides[parts[2]] = list(value) if isinstance(value, tuple) else value  # as JSON reads it
            continue
        if parts[0] == "method" and len(parts) == 3 and parts[1] == "options":
            fields = typing.get_type_hints(get_method(cfg.method.method).Options)
            if parts[2] not in fields:
                known = ", ".join(sorted(fields)) or "none"
                raise ValueError(f"unknown setting {key} of method {cfg.method.method}; its options: {known}")
            cfg.method.options[parts[2]] = _parse_value(text.strip(), fields[parts[2]], key)
            continue
        if len(parts) != 2:
            raise ValueError(f"override key {key!r} must be section.key (sections: method, model, data, optim, train)")
        section, name = parts
        sub = getattr(cfg, section, None)
        if not dataclasses.is_dataclass(sub):
            raise ValueError(f"unknown config section {section!r} (sections: method, model, data, optim, train)")
        hints = typing.get_type_hints(type(sub))
        if name not in hints:
            owner = _option_owner(name) if section == "method" else None
            hint = f" (a setting of method {owner}: method.options.{name})" if owner else ""
            raise ValueError(f"unknown setting {section}.{name}{hint}; known: {', '.join(sorted(hints))}")
        setattr(sub, name, _parse_value(text.strip(), hints[name], key))
    validate(cfg)
    return cfg


def _option_owner(name: str) -> str | None:
    """The method whose ``method.options`` has a setting called ``name``, if any."""
    for method in method_names():
        if name in typing.get_type_hints(get_method(method).Options):
            return method
    return None


def _model_fields() -> dict[str, Any]:
    """Field name -> type of :class:`dfm.models.config.DiTConfig`, what ``model.overrides`` may set."""
    return typing.get_type_hints(DiTConfig)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON-like ``value`` has the type ``hint`` (lists stand for tuples; bools are not numbers)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value)
    return True


def validate_sampling(m: MethodConfig) -> None:
    """The sampler's settings, checked before training so that a long run does not fail at its first samples."""
    if len(m.steps) != m.stages:
        raise ValueError(f"method.steps={m.steps} needs one step count per stage ({m.stages})")
    if len(m.thresholds) != m.stages - 1:
        raise ValueError(f"method.thresholds={m.thresholds} needs {m.stages - 1} values (one per stage jump)")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in m.steps):
        raise ValueError(f"method.steps={m.steps}: every stage needs at least 1 sampling step, e.g. 30,10")
    if any(not 0 < v < 1 for v in m.thresholds) or any(b <= a for a, b in zip(m.thresholds, m.thresholds[1:])):
        raise ValueError(
            f"method.thresholds={m.thresholds} must lie strictly inside (0, 1) and increase, e.g. 0.7 (two stages)"
        )
    if m.solver not in ("euler", "heun"):
        raise ValueError(f"method.solver={m.solver!r}: choose euler or heun")
    if not math.isfinite(m.guidance) or m.guidance < 0:
        raise ValueError(f"method.guidance={m.guidance} must be a finite scale >= 0 (1 = no guidance)")


def validate(cfg: RunConfig) -> None:
    """Catch settings a user can get wrong, with a message that says what to change."""
    m, tc, o = cfg.method, cfg.train, cfg.optim
    spec = get_method(m.method)
    if m.stages < 1:
        raise ValueError(f"method.stages={m.stages} must be >= 1")
    spec.validate(cfg)
    if tc.distributed == "fsdp" and not spec.supports_fsdp:
        raise ValueError(f"method {m.method} does not support FSDP: use train.distributed=ddp")
    _resolve_options(m)
    validate_sampling(m)
    if m.stage_probs is not None and len(m.stage_probs) != m.stages:
        raise ValueError(f"method.stage_probs={m.stage_probs} needs one probability per stage ({m.stages})")
    if m.loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"method.loss_weighting={m.loss_weighting!r}: choose one of {LOSS_WEIGHTINGS}")
    n_std = spec.num_data_std(m)
    if m.data_std is not None and (len(m.data_std) != n_std or min(m.data_std) <= 0):
        raise ValueError(f"method.data_std={m.data_std} needs {n_std} positive values (one per stage), or none")
    for key in ("precondition", "data_std"):
        if key in cfg.model.overrides:
            raise ValueError(f"model.overrides.{key} is set from the method: use method.{key} instead")
    if not 0 <= m.label_dropout < 1:
        raise ValueError(f"method.label_dropout={m.label_dropout} must be in [0, 1)")
    if tc.steps < 1 or tc.batch_size < 1 or tc.grad_accum < 1:
        raise ValueError("train.steps, train.batch_size and train.grad_accum must be >= 1")
    if tc.batch_size % tc.grad_accum:
        raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by train.grad_accum={tc.grad_accum}")
    if tc.precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision={tc.precision!r}: choose fp32 or bf16")
    if tc.distributed not in ("ddp", "fsdp"):
        raise ValueError(f"train.distributed={tc.distributed!r}: choose ddp or fsdp")
    if tc.keep_last < 1:
        raise ValueError(f"train.keep_last={tc.keep_last} must be >= 1")
    if tc.log_every < 1:
        raise ValueError(f"train.log_every={tc.log_every} must be >= 1 (1 = every step)")
    if tc.ckpt_every < 0 or tc.sample_every < 0:
        raise ValueError("train.ckpt_every and train.sample_every must be >= 0 (0 = only at the end)")
    if tc.num_sample_images < 1 or tc.threads < 0:
        raise ValueError("train.num_sample_images must be >= 1 and train.threads >= 0 (0 = torch default)")
    fields = _model_fields() if cfg.model.overrides else {}
    for name, value in cfg.model.overrides.items():
        if name not in fields:
            raise ValueError(
                f"unknown model setting model.overrides.{name}; DiTConfig fields: {', '.join(sorted(fields))}"
            )
        if not _fits(value, fields[name]):
            kind = fields[name].__name__ if isinstance(fields[name], type) else str(fields[name])
            raise ValueError(
                f"model.overrides.{name}={value!r} must be of type {kind}: give it as e.g. true, 2, 0.5 or 2,1"
            )
    _validate_backbone(cfg)
    if not (math.isfinite(o.lr) and o.lr > 0) or o.warmup_steps < 0 or not o.grad_clip >= 0 or not 0 <= o.ema_decay < 1:
        raise ValueError("optim: lr must be > 0, warmup_steps >= 0, grad_clip >= 0 and ema_decay in [0, 1)")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ValueError(f"optim.betas={o.betas}: give two values in [0, 1), e.g. 0.9,0.99")
    if not (math.isfinite(o.eps) and o.eps > 0) or not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        raise ValueError(f"optim: eps must be > 0 (got {o.eps}) and weight_decay >= 0 (got {o.weight_decay})")


def _validate_backbone(cfg: RunConfig) -> None:
    """The diffusers backbones (flux, sd3): what they support, each error saying what to set."""
    mc, m = cfg.model, cfg.method
    if mc.backbone not in BACKBONES:
        raise ValueError(f"model.backbone={mc.backbone!r}: choose one of {', '.join(BACKBONES)}")
    if mc.lora_rank < 0:
        raise ValueError(f"model.lora_rank={mc.lora_rank} must be >= 0 (0 = no LoRA)")
    if mc.backbone == "dit":
        if mc.lora_rank or mc.gradient_checkpointing or mc.pretrained:
            raise ValueError(
                "model.lora_rank, model.gradient_checkpointing and model.pretrained apply to model.backbone=flux|sd3; "
                "our DiT starts from train.init_from"
            )
        return
    if not mc.pretrained:
        raise ValueError(f"model.backbone={mc.backbone} needs model.pretrained=<diffusers model directory>")
    if m.method not in ("dfm", "fm"):
        raise ValueError(f"model.backbone={mc.backbone} trains with method dfm or fm, not {m.method}")
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


def _resolve_options(m: MethodConfig) -> None:
    """Check ``m.options`` against the method's ``Options`` and fill in its defaults (in place)."""
    options_cls = get_method(m.method).Options
    hints = typing.get_type_hints(options_cls)
    unknown = sorted(set(m.options) - set(hints))
    if unknown:
        known = ", ".join(sorted(hints)) or "none"
        raise ValueError(f"method.options {unknown} are not settings of method {m.method}; its options: {known}")
    for name, value in m.options.items():
        if not _fits(value, hints[name]):
            raise ValueError(f"method.options.{name}={value!r} must be of type {hints[name]}")
    options = options_cls(**{k: _coerce_json(v, hints[k]) for k, v in m.options.items()})
    m.options = dataclasses.asdict(options)


def with_method(cfg: RunConfig, method: str) -> RunConfig:
    """The same run with another method: same backbone, data, optimiser and number of network evaluations.

    ``fm`` becomes one stage with all sampling steps; ``cascade`` and ``pyramidal`` split the steps equally
    between two stages (the paper's 20 + 20 for the cascade, equal steps per stage for Pyramidal Flow).
    """
    spec = get_method(method)
    if method == cfg.method.method:
        return copy.deepcopy(cfg)
    if cfg.method.method != "dfm":
        raise ValueError(f"switch to {method} from a DFM config (this one is {cfg.method.method})")
    cfg = copy.deepcopy(cfg)
    cfg.method = spec.from_dfm(cfg.method)
    validate(cfg)
    return cfg


def _fm(cfg: RunConfig) -> RunConfig:
    """The Flow Matching twin of a DFM preset: same everything, one stage, same total sampling steps."""
    return with_method(cfg, "fm")


def _fmnist_method() -> MethodConfig:
    """The method settings of the Fashion-MNIST presets (measured best at CPU budgets, docs/RESULTS.md)."""
    return MethodConfig(stage_probs=(0.5, 0.5), steps=(15, 5), thresholds=(0.7,), solver="heun", loss_weighting="edm")


def _quickstart() -> RunConfig:
    # 2 CPU cores, about 8 minutes: a 1.4M-parameter DiT on 32x32 Fashion-MNIST, 64 tokens, fp32 (bf16 autocast
    # is slower than fp32 for a model this small on CPU: 2.4 vs 3.9 steps/s measured here). Short runs need a
    # larger learning rate and a short warm-up. Measured at this budget (docs/RESULTS.md): p(Q=1) = 0.5 beats the
    # paper's 0.9 (the fine level needs more of the training signal), and the paper's 30 + 10 sampling steps beat
    # 20 + 20. Preconditioning stays on (the paper's architecture; within seed noise at 800 steps), and the EDM loss
    # weighting (each stage's error in its network's unit-variance target space) beats the plain velocity MSE by
    # 8-9% on both Fréchet distances on held-aside data: the quiet fine level gets its share of the signal.
    # Sampling: Heun's method with 15 + 5 steps (39 network evaluations, as many as 30 + 10 Euler steps less one)
    # beat Euler 30 + 10 by 2-40% on both Fréchet distances at 32 and 64 px, 800 to 12,800 steps, two and three
    # stages (chosen on held-aside images, docs/RESULTS.md); the Flow Matching twin gets Heun with 20 steps.
    return RunConfig(
        method=_fmnist_method(),
        model=ModelConfig("DFM-DiT-Tiny"),
        data=DataConfig("fashion-mnist", resolution=32),
        optim=OptimConfig(lr=1e-3, warmup_steps=200, ema_decay=0.999),
        train=TrainConfig(
            steps=1800, batch_size=64, precision="fp32", log_every=25, sample_every=600, ckpt_every=600, keep_last=2
        ),
        preset="quickstart",
    )


def _fashion_mnist() -> RunConfig:
    # The method.md section 9 setting (1.3M DiT, 64 tokens, 3,000 steps of batch 64, 40 Euler steps) with the
    # settings measured best at CPU budgets (p(Q=1) = 0.5 instead of the paper's 0.9, EDM loss weighting, Heun
    # 15 + 5 instead of 30 + 10 Euler steps; docs/RESULTS.md).
    return RunConfig(
        method=_fmnist_method(),
        model=ModelConfig("DFM-DiT-Tiny"),
        data=DataConfig("fashion-mnist", resolution=32),
        optim=OptimConfig(lr=1e-3, warmup_steps=200, ema_decay=0.999),
        train=TrainConfig(
            steps=3000, batch_size=64, precision="fp32", log_every=50, sample_every=1000, ckpt_every=1000
        ),
        preset="fmnist-dfm",
    )


def _imagenet512(model: str, steps: int) -> RunConfig:
    # Paper: FLUX-VAE latents of ImageNet-512 (64x64x16 for FLUX; 4 channels for SD-VAE), batch 256, lr 1e-4 with
    # 10k warm-up, EMA 0.9999, 30 + 10 Euler steps at τ = 0.7. Point data.dataset at a `dfm prepare` directory.
    return RunConfig(
        method=MethodConfig(steps=(30, 10), thresholds=(0.7,)),
        model=ModelConfig(model, {"num_classes": 1000}),
        data=DataConfig("data/imagenet512-latents", resolution=None, random_flip=False, num_workers=8),
        optim=OptimConfig(),
        train=TrainConfig(steps=steps, batch_size=256, precision="bf16", ckpt_every=10000, sample_every=10000),
        preset="",
    )


def _video_quickstart() -> RunConfig:
    # Moving Fashion-MNIST clips (8 frames of 32x32, one item bouncing), a spatial pyramid per frame as in the
    # paper, per-stage standardisation on (the paper's video setting). Patch 8 keeps it at 16 tokens per frame,
    # 128 per clip, so that it trains on 2 CPU cores.
    return RunConfig(
        method=MethodConfig(stage_probs=(0.7, 0.3), steps=(20, 20), thresholds=(0.7,), standardize=True),
        model=ModelConfig("DFM-DiT-Tiny", {"patch_size": 8}),
        data=DataConfig("moving-fashion-mnist", resolution=32, frames=8, num_clips=20000),
        optim=OptimConfig(lr=1e-3, warmup_steps=200, ema_decay=0.999),
        train=TrainConfig(
            steps=2000,
            batch_size=32,
            precision="fp32",
            log_every=25,
            sample_every=500,
            ckpt_every=500,
            keep_last=2,
            num_sample_images=16,
        ),
        preset="video-quickstart",
    )


def _video_gpu() -> RunConfig:
    # A GPU-sized video run: 16 frames of 64x64, DiT-S with patch 4 (256 tokens per frame, 4096 per clip).
    return RunConfig(
        method=MethodConfig(steps=(30, 10), thresholds=(0.7,), standardize=True),
        model=ModelConfig("DFM-DiT-S/4", {"num_classes": 10}),
        data=DataConfig("moving-fashion-mnist", resolution=64, frames=16, num_clips=100000, num_workers=8),
        optim=OptimConfig(lr=2e-4, warmup_steps=1000, ema_decay=0.9999),
        train=TrainConfig(
            steps=100_000, batch_size=64, precision="bf16", sample_every=5000, ckpt_every=5000, num_sample_images=16
        ),
        preset="video-s",
    )


def _named(cfg: RunConfig, name: str) -> RunConfig:
    cfg.preset = name
    return cfg


PRESETS: dict[str, typing.Callable[[], RunConfig]] = {
    "quickstart": _quickstart,
    "quickstart-fm": lambda: _named(_fm(_quickstart()), "quickstart-fm"),
    "fmnist-dfm": _fashion_mnist,
    "fmnist-fm": lambda: _named(_fm(_fashion_mnist()), "fmnist-fm"),
    "video-quickstart": _video_quickstart,
    "video-quickstart-fm": lambda: _named(_fm(_video_quickstart()), "video-quickstart-fm"),
    "video-s": _video_gpu,
    "imagenet512-xl": lambda: _named(_imagenet512("DFM-DiT-XL/2", 500_000), "imagenet512-xl"),
    "imagenet512-b": lambda: _named(_imagenet512("DFM-DiT-B/2", 600_000), "imagenet512-b"),
}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    validate(cfg)
    return cfg
