"""``DFMPipeline``: a trained ``dfm`` model behind diffusers' pipeline conventions (needs ``dfm[vae]``).

    >>> from dfm.pipeline import DFMPipeline                                     # doctest: +SKIP
    >>> pipe = DFMPipeline.from_pretrained("runs/quickstart/pretrained")          # doctest: +SKIP
    >>> out = pipe(class_labels=[3, 3, 7], seeds=[0, 1, 2], num_inference_steps=(30, 10))  # doctest: +SKIP
    >>> out.images[0].save("bag.png"); len(out.previews)                          # doctest: +SKIP

It loads what ``dfm sample`` loads (a run directory or its ``pretrained/`` directory, :class:`dfm.run.Run`) and
generates through the same :class:`dfm.generate.Generator`: for the same seeds, labels and settings the pipeline's
images and previews are ``dfm sample``'s, pixel for pixel (a test checks it). Images come without the data set's
padding (as ``dfm sample`` writes them), quantised to 8 bits like a saved image; ``output_type`` is ``"pil"``,
``"np"`` (float in [0, 1], (N, H, W, C)) or ``"pt"`` (float in [0, 1], (N, C, H, W)). ``previews`` holds every
stage's preview (the coarse image after stage 1, ...), in the same type.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from torch import nn

from dfm.config import RunConfig, SamplerConfig
from dfm.data.vae import SE_FILE
from dfm.generate import Generator
from dfm.outputs import crop_border
from dfm.run import PIPELINE_INDEX, VAE_DIR, DataSpec, Run
from dfm.sampling import SamplingState
from dfm.visual import to_uint8

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class PipelineState:
    """Samplings stopped with ``until_stage``: where they stand, for which seeds and labels, with which settings."""

    sampling: SamplingState
    seeds: list[int]
    labels: list[int] | None
    settings: SamplerConfig


@dataclass
class DFMPipelineOutput(ImagePipelineOutput):
    """``images`` as diffusers' image pipelines return them, plus one preview set per stage, and with
    ``until_stage`` the state to finish them from."""

    previews: list[Any] | None = None
    state: PipelineState | None = None


class DFMPipeline(DiffusionPipeline):
    """Generate with a trained DFM (or Flow Matching, cascade, Pyramidal Flow) model; see the module docstring."""

    model_cpu_offload_seq = "model"

    def __init__(self, model: nn.Module, run_config: RunConfig, spec: DataSpec, decoder: Any = None) -> None:
        super().__init__()
        self.register_modules(model=model)
        self.generator = Generator(model, run_config, spec, decoder)

    @property
    def run_config(self) -> RunConfig:
        return self.generator.config

    # -- loading and saving our pretrained/ directories
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> DFMPipeline:
        """From a run directory (EMA weights of its latest checkpoint by default), a ``pretrained/`` directory,
        or a directory written by :meth:`save_pretrained` (which holds the VAE of a latent run in ``vae/``)."""
        run = Run.open(path)
        return cls(run.load_network(ema=ema, device=device), run.config, run.spec, run.decoder(device))

    def save_pretrained(self, directory: str | Path, **_: Any) -> Path:
        """Write a ``pretrained/``-style directory that :meth:`from_pretrained` and ``dfm sample`` read, with the
        autoencoder of a latent run in ``vae/``."""
        gen = self.generator
        path = Run.save_pretrained(self.model, directory, gen.config, gen.spec)
        index: dict[str, Any] = {"_class_name": type(self).__name__}
        vae = gen.decoder
        if vae is not None:
            vae.model.save_pretrained(path / VAE_DIR)
            if vae.scale_equivariant:
                (path / VAE_DIR / SE_FILE).write_text(json.dumps({"scale_equivariant": True}) + "\n")
            index["vae_normalisation"] = {"shift": vae.shift, "scale": vae.scale}
        (path / PIPELINE_INDEX).write_text(json.dumps(index) + "\n")
        return path

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (what the images are computed on)."""
        return self.generator.device

    # -- generation
    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | int | None = None,
        num_images: int | None = None,
        seeds: Sequence[int] | None = None,
        num_inference_steps: Sequence[int] | int | None = None,
        thresholds: Sequence[float] | None = None,
        guidance_scale: float | Sequence[float] | None = None,
        solver: str | None = None,
        shift: float | None = None,
        shift_from: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable[[DFMPipeline, int, int, dict], Any] | None = None,
        return_dict: bool = True,
        batch_size: int = 64,
        until_stage: int | None = None,
        state: PipelineState | None = None,
        image: torch.Tensor | Sequence[PIL.Image.Image] | None = None,
        vary: int | None = None,
        keep: int = 1,
    ) -> DFMPipelineOutput | tuple:
        """Generate one image per seed.

        What only a decomposed model can do (stage numbers as the paper's: 1 is the coarsest):

        - ``until_stage=K``: stop when stage K reaches its threshold; the images are that stage's previews and
          ``output.state`` is where every sampling stands. ``pipe(state=output.state, seeds=[3, 17])`` then
          finishes the chosen seeds, as an uninterrupted call would have made them.
        - ``image=``: low-resolution images (a tensor (N, C, h, w) in [-1, 1], or PIL images) at the resolution of
          a coarse stage become the coarse levels, held fixed; the finer levels are generated (upscaling), seed i
          for image i.
        - ``vary=SEED``: the image of SEED keeps its first ``keep`` levels and gets new detail from each seed.

        Args:
            class_labels: one label per image, or one for all; None = ``seed % num_classes`` (as ``dfm sample``).
            num_images: how many, when neither ``seeds`` nor a list of labels says it (default 1).
            seeds: one seed per image (its noise depends on it only); default drawn from ``generator``.
            num_inference_steps: steps per stage, e.g. (30, 10); an int is split as the run's steps are.
            thresholds, guidance_scale, solver, shift, shift_from: as ``dfm sample`` (default: the run's; ``shift``
                is SD3's time shift of the grid, ``sampler.shift``, on stages ``shift_from``.. (-1: the finest)).
            callback_on_step_end: called as ``callback(pipe, step, stage, {"preview": tensor})`` when a stage
                reaches its threshold (the steps where DFM has a preview), ``step`` the sampler step index.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: choose one of {OUTPUT_TYPES}")
        if sum(x is not None for x in (until_stage, state, image, vary)) > 1:
            raise ValueError("until_stage, state, image and vary: give one of them")
        gen = self.generator
        if state is not None:
            return self._finish(state, seeds, output_type, return_dict, batch_size)
        if image is not None:
            image = self._images(image)
            num_images = len(image) if seeds is None else num_images
        seeds = self._seeds(class_labels, num_images, seeds, generator)
        classes = [class_labels] if isinstance(class_labels, int) else class_labels
        labels = gen.labels(seeds, classes)
        if classes is not None and not isinstance(class_labels, int) and len(classes) != len(seeds):
            raise ValueError(f"got {len(classes)} class_labels for {len(seeds)} images: give one per image, or one")
        settings = gen.settings(steps=self._steps(num_inference_steps), thresholds=thresholds,
                                guidance=guidance_scale, solver=solver, shift=shift, shift_from=shift_from)  # fmt: skip
        callback = None
        if callback_on_step_end is not None:
            ends = np.cumsum(settings.steps).tolist()
            callback = lambda stage, preview: callback_on_step_end(self, int(ends[stage]), int(stage),  # noqa: E731
                                                                   {"preview": preview})  # fmt: skip
        stop = None if until_stage is None else gen.check_stage(until_stage - 1, "until_stage")
        if vary is not None:
            gen.check_keep(keep)
        with self.progress_bar(total=len(seeds)) as bar:
            parts = []
            for lo in range(0, len(seeds), batch_size):
                batch, batch_labels = (
                    seeds[lo : lo + batch_size],
                    None if labels is None else labels[lo : lo + batch_size],
                )
                common = dict(batch_size=batch_size, callback=callback)
                if image is not None:
                    part = gen.upscale(image[lo : lo + batch_size], batch, batch_labels, settings, **common)
                elif vary is not None:
                    part = gen.vary(vary, batch, None if labels is None else labels[0], settings, keep=keep, **common)
                else:
                    part = gen.generate(batch, batch_labels, settings, until_stage=stop, **common)
                parts.append(part)
                bar.update(len(batch))
        images = torch.cat([p.images for p in parts])
        stage_previews = [torch.cat([p.previews[s] for p in parts]) for s in range(len(parts[0].previews))]
        crop = gen.spec.padding * images.shape[-1] // gen.spec.sample_shape[-1]
        out_images = self._convert(crop_border(images, crop), output_type)
        out_previews = [self._convert(p, output_type) for p in stage_previews]
        pipe_state = None
        if stop is not None:
            pipe_state = PipelineState(SamplingState.cat([p.state for p in parts]), seeds, labels, settings)
        if not return_dict:
            return out_images, out_previews
        return DFMPipelineOutput(images=out_images, previews=out_previews, state=pipe_state)

    def _finish(self, state: PipelineState, seeds: Sequence[int] | None, output_type: str, return_dict: bool,
                batch_size: int) -> DFMPipelineOutput | tuple:  # fmt: skip
        """The samplings of ``state`` for ``seeds`` (default: all of them), finished."""
        seeds = list(state.seeds) if seeds is None else [int(s) for s in seeds]
        rows = {s: i for i, s in enumerate(state.seeds)}
        missing = [s for s in seeds if s not in rows]
        if missing:
            raise ValueError(f"seeds {missing[:8]} are not in this state (it holds {len(state.seeds)} seeds)")
        index = [rows[s] for s in seeds]
        labels = None if state.labels is None else [state.labels[i] for i in index]
        gen = self.generator
        out = gen.refine(state.sampling.select(index), labels, state.settings, batch_size=batch_size)
        images = self._convert(gen.crop(out.images), output_type)
        previews = [self._convert(p, output_type) for p in out.previews]
        if not return_dict:
            return images, previews
        return DFMPipelineOutput(images=images, previews=previews)

    def _images(self, image: torch.Tensor | Sequence[PIL.Image.Image]) -> torch.Tensor:
        """Low-resolution images as a batch in [-1, 1] with the model's channels."""
        if isinstance(image, torch.Tensor):
            return image.float()
        channels = self.generator.spec.sample_shape[0]
        arrays = [np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) for im in image]
        x = torch.from_numpy(np.stack(arrays)) / 127.5 - 1.0
        return x[:, None] if channels == 1 else x.permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def _seeds(class_labels, num_images, seeds, generator) -> list[int]:
        count = num_images
        if seeds is not None:
            seeds = [int(s) for s in seeds]
            count = len(seeds)
        elif isinstance(class_labels, Sequence):
            count = len(class_labels)
        count = 1 if count is None else int(count)
        if count < 1:
            raise ValueError(f"num_images={count}: ask for at least one image")
        if seeds is None:
            seeds = torch.randint(0, 2**31 - 1, (count,), generator=generator).tolist()
        return seeds

    def _steps(self, num_inference_steps) -> tuple[int, ...] | None:
        """Steps per stage; an int is split as the run's steps are, e.g. 40 -> (30, 10)."""
        if num_inference_steps is None or not isinstance(num_inference_steps, int):
            return num_inference_steps
        run_steps = self.run_config.sampler.steps
        total = sum(run_steps)
        split = [max(1, round(num_inference_steps * s / total)) for s in run_steps[:-1]]
        return (*split, max(1, num_inference_steps - sum(split)))

    @staticmethod
    def _convert(x: torch.Tensor, output_type: str) -> Any:
        arr = to_uint8(x)  # (N, H, W, C) uint8, what dfm sample writes; videos (N, T, H, W, C)
        if output_type == "pil" and x.dim() == 5:
            raise ValueError('output_type="pil" holds images; for video runs use "np" or "pt"')
        if output_type == "pil":
            return [PIL.Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]
        floats = arr.astype(np.float32) / 255.0
        return floats if output_type == "np" else torch.from_numpy(floats).movedim(-1, 1)
