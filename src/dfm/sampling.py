"""Samplers: one contract for every method (:class:`Sampler`), and DFM's stage sampler (method.md section 6).

A sampler integrates a velocity model from noise (t = 0) to data (t = 1)::

    sampler.sample(model, shape, y, settings=SamplerConfig(...), seeds=...) -> SampleOutput

with the settings of :class:`dfm.config.SamplerConfig` (steps per stage, thresholds, solver, guidance, time
shift), one seed per sample, and a callback per stage. DFM and Flow Matching use :class:`StageSampler`; the
cascade and Pyramidal Flow have their own (:mod:`dfm.baselines`), built on the same three pieces below: one
guided velocity (:func:`guided_velocity`), one ODE step (:func:`ode_step`) and per-sample noise
(:func:`initial_noise`).

DFM's sampler: every stage starts from its own Gaussian noise at t = 0 and is integrated to t = 1 along the
schedule's grid (:class:`dfm.schedule.StageSchedule`); no noise is re-injected between stages. At each step the
model sees the active stages only (inactive ones are zeroed and sit at t = 0) and is told the stage being generated
(the schedule's ``main_stage`` at that step).

Euler:  x_{n+1} = x_n + Δt_n ⊙ v(x_n, t_n)
Heun:   x̃ = x_n + Δt_n ⊙ v(x_n, t_n),   x_{n+1} = x_n + Δt_n ⊙ (v(x_n, t_n) + v(x̃, t_{n+1})) / 2

where Δt_n is the per-stage time increment (zero for stages that do not move). Classifier-free guidance, per
stage s: v_s = v_s(∅) + w_s · (v_s(y) - v_s(∅)). ``y`` is a (B,) tensor of class labels (∅ = the null class) or,
for text-to-image models (:mod:`dfm.adapters`), a :class:`~dfm.text.TextCondition` (∅ = the empty prompt, from
``model.null_condition(batch)``): true classifier-free guidance, the two branches run as one doubled batch.

Example:
    >>> import torch
    >>> from dfm.config import SamplerConfig
    >>> from dfm.decomposition import LaplacianPyramid
    >>> model = lambda levels, t, y, main_stage: [-lv for lv in levels]  # any velocity field
    >>> out = StageSampler(LaplacianPyramid(2)).sample(model, (2, 1, 8, 8), settings=SamplerConfig((6, 2), (0.7,)),
    ...                                                seeds=[0, 1])
    >>> out.images.shape, len(out.previews)
    (torch.Size([2, 1, 8, 8]), 2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dfm.config import SamplerConfig
from dfm.decomposition import Decomposition
from dfm.objective import VelocityModel
from dfm.schedule import StageSchedule
from dfm.text import TextCondition

#: ``callback(stage, preview)``: called when ``stage`` (0-based) reaches its threshold, with the partial
#: reconstruction of the denoised estimate at that stage's resolution.
PreviewCallback = Callable[[int, Tensor], None]


@dataclass
class SampleOutput:
    images: Tensor  #: final samples, recomposed at full resolution
    levels: list[Tensor]  #: final per-stage levels
    previews: list[Tensor] = field(default_factory=list)  #: one per stage, at that stage's resolution
    #: a sampling stopped after a stage (``until_stage``): where it stands, to continue with ``StageSampler.resume``
    state: SamplingState | None = None


@dataclass
class SamplingState:
    """A DFM sampling stopped at the end of stage ``stage``, after ``step`` steps of its grid.

    ``levels`` hold every stage's state there (later stages still their starting noise), ``previews`` the previews
    of stages 0..``stage``. The rest of the sampling depends on nothing else, so :meth:`StageSampler.resume` with
    the same settings continues it exactly: for the same samples in the same batch, bit for bit.
    """

    levels: list[Tensor]
    step: int
    stage: int
    previews: list[Tensor]

    def select(self, index: Tensor | Sequence[int]) -> SamplingState:
        """The state of some of the samples (``index`` into the batch)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return SamplingState(
            [lv[index] for lv in self.levels], self.step, self.stage, [p[index] for p in self.previews]
        )

    @staticmethod
    def cat(states: Sequence[SamplingState]) -> SamplingState:
        """The states of several batches as one (they must have stopped at the same stage)."""
        if len({(s.step, s.stage) for s in states}) != 1:
            raise ValueError("these sampling states stopped at different stages")
        first = states[0]
        levels = [torch.cat([s.levels[i] for s in states]) for i in range(len(first.levels))]
        previews = [torch.cat([s.previews[i] for s in states]) for i in range(len(first.previews))]
        return SamplingState(levels, first.step, first.stage, previews)


