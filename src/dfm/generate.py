"""The one generation path: :class:`Generator` turns a run's network into images and stage previews.

``dfm sample``, ``dfm serve``, ``dfm bench quality``, the trainer's sample grids and :class:`dfm.pipeline.DFMPipeline`
all call it, so that the same seeds give the same images and the same previews everywhere. It owns what sits
between a run and its samples: the method's velocity model (preconditioning) and sampler, the sampler settings
(:meth:`Generator.settings`, checked in :class:`dfm.config.SamplerConfig`), labels, batching, precision, and the
decoding of a latent run's samples and previews.

An image is a function of its seed, its class and the sampler settings: its starting noise depends on its seed
only, so ``--seeds 0-49999`` gives seed 17 the same image whether it is drawn alone, in a batch of 256, or on any
number of GPUs. Precisely: bitwise the same for the same batch composition (same ``--batch-size`` and number of
processes, hence the same neighbours); otherwise equal up to float rounding, because matrix products reduce in an
order that depends on the batch shape, which in rare cases moves a uint8 pixel by one level.

Previews: the denoised estimate when a stage reaches its threshold, recomposed from the levels generated so far.
A pixel run's previews are exact; a latent run's are exact when its autoencoder is scale-equivariant (``dfm
autoencoder finetune``: a coarse latent decodes to the coarse image), else the partial latent is upsampled to full
size and decoded, an approximation (:attr:`Generator.previews_exact`).

Example:
    >>> gen = Generator.from_run("runs/quickstart")                          # doctest: +SKIP
    >>> out = gen.generate([0, 1, 2], gen.labels([0, 1, 2], classes=[3]))    # doctest: +SKIP
    >>> out.images.shape, [p.shape for p in out.previews]                    # doctest: +SKIP
    (torch.Size([3, 1, 32, 32]), [torch.Size([3, 1, 16, 16]), torch.Size([3, 1, 32, 32])])
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dfm.config import RunConfig, SamplerConfig
from dfm.methods import get_method
from dfm.outputs import crop_border
from dfm.run import DataSpec, Run
from dfm.sampling import SampleOutput, SamplingState, StageSampler
from dfm.text import TextCondition
from dfm.visual import grid_columns, image_grid, progression_grid, save_gif, save_png

#: ``callback(stage, preview)``: a stage's decoded preview of the current batch, as soon as the stage is done
StageCallback = Callable[[int, Tensor], None]


@dataclass
class Generation:
    """What :meth:`Generator.generate` returns, on the CPU, decoded to pixels in [-1, 1] (with the data set's
    padding: :meth:`Generator.crop` drops it)."""

    images: Tensor  #: (N, C, H, W), or (N, C, T, H, W) clips (stopped with ``until_stage``: that stage's previews)
    previews: list[Tensor]  #: one per stage, coarse to fine (exact previews at the stage's resolution)
    state: SamplingState | None = None  #: where a sampling stopped with ``until_stage`` stands (model space)


class Generator:
    """A network with what it needs to generate: its run's config (method, sampler), data spec and decoder.

    Args:
        network: the trained network (what :meth:`dfm.run.Run.load_network` returns).
        config: the run's config; its method gives the velocity model and the sampler, its sampler the defaults.
        spec: the run's data spec (sample shape, classes, padding).
        decoder: a latent run's autoencoder (:class:`dfm.data.vae.VAE`), None for pixel runs.
    """

    def __init__(self, network: nn.Module, config: RunConfig, spec: DataSpec, decoder: Any = None) -> None:
        self.network, self.config, self.spec, self.decoder = network, config, spec, decoder
        self.method = get_method(config.method.name)
        self.model = self.method.velocity_model(network, config.method)
        self.sampler = self.method.sampler(config.method)

    @classmethod
    def from_run(
        cls,
        run: Run | str | os.PathLike[str],
        ema: bool = True,
        checkpoint: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
    ) -> Generator:
        """The generator of a run directory or a save_pretrained directory (see :meth:`dfm.run.Run.load_network`)."""
        run = run if isinstance(run, Run) else Run.open(run)
        network = run.load_network(ema=ema, checkpoint=checkpoint, device=device)
        return cls(network, run.config, run.spec, run.decoder(device))

    # -- what it generates
    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def text_conditioned(self) -> bool:
        """Whether the model takes prompts (a diffusers FLUX / SD3 backbone) instead of classes."""
        return hasattr(self.network, "null_condition")

    @property
    def previews_exact(self) -> bool:
        """Whether stage previews decode exactly: pixel runs, or a scale-equivariant autoencoder."""
        return self.decoder is None or bool(getattr(self.decoder, "scale_equivariant", False))

    @property
    def stages(self) -> int:
        return self.config.method.stages

    def crop(self, images: Tensor) -> Tensor:
        """Images without the data set's padding, as they compare with the real data."""
        return crop_border(images, self.spec.padding)

    # -- settings
    def settings(self, **changes: Any) -> SamplerConfig:
        """The run's sampler settings with ``changes`` (``steps``, ``thresholds``, ``solver``, ``guidance``,
        ``time_shift``, ``shift``; None leaves one as it is), checked for this model: the one place where a front end's
        sampling settings become a :class:`~dfm.config.SamplerConfig`."""
        given = {k: v for k, v in changes.items() if v is not None}
        unknown = set(given) - {f.name for f in dataclasses.fields(SamplerConfig)}
        if unknown:
            raise ValueError(f"unknown sampler settings {sorted(unknown)}")
        for key in ("steps", "thresholds", "guidance"):
            if key in given:
                value = given[key]
                given[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if not self.sampler.uses_thresholds and "thresholds" in given:
            # a front end may send the run's own (the web page does); other values would be silently ignored
            if tuple(float(v) for v in given.pop("thresholds")) != tuple(self.config.sampler.thresholds):
                raise ValueError(f"thresholds: method {self.config.method.name} does not use them (each of its "
                                 "stages runs its own time grid): leave them out")  # fmt: skip
        return dataclasses.replace(self.config.sampler, **given).validate(self.stages, self.sampler.uses_thresholds)

    def network_evaluations(self, settings: SamplerConfig | None = None) -> int:
        """Network evaluations of one sample with ``settings`` (default: the run's), guidance's doubled batch aside."""
        return self.sampler.network_evaluations(settings or self.config.sampler)

    def labels(self, seeds: Sequence[int], classes: Sequence[int] | None = None) -> list[int] | None:
        """One class per seed: ``classes`` cycled over the seeds, else ``seed % num_classes`` (so that an image is a
        function of its seed); None for unconditional and text models."""
        n = self.num_classes
        if classes is None or len(classes) == 0:
            return None if n == 0 else [int(s) % n for s in seeds]
        if n == 0:
            raise ValueError("classes: this model is unconditional (no classes); leave them out")
        bad = sorted({int(c) for c in classes if not 0 <= int(c) < n})
        if bad:
            raise ValueError(f"classes {bad} out of range: this model has classes 0..{n - 1}")
        return [int(classes[i % len(classes)]) for i in range(len(seeds))]

    # -- generation
    @torch.no_grad()
    def generate(
        self,
        seeds: Sequence[int],
        labels: Sequence[int] | TextCondition | None = None,
        settings: SamplerConfig | None = None,
        *,
        batch_size: int = 64,
        precision: str = "fp32",
        progress: bool = False,
        callback: StageCallback | None = None,
        until_stage: int | None = None,
    ) -> Generation:
        """One image per seed (class ``labels[i]``, or text condition row i), with ``settings`` (default: the
        run's sampler); ``callback(stage, preview)`` receives each batch's decoded previews as they are ready.

        ``until_stage=k`` stops when stage k (0-based) reaches its threshold: the images are that stage's
        previews, and ``state`` is where the sampling stands, for :meth:`refine`."""
        settings = (settings or self.config.sampler).validate(self.stages, self.sampler.uses_thresholds)
        options = {} if until_stage is None else {"until_stage": self.check_stage(until_stage, "stop after")}
        shape = self.spec.sample_shape

        def run(lo: int, hi: int, y: Any, on_stage: Any) -> SampleOutput:
            return self.sampler.sample(self.model, (hi - lo, *shape), y, settings=settings,
                                       seeds=[int(s) for s in seeds[lo:hi]], device=self.device, callback=on_stage,
                                       **options)  # fmt: skip

        return self._batches(len(seeds), labels, batch_size, precision, progress, callback, run)

    @torch.no_grad()
    def refine(
        self,
        state: SamplingState,
        labels: Sequence[int] | TextCondition | None = None,
        settings: SamplerConfig | None = None,
        *,
        batch_size: int = 64,
        precision: str = "fp32",
        progress: bool = False,
        callback: StageCallback | None = None,
    ) -> Generation:
        """Finish samplings stopped by ``generate(..., until_stage=k)`` (``state``, or ``state.select(...)`` of the
        ones worth finishing), with the settings they started with: each image is the one an uninterrupted
        ``generate`` gives for its seed, bit for bit when the images are finished in the same batches."""
        sampler = self._dfm_sampler("refine")
        settings = (settings or self.config.sampler).validate(self.stages, self.sampler.uses_thresholds)

        def run(lo: int, hi: int, y: Any, on_stage: Any) -> SampleOutput:
            part = state.select(range(lo, hi))
            return sampler.resume(self.model, part, y, settings=settings, device=self.device, callback=on_stage)

        return self._batches(state.levels[0].shape[0], labels, batch_size, precision, progress, callback, run)

    @torch.no_grad()
    def upscale(
        self,
        images: Tensor,
        seeds: Sequence[int],
        labels: Sequence[int] | None = None,
        settings: SamplerConfig | None = None,
        *,
        batch_size: int = 64,
        precision: str = "fp32",
        progress: bool = False,
        callback: StageCallback | None = None,
    ) -> Generation:
        """Images of the model's resolution from low-resolution ``images`` (N, C, h, w) in [-1, 1], pixels at the
        resolution of a coarse stage: they become the coarse levels, clean and held fixed, and the model generates
        only the finer levels (seed i for image i). A super-resolution from a model trained for generation."""
        sampler = self._dfm_sampler("upscale")
        if self.decoder is not None:
            raise ValueError("upscale works on pixel-space runs: a latent run's coarse level is a latent, not an image")
        shapes = sampler.decomposition.level_shapes((images.shape[0], *self.spec.sample_shape))
        stage = next((k for k, s in enumerate(shapes[:-1]) if tuple(images.shape) == s), None)
        if stage is None:
            sizes = " or ".join("x".join(map(str, s[2:])) for s in shapes[:-1])
            raise ValueError(f"images of {tuple(images.shape[1:])}: this model upscales {shapes[0][1]}-channel "
                             f"images of {sizes} (the resolution of a coarse stage)")  # fmt: skip
        given = sampler.decomposition.coarse_levels(images.float(), stage)
        return self._given(given, seeds, labels, settings, batch_size, precision, progress, callback)

    @torch.no_grad()
    def vary(
        self,
        seed: int,
        seeds: Sequence[int],
        label: int | None = None,
        settings: SamplerConfig | None = None,
        *,
        keep: int = 1,
        batch_size: int = 64,
        precision: str = "fp32",
        progress: bool = False,
        callback: StageCallback | None = None,
    ) -> Generation:
        """Variations of the image of ``seed`` (class ``label``): the first ``keep`` levels of that image are kept
        clean and held, and the finer levels are generated again from each of ``seeds``: same composition, new
        detail. Returns the variations (the image of ``seed`` itself is ``generate([seed], [label])``)."""
        sampler = self._dfm_sampler("vary the detail")
        if not 1 <= keep < self.stages:
            raise ValueError(
                f"keep={keep}: keep 1 to {self.stages - 1} coarse levels of this {self.stages}-stage model"
            )
        settings = (settings or self.config.sampler).validate(self.stages, self.sampler.uses_thresholds)
        y = None if label is None else torch.tensor([int(label)], device=self.device)
        with self._autocast(precision):
            base = sampler.sample(self.model, (1, *self.spec.sample_shape), y, settings=settings, seeds=[int(seed)],
                                  device=self.device)  # fmt: skip
        labels = None if label is None else [int(label)] * len(seeds)
        # the coarse levels of the image (what the image is made of, which for overlapping Laplacian levels also
        # holds the finer levels' low frequencies), not the sampler's own
        levels = sampler.decomposition.decompose(base.images)
        given = [lv.expand(len(seeds), *lv.shape[1:]) for lv in levels[:keep]]
        return self._given(given, seeds, labels, settings, batch_size, precision, progress, callback)

    def _given(self, given: list[Tensor], seeds: Sequence[int], labels: Sequence[int] | None,
               settings: SamplerConfig | None, batch_size: int, precision: str, progress: bool,
               callback: StageCallback | None) -> Generation:  # fmt: skip
        """Sampling with the first levels given (clean, held): :meth:`upscale` and :meth:`vary`."""
        if len(seeds) != given[0].shape[0]:
            raise ValueError(f"give one seed per image: {len(seeds)} seeds for {given[0].shape[0]} images")
        settings = (settings or self.config.sampler).validate(self.stages, self.sampler.uses_thresholds)
        shape = self.spec.sample_shape

        def run(lo: int, hi: int, y: Any, on_stage: Any) -> SampleOutput:
            part = [lv[lo:hi].to(self.device) for lv in given]
            return self.sampler.sample(self.model, (hi - lo, *shape), y, settings=settings,
                                       seeds=[int(s) for s in seeds[lo:hi]], device=self.device, callback=on_stage,
                                       given=part)  # fmt: skip

        return self._batches(len(seeds), labels, batch_size, precision, progress, callback, run)

    def _batches(self, count: int, labels: Sequence[int] | TextCondition | None, batch_size: int, precision: str,
                 progress: bool, callback: StageCallback | None,
                 run: Callable[[int, int, Any, Any], SampleOutput]) -> Generation:  # fmt: skip
        """``run(lo, hi, labels, on_stage)`` for every batch, its outputs decoded and gathered on the CPU."""
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size} must be >= 1")
        device = self.device
        images: list[Tensor] = []
        previews: list[list[Tensor]] = []
        states: list[SamplingState] = []
        batches = range(0, count, batch_size)
        if progress:
            batches = tqdm(batches, desc="sample", unit="batch", dynamic_ncols=True)
        for lo in batches:
            hi = min(lo + batch_size, count)
            if isinstance(labels, TextCondition):
                y = labels[lo:hi].to(device)
            else:
                y = None if labels is None else torch.as_tensor(list(labels[lo:hi]), device=device)
            on_stage = None
            if callback is not None:
                on_stage = lambda stage, preview: callback(stage, self._decode_preview(preview))  # noqa: E731
            with self._autocast(precision):
                out = run(lo, hi, y, on_stage)
            stopped = out.state is not None
            decode = self._decode_preview if stopped else self._decode
            images.append(decode(out.images.float()).cpu())
            batch_previews = [self._decode_preview(p.float()).cpu() for p in out.previews]
            previews = previews or [[] for _ in batch_previews]
            for stage, p in enumerate(batch_previews):
                previews[stage].append(p)
            if stopped:
                st = out.state
                states.append(SamplingState([lv.cpu() for lv in st.levels], st.step, st.stage,
                                            [p.cpu() for p in st.previews]))  # fmt: skip
        state = SamplingState.cat(states) if states else None
        return Generation(torch.cat(images), [torch.cat(p) for p in previews], state)

    def check_stage(self, stage: int, what: str) -> int:
        """``stage`` (0-based) if a sampling of this model can stop after it (a DFM model, not its last stage)."""
        self._dfm_sampler(what)
        if not 0 <= stage < self.stages - 1:
            choices = "1" if self.stages == 2 else f"1 to {self.stages - 1}"
            raise ValueError(f"{what} {stage + 1}: this model has {self.stages} stages; choose {choices} (the last "
                             "stage ends the sampling)")  # fmt: skip
        return stage

    def check_keep(self, keep: int) -> int:
        """``keep`` if :meth:`vary` can keep that many coarse levels of this model."""
        self._dfm_sampler("vary the detail")
        if not 1 <= keep < self.stages:
            raise ValueError(f"keep {keep} levels: keep 1 to {self.stages - 1} coarse levels of this "
                             f"{self.stages}-stage model")  # fmt: skip
        return keep

    def _dfm_sampler(self, what: str) -> StageSampler:
        """DFM's sampler, for what only a model whose stages have their own noise and time can do."""
        if not isinstance(self.sampler, StageSampler) or self.stages < 2:
            kinds = {"fm": "one-stage Flow Matching", "cascade": "a two-model cascade",
                     "pyramidal": "Pyramidal Flow (one noise re-noised across stages)"}  # fmt: skip
            kind = kinds.get(self.config.method.name, self.config.method.name)
            raise ValueError(f"{what}: this run is {kind}; it needs a DFM model, whose stages each have their own "
                             "noise and time")  # fmt: skip
        return self.sampler

    def _autocast(self, precision: str) -> contextlib.AbstractContextManager[Any]:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {precision!r}: choose fp32 or bf16")
        if precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _decode(self, x: Tensor) -> Tensor:
        return x if self.decoder is None else self.decoder.decode_normalized(x)

    def _decode_preview(self, preview: Tensor) -> Tensor:
        """A stage's preview in pixels: exact, or the partial latent upsampled to full size, then decoded."""
        if self.decoder is None:
            return preview
        if not self.previews_exact:
            size = self.spec.sample_shape[-2:]
            preview = torch.nn.functional.interpolate(preview.float(), size=size, mode="bilinear", align_corners=False)
        return self.decoder.decode_normalized(preview)


