"""The methods a run can train and sample with, one registry entry each.

A method says what the rest of the library would otherwise ask with ``if method == ...``: its decomposition, its
training objective and the callbacks it needs between steps, its network and how that network is wrapped into a
velocity model (the preconditioning), its sampler, how it saves and loads its weights, which settings it accepts,
and its own settings (``method.options``, a dataclass of the method). DFM and plain Flow Matching live here; the
cascade and Pyramidal Flow register themselves in :mod:`dfm.baselines`. A new method is one module with a
:class:`Method` subclass passed to :func:`register_method` (docs/architecture.md).

Example:
    >>> from dfm.methods import get_method, method_names
    >>> method_names()
    ('dfm', 'fm', 'cascade', 'pyramidal')
    >>> get_method("cascade").Options().cond_noise
    0.025
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor, nn

from dfm.config import MethodConfig, RunConfig
from dfm.decomposition import Decomposition, Standardized, build_decomposition, estimate_level_std
from dfm.models import DFMDiT, DiTConfig, create_config
from dfm.models.precondition import Preconditioned
from dfm.objective import DFMObjective
from dfm.sampling import Sampler, StageSampler


@dataclasses.dataclass
class NoOptions:
    """A method without settings of its own."""


class TrainingCallback(Protocol):
    """What a method may ask the trainer to call before every optimiser step (the cascade's stage switch)."""

    def on_step_begin(self, step: int, model: nn.Module, ema: nn.Module | None) -> None: ...


class Method:
    """One way to train and sample. Subclasses override what differs from DFM's behaviour."""

    name: str = ""
    description: str = ""
    Options: type = NoOptions  #: dataclass of the method's own settings (``-o method.options.KEY=VALUE``)
    #: option names decided at the start of a run and saved in config.json, which a resumed run keeps
    decided_at_start: tuple[str, ...] = ()
    #: DDP must look for parameters without gradient (a model that trains one part per step)
    unused_parameters: bool = False
    supports_fsdp: bool = True
    #: the ``method.prediction`` values its preconditioning implements
    predictions: tuple[str, ...] = ("velocity", "data")
    #: whether the objective draws its main stage from ``method.stage_probs`` (a method that does not refuses it)
    uses_stage_probs: bool = True
    #: whether its sampler takes ``sampler.thresholds`` (DFM's stage jumps); a front end refuses values for one that
    #: does not, other than its run's own
    uses_thresholds: bool = True

    # -- settings
    def validate(self, cfg: RunConfig) -> None:
        """Method-specific checks of a run config, raising ``ValueError`` with what to change."""

    def options(self, m: MethodConfig) -> Any:
        """``m.options`` as the method's typed :attr:`Options`."""
        return self.Options(**m.options)

    def num_data_std(self, m: MethodConfig) -> int:
        """How many data stds the preconditioning needs (one per network stage)."""
        return m.stages

    def from_dfm(self, cfg: RunConfig) -> RunConfig:
        """This method's twin of a DFM config (same backbone, data, optimiser and total sampling steps); may change
        ``cfg`` in place."""
        raise NotImplementedError

    # -- training
    def decomposition(self, m: MethodConfig, standardized: bool = True) -> Decomposition:
        """The run's decomposition; wrapped in :class:`Standardized` when ``method.standardize`` is on (unless
        ``standardized`` is False, e.g. to measure the level stds it needs)."""
        decomposition = build_decomposition(m.decomposition, m.stages, m.factors, m.temporal_factors, m.resample)
        if standardized and m.standardize:
            if m.level_std is None:
                raise ValueError("method.standardize is on but method.level_std is unset: estimate it from data first")
            decomposition = Standardized(decomposition, m.level_std)
        return decomposition

    def objective(self, m: MethodConfig, decomposition: Decomposition, total_steps: int | None = None) -> Any:
        return DFMObjective(
            decomposition,
            loss_weighting=m.loss_weighting,
            data_std=m.data_std,
            stage_probs=m.stage_probs,
            main_loc=m.main_loc,
            main_scale=m.main_scale,
            prev_loc=m.prev_loc,
            prev_scale=m.prev_scale,
            tied=m.tied,
            prediction=m.prediction,
        )

    def decide_at_start(self, m: MethodConfig, objective: Any) -> None:
        """Write what the run decided at its start (:attr:`decided_at_start`) into ``m.options``."""

    def callbacks(self, m: MethodConfig, objective: Any) -> list[TrainingCallback]:
        """What the trainer calls before every optimiser step; none for most methods."""
        return []

    def measure_data_std(self, m: MethodConfig, decomposition: Decomposition, x: Tensor) -> tuple[float, ...]:
        """The std of what each stage's network sees (before the floor the trainer applies)."""
        return estimate_level_std(decomposition, x)

    # -- the network
    def network(self, cfg: RunConfig, sample_shape: Sequence[int], num_classes: int) -> nn.Module:
        """A fresh network sized for the data: the DFM-DiT named by ``cfg.model``, or for ``model.backbone=flux|sd3``
        the transformer of the diffusers directory ``model.pretrained`` converted to the method's stages
        (:func:`dfm.adapters.load_adapter`; one stage for ``fm``: the transformer unchanged)."""
        mc = cfg.model
        if mc.backbone != "dit":
            from dfm.adapters import load_adapter

            return load_adapter(mc.pretrained, stage_factors(cfg.method), mc.distilled_guidance, mc.lora_rank,
                                mc.lora_alpha, mc.gradient_checkpointing, kind=mc.backbone)  # fmt: skip
        return DFMDiT(self.dit_config(cfg, self.network_settings(cfg, sample_shape, num_classes)))

    @staticmethod
    def dit_config(cfg: RunConfig, settings: dict[str, Any]) -> DiTConfig:
        """``cfg.model.name``'s DiTConfig with ``settings``; an error about a field the user set names it as they
        typed it (``model.overrides.head_border='edge': ...``)."""
        try:
            return create_config(cfg.model.name, **settings)
        except ValueError as err:
            message = str(err)
            for key in cfg.model.overrides:
                message = re.sub(rf"(?<![.\w]){re.escape(key)}=", f"model.overrides.{key}=", message)
            raise ValueError(message) from None

    def network_settings(self, cfg: RunConfig, sample_shape: Sequence[int], num_classes: int) -> dict[str, Any]:
        """The DiTConfig fields of the run's network: ``model.overrides`` and what the data and stages fix."""
        return {**cfg.model.overrides, "input_size": tuple(sample_shape[1:]), "in_channels": int(sample_shape[0]),
                "num_classes": num_classes, "stage_factors": stage_factors(cfg.method)}  # fmt: skip

    def velocity_model(self, network: Any, m: MethodConfig) -> Any:
        """What the objective trains and the sampler integrates: the network, or with ``method.precondition`` the
        network wrapped in the method's preconditioning (:meth:`preconditioned`)."""
        if not m.precondition:
            return network
        if m.data_std is None:
            raise ValueError(
                "method.precondition is on but method.data_std is unset: the trainer measures it from the data "
                "(or set it, one std per stage, with -o method.data_std=...)"
            )
        return self.preconditioned(network, m)

    def preconditioned(self, network: Any, m: MethodConfig) -> Any:
        """The network in the method's preconditioning wrapper: DFM's, each stage on its own path with its data std
        (:class:`~dfm.models.precondition.Preconditioned`)."""
        return Preconditioned(network, m.data_std, prediction=m.prediction)

    def load_network(self, path: Path, cfg: RunConfig, format1: bool = False) -> nn.Module:
        """A network written by the network's ``save_pretrained`` in ``path`` (a run's ``pretrained/``)."""
        if cfg.model.backbone != "dit":
            from dfm.adapters import load_saved_adapter

            return load_saved_adapter(path)
        return DFMDiT.from_pretrained(path, format1=format1)

    # -- sampling
    def sampler(self, m: MethodConfig) -> Sampler:
        return StageSampler(self.decomposition(m))


class DFM(Method):
    name = "dfm"
    description = "Decomposable Flow Matching: flow matching on every level of a multi-scale decomposition"

    def from_dfm(self, cfg: RunConfig) -> RunConfig:
        return cfg


class FlowMatching(Method):
    name = "fm"
    description = "plain Flow Matching: DFM with one stage"

    def validate(self, cfg: RunConfig) -> None:
        if cfg.method.stages != 1:
            raise ValueError("method fm is the one-stage case: set method.stages=1 (or use --method fm)")

    def from_dfm(self, cfg: RunConfig) -> RunConfig:
        # The velocity MSE: measured better for Flow Matching than DFM's EDM weighting (docs/RESULTS.md).
        cfg.method = dataclasses.replace(cfg.method, name="fm", stages=1, factors=None, stage_probs=None,
                                         data_std=None, options={}, loss_weighting="velocity")  # fmt: skip
        # its one stage is its finest: a shift of DFM's finest stages warps Flow Matching's whole grid
        cfg.sampler = dataclasses.replace(cfg.sampler, steps=(sum(cfg.sampler.steps),), thresholds=(),
                                          guidance=cfg.sampler.guidance[:1], shift_from=0)  # fmt: skip
        return cfg

    def decomposition(self, m: MethodConfig, standardized: bool = True) -> Decomposition:
        return super().decomposition(dataclasses.replace(m, decomposition="identity"), standardized)


def stage_factors(m: MethodConfig) -> tuple[int, ...]:
    """Resolution factor of every stage relative to the finest, coarse to fine (what the model needs)."""
    if m.stages == 1:
        return (1,)
    factors = m.factors or (2,) * (m.stages - 1)
    if isinstance(factors, int):
        factors = (factors,) * (m.stages - 1)
    return tuple(math.prod(factors[i:]) for i in range(len(factors))) + (1,)


def staged_baseline(cfg: RunConfig, name: str) -> RunConfig:
    """A staged baseline's twin of a DFM config: as many stages, the sampling steps split equally among them (the
    later stages get one more where they do not divide), no standardisation, the velocity loss and prediction (what
    the baselines train with), the baseline's default options. A baseline with a fixed number of stages (the
    cascade's two) refuses other counts when the twin is resolved."""
    m = cfg.method
    if m.stages < 2:
        raise ValueError(f"method {name} is compared with DFM configs of two or more stages; this one has {m.stages}")
    each, extra = divmod(sum(cfg.sampler.steps), m.stages)
    cfg.method = dataclasses.replace(m, name=name, standardize=False, level_std=None, data_std=None, stage_probs=None,
                                     loss_weighting="velocity", prediction="velocity", options={})  # fmt: skip
    cfg.sampler = dataclasses.replace(cfg.sampler, steps=(each,) * (m.stages - extra) + (each + 1,) * extra)
    return cfg


_REGISTRY: dict[str, Method] = {}
#: built-in methods defined outside this module, imported on first use
_BUILTIN_MODULES = {"cascade": "dfm.baselines.cascade", "pyramidal": "dfm.baselines.pyramidal"}


def register_method(method: Method) -> Method:
    """Add a method to the registry (under ``method.name``); returns it, so it can decorate an instance."""
    if not method.name:
        raise ValueError("a method needs a name")
    if not dataclasses.is_dataclass(method.Options):
        raise TypeError(f"method {method.name}: Options must be a dataclass")
    _REGISTRY[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    """Every known method: the built-in ones first, in the order of the paper's comparison."""
    return tuple(dict.fromkeys(("dfm", "fm", *_BUILTIN_MODULES, *_REGISTRY)))


def get_method(name: str) -> Method:
    """The registry entry of ``name``; the error lists the known methods."""
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _REGISTRY:
        raise ValueError(f"method.name={name!r}: choose one of {', '.join(method_names())}")
    return _REGISTRY[name]


register_method(DFM())
register_method(FlowMatching())