class Sampler:
    """The contract of every method's sampler: integrate ``model`` from noise (t = 0) to data (t = 1).

    :meth:`sample` checks the settings, prepares guidance and draws the noise, the same for every sampler; a
    subclass says what noise it needs (:meth:`noise_shapes`) and integrates it (:meth:`integrate`).
    :meth:`network_evaluations` counts the network calls of one sample.
    """

    num_stages: int = 1
    #: how many separate time grids of the sampler end on the data (each costs Heun one evaluation less)
    grids: int = 1
    #: the options beyond the contract that :meth:`sample` passes on to :meth:`integrate`
    options: tuple[str, ...] = ()
    #: whether ``settings.thresholds`` steer it (DFM's stage jumps); a sampler without them does not check them
    uses_thresholds: bool = True

    @torch.no_grad()
    def sample(
        self,
        model: Any,
        shape: Sequence[int],
        y: Tensor | TextCondition | None = None,
        *,
        settings: SamplerConfig,
        seeds: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        noise: Sequence[Tensor] | None = None,
        null_class: int | TextCondition | None = None,
        device: torch.device | str | None = None,
        callback: PreviewCallback | None = None,
        **options: Any,
    ) -> SampleOutput:
        """Generate ``shape[0]`` samples.

        Args:
            model: the velocity model the method trains (DFM: ``model(levels_t, t, y, main_stage)``).
            shape: full-resolution output shape (B, C, H, W) or (B, C, T, H, W).
            y: (B,) class labels, a :class:`~dfm.text.TextCondition` (text models), or None (unconditional).
            settings: steps per stage, thresholds, solver, guidance, time shift.
            seeds: one seed per sample (batch-independent noise); otherwise ``generator`` or the global RNG.
            noise: explicit initial noise (overrides seeds and generator), of :meth:`noise_shapes`.
            null_class: label of the unconditional branch; default ``model.null_class`` (text: the condition of
                the unconditional branch, default ``model.null_condition(B)``).
            callback: called as ``callback(stage, preview)`` when a stage is done.
            options: what a sampler offers beyond the contract (:class:`StageSampler`: ``until_stage``, ``given``).
        """
        settings.validate(self.num_stages, self.uses_thresholds)
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: {type(self).__name__} cannot do that; stopping after a stage "
                             "and giving coarse levels need DFM's sampler (stages with their own noise and "
                             "time)")  # fmt: skip
        shapes = [tuple(int(d) for d in s) for s in self.noise_shapes(shape)]
        guidance = Guidance(*prepare_guidance(model, y, shapes[0][0], settings.stage_guidance(self.num_stages),
                                              null_class, device))  # fmt: skip
        if noise is not None:
            x = [n.to(device=device, dtype=torch.float32).clone() for n in noise]
            if [tuple(n.shape) for n in x] != shapes:
                raise ValueError(f"noise shapes {[tuple(n.shape) for n in x]} do not match {shapes}")
        else:
            x = initial_noise(shapes, seeds, generator, device)
        return self.integrate(model, x, shape, guidance, settings, callback, **options)

    def noise_shapes(self, shape: Sequence[int]) -> list[Sequence[int]]:
        """The shapes of the Gaussian noise :meth:`integrate` starts from (and, e.g., re-noises with)."""
        raise NotImplementedError

    def integrate(self, model: Any, noise: list[Tensor], shape: Sequence[int], guidance: Guidance,
                  settings: SamplerConfig, callback: PreviewCallback | None,
                  **options: Any) -> SampleOutput:  # fmt: skip
        """From the noise of :meth:`noise_shapes` to samples of ``shape``."""
        raise NotImplementedError

    def network_evaluations(self, settings: SamplerConfig) -> int:
        """Network evaluations of one sample (without guidance's doubled batch)."""
        return settings.network_evaluations(self.grids)


