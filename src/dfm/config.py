"""Run configuration: typed dataclasses that round-trip to JSON, and nothing else.

A run's settings live in one :class:`RunConfig` of six sections: the method (how it trains, method.md sections 3
and 4, with the paper's defaults beside each field), the sampler (method.md section 6), the model, the data, the
optimiser and the training loop. It is saved as ``config.json`` in the run directory. This module is the bottom of
the house: it imports nothing of ``dfm``. Checks that need a registry (method names and options, model fields) are
made where a config is resolved for use, :func:`dfm.resolve.resolve`; the checks here need the config alone.

Example:
    >>> cfg = RunConfig(sampler=SamplerConfig(steps=(15, 5), solver="heun"))
    >>> RunConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> cfg.sampler.network_evaluations()
    39
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOSS_WEIGHTINGS = ("velocity", "edm")
PREDICTIONS = ("velocity", "data")
SOLVERS = ("euler", "heun")
BACKBONES = ("dit", "flux", "sd3")
#: the config.json layout this version writes; :func:`_from_format1` and :func:`_from_format2` read the older ones
FORMAT = 3
_FORMAT1_SAMPLER_KEYS = ("steps", "thresholds", "solver", "guidance", "time_shift")  #: in format 1's method section


@dataclass
class MethodConfig:
    """How a run trains: the method, its decomposition and its objective (method.md sections 3 and 4)."""

    name: str = "dfm"  #: a method of dfm.methods: dfm | fm (one stage) | cascade | pyramidal
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
    #: what the network inside the preconditioning predicts: ``velocity`` (EDM-style skip and scaling of the
    #: velocity, dfm.models.precondition) or ``data``: the clean level, turned into a velocity as (x̂ - x_t) / (1 - t)
    #: (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise"), which keeps a network whose tokens
    #: are wider than its hidden size (e.g. 8x8 RGB patches, 192 values, in a 128-wide DiT) from leaving the noise
    #: it cannot represent in the samples. Needs ``precondition``.
    prediction: str = "velocity"
    #: the method's own settings (``-o method.options.KEY=VALUE``), typed by its registry entry's ``Options``
    #: (dfm.methods): e.g. the cascade's ``cond_noise``, Pyramidal Flow's ``windows``; filled with the defaults
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplerConfig:
    """How a run samples (method.md section 6): the one place where sampling settings are checked.

    Stage i takes ``steps[i]`` steps; it moves from 0 to its threshold τ_i while every earlier stage moves from
    τ_{i-1} to τ_i (:class:`dfm.schedule.StageSchedule`). Training never reads these settings, so a resumed run, the
    command line, the web page and the benchmark may each change them.
    """

    steps: tuple[int, ...] = (30, 10)  #: sampling steps per stage, coarse to fine (paper: 30 + 10 Euler steps)
    #: τ per stage jump (paper: 0.7 at 512 px, 0.9 robust default); Pyramidal Flow and the cascade do not use them
    thresholds: tuple[float, ...] = (0.7,)
    solver: str = "euler"  #: euler | heun (Heun's last step, which ends on the data, is an Euler step)
    guidance: tuple[float, ...] = (1.0,)  #: classifier-free guidance: one scale, or one per stage (1 = none)
    #: FLUX's resolution-dependent time shift of the grid (dfm.adapters.flux_time_shift): more steps at high noise
    time_shift: bool = False
    #: SD3's constant shift of the grid, t -> t / (t + shift (1 - t)) (t = 1 is the data), on every stage's times and
    #: on the thresholds: 1 = none; above 1 more steps at high noise (SD3: 3); below 1 more steps near the data,
    #: where the last step's prediction sets the finest detail. Applied after ``time_shift`` when both are set.
    shift: float = 1.0
    #: the first stage (0-based, coarse to fine; negative counts from the finest, -1 = the finest only) whose times
    #: ``shift`` warps: 0 = every stage. The stages before it keep the uniform grid (their layout's steps at high noise)
    shift_from: int = 0

    def validate(self, stages: int, thresholds: bool = True) -> SamplerConfig:
        """Check the settings for a model of ``stages`` stages; a ``ValueError`` says what to change. Returns self.

        ``thresholds=False``: the method's sampler does not use them (Pyramidal Flow, the cascade), so they are
        not checked."""
        if stages < 1 or not self.steps:
            raise ValueError("sampler.steps: give the sampling steps of at least one stage, e.g. 30,10")
        if len(self.steps) != stages:
            raise ValueError(
                f"sampler.steps={_text(self.steps)}: the model has {stages} stage(s); give one step count per stage"
            )
        if any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in self.steps):
            raise ValueError(f"sampler.steps={_text(self.steps)}: every stage needs at least 1 step, e.g. 30,10")
        if thresholds:
            self._check_thresholds(stages)
        if self.solver not in SOLVERS:
            raise ValueError(f"sampler.solver={self.solver!r}: choose {' or '.join(SOLVERS)}")
        if len(self.guidance) not in (1, stages):
            raise ValueError(
                f"sampler.guidance={_text(self.guidance)}: give one scale, or one per stage (the model "
                f"has {stages} stage(s))"
            )
        if (
            isinstance(self.shift, bool)
            or not isinstance(self.shift, numbers.Real)
            or not (math.isfinite(self.shift) and self.shift > 0)
        ):
            raise ValueError(
                f"sampler.shift={self.shift!r}: give a number > 0 (1 = no shift, 0.3 = more steps near the data)"
            )
        if (
            isinstance(self.shift_from, bool)
            or not isinstance(self.shift_from, numbers.Integral)
            or not -stages <= self.shift_from < stages
        ):
            raise ValueError(
                f"sampler.shift_from={self.shift_from!r}: give a stage of the model's {stages}, 0..{stages - 1} "
                f"(0 = every stage) or counted from the finest, -1..-{stages} (-1 = the finest only)"
            )
        if any(not math.isfinite(g) or g < 0 for g in self.guidance):
            raise ValueError(f"sampler.guidance={_text(self.guidance)}: scales must be finite and >= 0 (1 = none)")
        return self

    def _check_thresholds(self, stages: int) -> None:
        examples = {1: "none (one stage)", 2: "0.7", 3: "0.7,0.85", 4: "0.6,0.75,0.85"}
        example = examples.get(stages) or ",".join(f"{0.5 + 0.4 * i / (stages - 2):.2f}" for i in range(stages - 1))
        if len(self.thresholds) != stages - 1:
            raise ValueError(
                f"sampler.thresholds={_text(self.thresholds)}: the model has {stages} stage(s); give "
                f"{stages - 1} threshold(s), one per stage jump, e.g. {example}"
            )
        if any(not 0 < v < 1 for v in self.thresholds) or any(
            b <= a for a, b in zip(self.thresholds, self.thresholds[1:])
        ):
            raise ValueError(
                f"sampler.thresholds={_text(self.thresholds)} must lie strictly inside (0, 1) and "
                f"increase, e.g. {example}"
            )

    def stage_shift(self, stage: int, stages: int) -> float:
        """The constant time shift of stage ``stage`` (0-based) of ``stages``: ``shift`` from ``shift_from`` on, else
        1 (none)."""
        return float(self.shift) if stage >= self.shift_from % stages else 1.0

    def stage_guidance(self, stages: int) -> list[float]:
        """The guidance scale of every stage."""
        return list(self.guidance) * stages if len(self.guidance) == 1 else list(self.guidance)

    def network_evaluations(self, grids: int = 1) -> int:
        """Network evaluations of one sample (guidance's doubled batch aside): one per Euler step, two per Heun step
        except a step that ends on the data (t = 1), an Euler step. DFM's stages share one grid, which ends on the
        data once; ``grids``: how many separate grids end there (the cascade's two models: 2)."""
        n = sum(self.steps)
        return 2 * n - min(grids, n) if self.solver == "heun" else n


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
    #: FLUX-dev's guidance-distilled input, fixed during fine-tuning and sampling (paper: 1.0); not the sampler's
    #: classifier-free guidance
    distilled_guidance: float = 1.0


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  #: built-in name, an image folder, or a prepared latent directory
    resolution: int | None = 32  #: None = the dataset's native size
    data_dir: str | None = None  #: where built-in datasets live (default: standard locations)
    random_flip: bool = False
    num_workers: int = 0
    frames: int | None = None  #: videos: frames per clip (None = the dataset's default)
    num_clips: int | None = None  #: generated video sets: number of clips (None = the dataset's default)
    skip_bad: bool = False  #: image folders: leave out files that cannot be decoded (with a warning)
    classes: tuple[int, ...] | None = None  #: train on these classes only (labels keep their values); None = all
    #: image folders: enlarge images smaller than ``resolution`` (bicubic) instead of refusing them
    upscale: bool = False
    #: image folders: pixels of background added on every side of each image before resizing, as the built-in
    #: Fashion-MNIST pads 28 to 32 (``pad=2``); recorded in data_spec.json so that saved samples crop it again
    pad: int = 0


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
    steps: int = 600_000  #: optimiser steps
    batch_size: int = 256  #: global batch (all ranks and accumulation micro-steps together)
    grad_accum: int = 1
    #: fp32 | bf16 (autocast). bf16 is for GPUs: on a CPU without bf16 units it can be far slower than fp32
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
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """The config of a ``config.json`` of this version or an older one; unknown keys are refused."""
        data = dict(data)
        fmt = data.pop("format", None)
        if fmt is None:  # by hand (today's layout), or by dfm up to 2026-12-05 (format 1: sampler in the method)
            old = data.get("method") if "sampler" not in data else None
            fmt = 1 if isinstance(old, dict) and any(k in old for k in (*_FORMAT1_SAMPLER_KEYS, "method")) else FORMAT
        if not isinstance(fmt, int) or not 1 <= fmt <= FORMAT:
            raise ValueError(f"config format {fmt!r} is not one this version reads (1 to {FORMAT}): update dfm")
        if fmt == 1:
            data = _from_format1(data)
        if fmt <= 2:
            data = _from_format2(data)
        kwargs: dict[str, Any] = {}
        hints = typing.get_type_hints(cls)
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
                kwargs[name] = sub(**{k: coerce_json(v, sub_hints[k]) for k, v in value.items()})
            else:
                kwargs[name] = value
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} is not valid JSON ({err.msg}, line {err.lineno}): restore it or retrain"
            ) from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} does not hold a run config (a JSON object)")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None

    def validate(self) -> None:
        """The checks that need this config alone; a ``ValueError`` names the setting and what to change."""
        m, tc, o = self.method, self.train, self.optim
        if m.stages < 1:
            raise ValueError(f"method.stages={m.stages} must be >= 1")
        if m.stage_probs is not None and len(m.stage_probs) != m.stages:
            raise ValueError(f"method.stage_probs={_text(m.stage_probs)} needs one probability per stage ({m.stages})")
        if m.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"method.loss_weighting={m.loss_weighting!r}: choose one of {', '.join(LOSS_WEIGHTINGS)}")
        if m.prediction not in PREDICTIONS:
            raise ValueError(f"method.prediction={m.prediction!r}: choose one of {', '.join(PREDICTIONS)}")
        if m.prediction == "data" and not m.precondition:
            raise ValueError(
                "method.prediction=data is part of the preconditioning: set method.precondition=true, or "
                "method.prediction=velocity to train without it"
            )
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
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ValueError(f"optim.betas={_text(o.betas)}: give two values in [0, 1), e.g. 0.9,0.99")
        check_lr(o.lr, o.betas[0], "optim.lr")
        if o.warmup_steps < 0 or not o.grad_clip >= 0:
            raise ValueError("optim: warmup_steps must be >= 0 and grad_clip >= 0")
        if not 0 <= o.ema_decay < 1:
            raise ValueError(f"optim.ema_decay={o.ema_decay} must be in [0, 1)")
        if not (math.isfinite(o.eps) and o.eps > 0) or not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
            raise ValueError(f"optim: eps must be > 0 (got {o.eps}) and weight_decay >= 0 (got {o.weight_decay})")
        d = self.data
        if isinstance(d.pad, bool) or not isinstance(d.pad, int) or d.pad < 0:
            raise ValueError(f"data.pad={d.pad!r} must be a whole number of pixels >= 0 (0 = no border)")
        if d.classes is not None and len(d.classes) == 0:
            raise ValueError("data.classes is empty: give the classes to train on (e.g. 5,6,7) or leave it unset")
        if self.model.backbone not in BACKBONES:
            raise ValueError(f"model.backbone={self.model.backbone!r}: choose one of {', '.join(BACKBONES)}")
        if self.model.lora_rank < 0:
            raise ValueError(f"model.lora_rank={self.model.lora_rank} must be >= 0 (0 = no LoRA)")
        # the thresholds are checked where the method is known (dfm.resolve, the samplers): not every method uses them
        self.sampler.validate(m.stages, thresholds=False)


