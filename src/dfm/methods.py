"""The methods a run can train and sample with, one registry entry each.

A method says what the rest of the library would otherwise ask with ``if method == ...``: its decomposition, its
training objective, the network it trains, how it samples, what data std its preconditioning needs, which
settings it accepts, and its own settings (``method.options``, a dataclass of the method). DFM and plain Flow
Matching live here; the cascade and Pyramidal Flow register themselves in :mod:`dfm.baselines`. A new method is
one module with a :class:`Method` subclass passed to :func:`register_method`.

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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from dfm.decomposition import Decomposition, build_decomposition, estimate_level_std
from dfm.models import create_model
from dfm.objective import DFMObjective
from dfm.sampling import SampleOutput, network_evaluations, sample
from dfm.schedule import StageSchedule

if TYPE_CHECKING:
    from dfm.config import MethodConfig, RunConfig


@dataclasses.dataclass
class NoOptions:
    """A method without settings of its own."""


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

    # -- settings
    def validate(self, cfg: RunConfig) -> None:
        """Method-specific checks of a run config, raising ``ValueError`` with what to change."""

    def options(self, m: MethodConfig) -> Any:
        """``m.options`` as the method's typed :attr:`Options`."""
        return self.Options(**m.options)

    def num_data_std(self, m: MethodConfig) -> int:
        """How many data stds the preconditioning needs (one per network stage)."""
        return m.stages

    def network_evaluations(self, steps: Sequence[int], solver: str) -> int:
        """Network evaluations of one sample (without guidance's doubled batch) with ``steps`` per stage."""
        return network_evaluations(steps, solver)

    def from_dfm(self, m: MethodConfig) -> MethodConfig:
        """This method's twin of a DFM method config (same backbone settings and total sampling steps)."""
        raise NotImplementedError

    # -- training
    def decomposition(self, m: MethodConfig) -> Decomposition:
        return build_decomposition(m.decomposition, m.stages, m.factors, m.temporal_factors, m.resample)

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
        )

    def decide_at_start(self, m: MethodConfig, objective: Any) -> None:
        """Write what the run decided at its start (:attr:`decided_at_start`) into ``m.options``."""

    def measure_data_std(self, m: MethodConfig, decomposition: Decomposition, x: Tensor) -> tuple[float, ...]:
        """The std of what each stage's network sees (before the floor the trainer applies)."""
        return estimate_level_std(decomposition, x)

    # -- the network
    def network_preconditioned(self, m: MethodConfig) -> bool:
        """Whether the network itself does the EDM scaling (else the method's path does it)."""
        return m.precondition

    def model(self, cfg: RunConfig, settings: dict[str, Any]) -> nn.Module:
        """The network, from the model registry name in ``cfg.model`` and the resolved DiTConfig ``settings``."""
        return create_model(cfg.model.name, **settings)

    # -- sampling
    def sample(
        self,
        model: nn.Module,
        decomposition: Decomposition,
        m: MethodConfig,
        schedule: StageSchedule,
        shape: Sequence[int],
        labels: Tensor | None,
        **common: Any,
    ) -> SampleOutput:
        """Generate ``shape[0]`` samples; ``common`` holds ``seeds``, ``guidance``, ``solver`` and ``device``."""
        return sample(model, decomposition, schedule, shape, labels, **common)


class DFM(Method):
    name = "dfm"
    description = "Decomposable Flow Matching: flow matching on every level of a multi-scale decomposition"

    def from_dfm(self, m: MethodConfig) -> MethodConfig:
        return dataclasses.replace(m)


class FlowMatching(Method):
    name = "fm"
    description = "plain Flow Matching: DFM with one stage"

    def validate(self, cfg: RunConfig) -> None:
        if cfg.method.stages != 1:
            raise ValueError("method fm is the one-stage case: set method.stages=1 (or use --method fm)")

    def from_dfm(self, m: MethodConfig) -> MethodConfig:
        # The velocity MSE: measured better for Flow Matching than DFM's EDM weighting (docs/RESULTS.md).
        return dataclasses.replace(
            m, method="fm", stages=1, factors=None, stage_probs=None, steps=(sum(m.steps),), thresholds=(),
            data_std=None, options={}, loss_weighting="velocity",
        )  # fmt: skip

    def decomposition(self, m: MethodConfig) -> Decomposition:
        return build_decomposition("identity", m.stages, m.factors, m.temporal_factors, m.resample)


def stage_factors(m: MethodConfig) -> tuple[int, ...]:
    """Resolution factor of every stage relative to the finest, coarse to fine (what the model needs)."""
    if m.stages == 1:
        return (1,)
    factors = m.factors or (2,) * (m.stages - 1)
    if isinstance(factors, int):
        factors = (factors,) * (m.stages - 1)
    return tuple(math.prod(factors[i:]) for i in range(len(factors))) + (1,)


def two_stage_baseline(m: MethodConfig, name: str) -> MethodConfig:
    """A two-stage baseline's twin of a two-stage DFM config: the sampling steps split equally, no
    standardisation, the velocity loss (what the baselines train with), the baseline's default options."""
    if m.stages != 2:
        raise ValueError(f"method {name} is compared with two-stage DFM configs; this one has {m.stages}")
    total = sum(m.steps)
    return dataclasses.replace(
        m, method=name, steps=(total // 2, total - total // 2), standardize=False, level_std=None, data_std=None,
        loss_weighting="velocity", options={},
    )  # fmt: skip


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
        raise ValueError(f"method.method={name!r}: choose one of {method_names()}")
    return _REGISTRY[name]


register_method(DFM())
register_method(FlowMatching())