@dataclass
class Guidance:
    """Classifier-free guidance of a batch, as :func:`prepare_guidance` checked it: one scale per stage (all 1
    when there is none), the unconditional label or condition, and the labels."""

    scales: list[float]
    null_class: int | TextCondition | None
    y: Tensor | TextCondition | None

    def velocity(self, forward: Callable[[list, Any], Sequence[Tensor]], inputs: list,
                 scales: Sequence[float] | None = None) -> list[Tensor]:  # fmt: skip
        """:func:`guided_velocity` with these labels (``scales``: of the outputs, default every stage's)."""
        return guided_velocity(forward, inputs, self.y, self.scales if scales is None else scales, self.null_class)


def initial_noise(
    level_shapes: Sequence[Sequence[int]],
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """Gaussian noise for every level. With ``seeds`` (one per sample), sample i's noise depends on seeds[i] only,
    so an image does not depend on the batch it was drawn in, nor on how many processes share the work."""
    if seeds is None:
        return [torch.randn(*shape, generator=generator).to(device) for shape in level_shapes]
    b = level_shapes[0][0]
    if len(seeds) != b:
        raise ValueError(f"need one seed per sample: got {len(seeds)} seeds for a batch of {b}")
    per_sample: list[list[Tensor]] = []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        per_sample.append([torch.randn(*shape[1:], generator=g) for shape in level_shapes])
    return [torch.stack([p[s] for p in per_sample]).to(device) for s in range(len(level_shapes))]


def prepare_guidance(
    model: object,
    y: Tensor | TextCondition | None,
    batch: int,
    scales: Sequence[float],
    null_class: int | TextCondition | None = None,
    device: torch.device | str | None = None,
) -> tuple[list[float], int | TextCondition | None, Tensor | TextCondition | None]:
    """Check labels and guidance for a sampler: (per-stage scales, all 1 when no guidance is asked, null class,
    labels on ``device``).

    With a :class:`~dfm.text.TextCondition` ``y`` the "null class" returned is the unconditional condition: the
    given ``null_class`` condition, else ``model.null_condition(batch)`` (the empty prompt)."""
    scales = [float(w) for w in scales]
    use_cfg = any(w != 1.0 for w in scales)
    if isinstance(y, TextCondition):
        if y.batch != batch:
            raise ValueError(f"the text condition has batch {y.batch}, the samples {batch}: give one per sample")
        if use_cfg:
            if not isinstance(null_class, TextCondition):
                hook = getattr(model, "null_condition", None)
                if hook is None:
                    raise ValueError(
                        "classifier-free guidance with text needs the empty prompt: a model with "
                        "null_condition(batch), or null_class=TextCondition(...)"
                    )
                null_class = hook(batch)
            null_class = null_class.expand(batch).to(device)
        return scales, null_class, y.to(device)
    if use_cfg:
        null_class = null_class if null_class is not None else getattr(model, "null_class", None)
        if y is None or null_class is None:
            raise ValueError("classifier-free guidance needs class labels y and a null class (model.null_class)")
    if y is not None:
        y = y.to(device)
        if y.shape != (batch,):
            raise ValueError(f"y must have shape ({batch},), got {tuple(y.shape)}")
    return scales, null_class, y


def guided_velocity(
    forward: Callable[[list, Tensor | TextCondition | None], Sequence[Tensor]],
    inputs: list,
    y: Tensor | TextCondition | None,
    scales: Sequence[float],
    null_class: int | TextCondition | None = None,
) -> list[Tensor]:
    """Classifier-free guidance, one scale per output: ``v = v(∅) + w · (v(y) - v(∅))``, in float32.

    ``forward(inputs, labels)`` runs the network; ``inputs`` is a list of batch tensors (or None) that are the same
    for both branches. With any scale other than 1 the conditional and unconditional branches run as one doubled
    batch in which only the label differs (``null_class`` for the second half; for a text condition ``y``,
    ``null_class`` is the unconditional condition, e.g. the empty prompt); otherwise the network runs once.
    """
    if all(w == 1.0 for w in scales):
        return [v.float() for v in forward(inputs, y)]
    doubled = [None if a is None else torch.cat([a, a]) for a in inputs]
    if isinstance(y, TextCondition):
        labels = TextCondition.cat([y, null_class.expand(y.batch)])
    else:
        labels = torch.cat([y, torch.full_like(y, null_class)])
    out = forward(doubled, labels)
    guided = []
    for w, v in zip(scales, out):
        v_cond, v_uncond = v.float().chunk(2)
        guided.append(v_uncond + w * (v_cond - v_uncond))
    return guided


def ode_step(
    velocity: Callable[[list[Tensor], object], list[Tensor]],
    x: list[Tensor],
    t0: object,
    t1: object,
    dt: Sequence,
    solver: str,
    ends_clean: bool = False,
) -> tuple[list[Tensor], list[Tensor]]:
    """One Euler or Heun step of ``dx/dt = velocity(x, t)`` for a list of states, each with its own increment.

    ``ends_clean``: the step ends on the data (t = 1). Heun then takes an Euler step, as EDM's sampler does for
    its last step: its corrector would evaluate the network at t = 1, a time that training never draws
    (LogitNormal(0, 1) puts about 2e-6 of its mass above 0.99), where a trained network's velocity is far off
    (docs/RESULTS.md measures what the corrector costs there). So a Heun grid of N steps costs 2N - 1 evaluations.

    Returns the new states and the last velocity evaluated (at ``t0`` for Euler, at ``t1`` for Heun), which
    gives the denoised estimate ``x + (1 - t) v`` for previews.
    """
    v = velocity(x, t0)
    if solver == "euler" or ends_clean:
        return [xs + dt[s] * v[s] for s, xs in enumerate(x)], v
    x_pred = [xs + dt[s] * v[s] for s, xs in enumerate(x)]
    v2 = velocity(x_pred, t1)
    return [xs + dt[s] * (v[s] + v2[s]) / 2 for s, xs in enumerate(x)], v2


class StageSampler(Sampler):
    """DFM's sampler (and Flow Matching's, the one-stage case): all stages on one grid, coarse to fine.

    ``decomposition`` is the one the model was trained with: it gives the level shapes, the recomposition and the
    previews (the recomposed denoised estimate when a stage reaches its threshold).

    Beyond the contract, because every stage has its own noise and time:

    - ``sample(..., until_stage=k)`` stops when stage k reaches its threshold and returns the state
      (:class:`SamplingState`); :meth:`resume` continues it exactly (pick the candidates worth finishing);
    - ``sample(..., given=levels)`` takes the first ``len(levels)`` levels as given and clean: they sit at t = 1,
      are held fixed, and only the finer stages are generated (upscale a low-resolution image, or keep the
      coarse level of an image and vary its detail). With a decomposition of independent levels (Haar, DCT) the
      finer levels are projected onto their own subspaces at the end, so that the image decomposes back to the
      given levels exactly; a Laplacian pyramid's overlap (the finer levels' own low frequencies) stays.
    """

    options = ("until_stage", "given")

    def __init__(self, decomposition: Decomposition) -> None:
        self.decomposition = decomposition
        self.num_stages = decomposition.num_stages

    def noise_shapes(self, shape: Sequence[int]) -> list[Sequence[int]]:
        return self.decomposition.level_shapes(shape)

    def integrate(self, model: VelocityModel, noise: list[Tensor], shape: Sequence[int], guidance: Guidance,
                  settings: SamplerConfig, callback: PreviewCallback | None, until_stage: int | None = None,
                  given: Sequence[Tensor] | None = None) -> SampleOutput:  # fmt: skip
        x, first, previews = noise, 0, []
        if given:
            if not 0 < len(given) < self.num_stages:
                raise ValueError(f"given levels: give 1 to {self.num_stages - 1} coarse levels, got {len(given)}")
            for s, level in enumerate(given):
                if tuple(level.shape) != tuple(x[s].shape):
                    raise ValueError(f"given level {s} has shape {tuple(level.shape)}, expected {tuple(x[s].shape)}")
            x = [level.to(x[0]).clone() for level in given] + x[len(given) :]
            first = sum(settings.steps[: len(given)])
            for s in range(len(given)):
                previews.append(self.decomposition.recompose(x[: s + 1]))
                if callback is not None:
                    callback(s, previews[-1])
        return self._run(model, x, shape, guidance, settings, callback, first, previews, len(given or ()), until_stage)

    @torch.no_grad()
    def resume(
        self,
        model: VelocityModel,
        state: SamplingState,
        y: Tensor | TextCondition | None = None,
        *,
        settings: SamplerConfig,
        null_class: int | TextCondition | None = None,
        device: torch.device | str | None = None,
        callback: PreviewCallback | None = None,
        until_stage: int | None = None,
    ) -> SampleOutput:
        """Continue a sampling stopped with ``until_stage`` (with the settings it was started with)."""
        settings.validate(self.num_stages)
        ends = StageSchedule(settings.steps, settings.thresholds).stage_ends
        if state.stage >= self.num_stages - 1 or ends[state.stage] != state.step:
            raise ValueError(f"this state stopped after {state.step} steps, which is not the end of stage "
                             f"{state.stage + 1} of these settings ({settings.steps}): resume with its "
                             "settings")  # fmt: skip
        x = [lv.to(device=device, dtype=torch.float32).clone() for lv in state.levels]
        scales = settings.stage_guidance(self.num_stages)
        guidance = Guidance(*prepare_guidance(model, y, x[0].shape[0], scales, null_class, device))
        shape = (*x[-1].shape[:2], *x[-1].shape[2:])
        previews = [p.to(device) for p in state.previews]
        return self._run(model, x, shape, guidance, settings, callback, state.step, previews, 0, until_stage)

    def _run(self, model: VelocityModel, x: list[Tensor], shape: Sequence[int], guidance: Guidance,
             settings: SamplerConfig, callback: PreviewCallback | None, first: int, previews: list[Tensor],
             fixed: int, until_stage: int | None) -> SampleOutput:  # fmt: skip
        """Steps ``first`` onward of the grid; the first ``fixed`` levels are clean and held; stop at the end of
        stage ``until_stage`` (None: at the end)."""
        decomposition, num_stages = self.decomposition, self.num_stages
        if until_stage is not None and not 0 <= until_stage < num_stages - 1:
            raise ValueError(f"until_stage={until_stage}: stop after one of the stages 0..{num_stages - 2} "
                             "(0-based; the last stage ends the sampling)")  # fmt: skip
        schedule = StageSchedule.from_settings(settings, shape)
        b = x[0].shape[0]
        grid = schedule.grid.to(device=x[0].device, dtype=torch.float32)
        grid[:, :fixed] = 1.0  # given levels are clean
        active = schedule.active.to(x[0].device)
        generated = schedule.main_stage.to(x[0].device)
        held = x[:fixed]

        def velocity(levels: list[Tensor], n: int, t_row: Tensor) -> list[Tensor]:
            mask = active[n]
            inputs = [lv * mask[s] for s, lv in enumerate(levels)]
            t = t_row.expand(b, num_stages)
            main_stage = generated[n].expand(b)
            forward = lambda a, labels: model(a[:-2], a[-2], labels, a[-1])  # noqa: E731
            return guidance.velocity(forward, [*inputs, t, main_stage])

        stage_ends = set(schedule.stage_ends)
        for n in range(first, schedule.num_steps):
            t0, t1 = grid[n], grid[n + 1]
            x, v = ode_step(lambda lv, t, n=n: velocity(lv, n, t), x, t0, t1, t1 - t0, settings.solver,
                            ends_clean=n == schedule.num_steps - 1)  # fmt: skip
            x[:fixed] = held
            if n + 1 in stage_ends:
                stage = int(generated[n])
                # Denoised estimate x̂ = x + (1 - t) v from the latest velocity: at a threshold τ < 1 the state still
                # holds (1 - τ) noise, the estimate does not.
                denoised = [x[s] + (1 - t1[s]) * v[s] for s in range(stage + 1)]
                preview = decomposition.recompose(denoised)
                previews.append(preview)
                if callback is not None:
                    callback(stage, preview)
                if stage == until_stage:
                    state = SamplingState([lv.clone() for lv in x], n + 1, stage, list(previews))
                    return SampleOutput(preview, x, previews, state)
        if fixed and decomposition.independent_levels:  # what the finer levels hold of the given ones' subspaces
            x = held + decomposition.decompose(decomposition.recompose(x))[fixed:]
            previews[-1] = decomposition.recompose(x)
        return SampleOutput(decomposition.recompose(x), x, previews)