#: settings a resumed run may change: bookkeeping, threads, the preset's name and the sampler (training never reads
#: it); ``section`` alone stands for every key of it
RESUMABLE = {
    "train.steps",
    "train.log_every",
    "train.sample_every",
    "train.ckpt_every",
    "train.keep_last",
    "train.tensorboard",
    "train.threads",
    "train.num_sample_images",
    "data.skip_bad",
    "preset",
    "sampler",
}


def config_diff(old: RunConfig, new: RunConfig, ignore: set[str] = frozenset()) -> list[str]:
    """How ``new`` differs from ``old``, as ``section.key: old -> new`` lines (keys or whole sections in ``ignore``
    are left out)."""
    a, b = dataclasses.asdict(old), dataclasses.asdict(new)
    out = []
    for section in a:
        if section in ignore:
            continue
        if isinstance(a[section], dict):
            for k in sorted(set(a[section]) | set(b[section])):
                key = f"{section}.{k}"
                va, vb = a[section].get(k), b[section].get(k)
                if key not in ignore and _as_json(va) != _as_json(vb):
                    out.append(f"{key}: {va} -> {vb}")
        elif a[section] != b[section]:
            out.append(f"{section}: {a[section]} -> {b[section]}")
    return out


#: the largest float32: Adam's first step moves a weight by up to lr / (1 - β1), which must stay below it
_FLOAT32_MAX = 3.4028234663852886e38