def encode_prompts(run: Run, prompts: Sequence[str], count: int, device: str | torch.device) -> TextCondition:
    """One text condition per image (prompts cycled), each prompt encoded once with the encoder that prepared the
    run's training captions (recorded by ``dfm prepare --text-encoder``)."""
    from dfm.text import load_text_encoder

    record = run.text_encoder_record()
    if not record:
        raise ValueError(f"{run.path}: its data records no text encoder (dfm prepare --text-encoder)")
    encoded = load_text_encoder(record["encoder"], int(record["max_length"]), device)(list(prompts))
    return encoded[torch.tensor([i % len(prompts) for i in range(count)])]


class Seeds(Sequence[int]):
    """Seeds given as ranges (``"0-49999"``, ``"1,5,9"``, ``"0-9,100"``), never expanded into one list: any number
    of them costs a few bytes until they are taken in slices."""

    MAX = 2**63 - 1

    def __init__(self, ranges: Sequence[tuple[int, int]]) -> None:
        self.ranges = [(int(a), int(b)) for a, b in ranges]  # inclusive
        self._starts = list(itertools.accumulate((b - a + 1 for a, b in self.ranges), initial=0))

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            out: list[int] = []
            k = bisect.bisect_right(self._starts, start) - 1
            while start < stop and k < len(self.ranges):
                first, last = self.ranges[k]
                lo = first + start - self._starts[k]
                take = min(stop - start, last - lo + 1)
                out.extend(range(lo, lo + take))
                start += take
                k += 1
            return out
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("seed index out of range")
        k = bisect.bisect_right(self._starts, index) - 1
        return self.ranges[k][0] + index - self._starts[k]

    def __repr__(self) -> str:
        return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in self.ranges)