def check_lr(lr: float, beta1: float, name: str) -> None:
    """Refuse a learning rate that is not a finite positive number, or whose Adam step overflows float32."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{name}={lr} must be a finite number > 0, e.g. 1e-4")
    if lr / (1 - beta1) >= _FLOAT32_MAX:
        raise ValueError(
            f"{name}={lr:g} is too large: Adam's first step (lr / (1 - beta1) = {lr / (1 - beta1):.3g}) "
            "overflows float32; use a learning rate such as 1e-4"
        )


def _as_json(v: Any) -> Any:
    """``v`` as JSON reads it back (tuples become lists, at any depth), so that a saved config compares equal."""
    return json.loads(json.dumps(v))


def _text(values: Any) -> str:
    """A tuple as it is written on the command line: ``30,10``."""
    return ",".join(str(v) for v in values) if isinstance(values, (tuple, list)) else str(values)


def _from_format1(data: dict[str, Any]) -> dict[str, Any]:
    """A ``config.json`` of format 1 (up to 2026-12-05), in which the sampling settings were fields of the method
    section, the method's name was ``method.method`` and FLUX's distilled guidance ``model.guidance``."""
    method = dict(data.get("method", {}))
    sampler = {key: method.pop(key) for key in _FORMAT1_SAMPLER_KEYS if key in method}
    if "guidance" in sampler:
        sampler["guidance"] = [sampler["guidance"]]
    if "method" in method:
        method["name"] = method.pop("method")
    model = dict(data.get("model", {}))
    if "guidance" in model:
        model["distilled_guidance"] = model.pop("guidance")
    return {**data, "method": method, "sampler": sampler, "model": model}


def _from_format2(data: dict[str, Any]) -> dict[str, Any]:
    """A ``config.json`` of format 2 (up to 2026-12-06), in which the two-stage baselines (cascade, pyramidal) kept
    the ``method.stage_probs`` of the DFM config they were derived from, unused; since format 3 they refuse it."""
    method = dict(data.get("method", {}))
    if method.get("name") in ("cascade", "pyramidal"):
        method.pop("stage_probs", None)
    return {**data, "method": method}


def coerce_json(value: Any, hint: Any) -> Any:
    """JSON turns tuples into lists; turn them back so that configs compare equal after a round trip."""
    if isinstance(value, list) and "tuple" in str(hint):
        return tuple(value)
    return value


def parse_value(text: str, hint: Any, key: str) -> Any:
    """Parse a command-line string into the type ``hint`` of a dataclass field (tuples as ``a,b``)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", "") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return parse_value(text, inner[0], key)
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
            return tuple(parse_value(p.strip(), elem, key) for p in inner.split(",") if p.strip())
        if origin is dict:
            return json.loads(text)
    except ValueError:
        pass
    hint_text = " (use true or false)" if hint is bool else ""
    raise ValueError(f"cannot parse {key}={text!r} as {getattr(hint, '__name__', hint)}{hint_text}")


def fits(value: Any, hint: Any) -> bool:
    """Whether a JSON-like ``value`` has the type ``hint`` (lists stand for tuples; bools are not numbers)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(fits(v, args[0]) for v in value)
    return True