def parse_seeds(text: str) -> Seeds:
    """``"0-49999"``, ``"1,5,9"`` or ``"0-9,100"`` -> the seeds, as ranges (:class:`Seeds`)."""
    ranges: list[tuple[int, int]] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
            if first < 0 or last < first or last > Seeds.MAX:
                raise ValueError
            ranges.append((first, last))
    except ValueError:
        raise ValueError(f"cannot parse seeds {text!r}: use a range like 0-49999 or a list like 1,5,9") from None
    if not ranges:
        raise ValueError("no seeds given")
    return Seeds(ranges)


def shard(seq: Sequence[int], rank: int, world: int) -> list[int]:
    """Contiguous shard of ``seq`` for ``rank`` (``world`` processes): ranks' shards concatenate back to ``seq``."""
    per = math.ceil(len(seq) / world)
    return list(seq[rank * per : (rank + 1) * per])


def write_sample_grid(
    generator: Generator, out_dir: Path, step: int, n: int = 40, text: TextCondition | None = None,
    precision: str = "fp32",
) -> Path:  # fmt: skip
    """The trainer's periodic pictures: a grid of samples and a coarse-to-fine progression (seeds 0..n-1, classes
    seed mod the class count); a text model draws image i with row i of ``text``."""
    seeds = list(range(n))
    labels = generator.labels(seeds) if text is None else text
    out = generator.generate(seeds, labels, precision=precision)
    images, previews = out.images, out.previews
    out_dir.mkdir(parents=True, exist_ok=True)
    nrow = grid_columns(n, generator.num_classes)
    if images.dim() == 5:  # video: an animated grid, and the middle frame for the still pictures
        frames = [image_grid(images[:, :, f], nrow=nrow) for f in range(images.shape[2])]
        save_gif(frames, out_dir / f"step_{step:08d}.gif")
        images = images[:, :, images.shape[2] // 2]
        previews = [p[:, :, p.shape[2] // 2] for p in previews]
    save_png(image_grid(images, nrow=nrow), out_dir / f"step_{step:08d}.png")
    if len(previews) > 1:
        save_png(progression_grid(previews, images, max_rows=min(n, 10)), out_dir / f"progression_{step:08d}.png")
    return out_dir / f"step_{step:08d}.png"
