"""``DFMPipeline``: a trained ``dfm`` model behind diffusers' pipeline conventions (needs ``dfm[vae]``).

    >>> from dfm.pipeline import DFMPipeline                                     # doctest: +SKIP
    >>> pipe = DFMPipeline.from_pretrained("runs/quickstart/pretrained")          # doctest: +SKIP
    >>> out = pipe(class_labels=[3, 3, 7], seeds=[0, 1, 2], num_inference_steps=(30, 10))  # doctest: +SKIP
    >>> out.images[0].save("bag.png"); len(out.previews)                          # doctest: +SKIP

It loads what ``dfm sample`` loads (a run directory or its ``pretrained/`` directory) and makes the same images:
for the same seeds, labels and settings the pipeline's images are ``dfm sample``'s, pixel for pixel (a test checks
it). Images come without the data set's padding (as ``dfm sample`` writes them), quantised to 8 bits like a saved
image; ``output_type`` is ``"pil"``, ``"np"`` (float in [0, 1], (N, H, W, C)) or ``"pt"`` (float in [0, 1],
(N, C, H, W)). ``previews`` holds every stage's preview (the coarse image after stage 1, ...), in the same type.
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

from dfm.config import RunConfig
from dfm.data.vae import SE_FILE, load_vae
from dfm.factory import make_decomposition
from dfm.generate import METHOD_FILE, data_padding, default_labels, generate, load_run, make_decoder
from dfm.outputs import crop_border
from dfm.visual import to_uint8

OUTPUT_TYPES = ("pil", "np", "pt")
VAE_DIR = "vae"


@dataclass
class DFMPipelineOutput(ImagePipelineOutput):
    """``images`` as diffusers' image pipelines return them, plus one preview set per stage."""

    previews: list[Any] | None = None


class DFMPipeline(DiffusionPipeline):
    """Generate with a trained DFM (or Flow Matching, cascade, Pyramidal Flow) model; see the module docstring."""

    model_cpu_offload_seq = "model"

    def __init__(self, model: nn.Module, run_config: RunConfig, padding: int = 0) -> None:
        super().__init__()
        self.register_modules(model=model)
        self.run_config = run_config
        self.padding = int(padding)
        self._decoder: Callable | None = None
        self._decoder_ready = False

    # -- loading and saving our pretrained/ directories
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> DFMPipeline:
        """From a run directory (EMA weights of its latest checkpoint by default), a ``pretrained/`` directory,
        or a directory written by :meth:`save_pretrained` (which holds the VAE of a latent run in ``vae/``)."""
        model, cfg = load_run(path, ema=ema, device=device)
        pipe = cls(model.eval(), cfg, data_padding(cfg, path))
        vae_dir, index = Path(path) / VAE_DIR, Path(path) / "model_index.json"
        if vae_dir.is_dir() and index.is_file():
            norm = json.loads(index.read_text()).get("vae_normalisation", {})
            vae = load_vae(vae_dir, device=device, shift=norm.get("shift"), scale=norm.get("scale"))
            pipe._decoder, pipe._decoder_ready = vae.decode_normalized, True
        return pipe

    def save_pretrained(self, directory: str | Path, **_: Any) -> Path:
        """Write a ``pretrained/``-style directory that :meth:`from_pretrained` and ``dfm sample`` read."""
        path = Path(directory)
        self.model.save_pretrained(path)
        self.run_config.save(path / METHOD_FILE)
        shape = (self.model.config.in_channels, *self.model.config.input_size)
        spec = {"sample_shape": list(shape), "num_classes": self.model.num_classes, "padding": self.padding}
        (path / "data_spec.json").write_text(json.dumps(spec) + "\n")
        index: dict[str, Any] = {"_class_name": type(self).__name__}
        decoder = self.decoder
        if decoder is not None:  # a latent run: its VAE travels with the model
            vae = decoder.__self__
            vae.model.save_pretrained(path / VAE_DIR)
            if vae.scale_equivariant:
                (path / VAE_DIR / SE_FILE).write_text(json.dumps({"scale_equivariant": True}) + "\n")
            index["vae_normalisation"] = {"shift": vae.shift, "scale": vae.scale}
        (path / "model_index.json").write_text(json.dumps(index) + "\n")
        return path

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (what the images are computed on)."""
        return next(self.model.parameters()).device

    @property
    def decoder(self) -> Callable | None:
        """The VAE decoder of latent runs (loaded on first use), None for pixel runs."""
        if not self._decoder_ready:
            self._decoder = make_decoder(self.run_config, self.device)
            self._decoder_ready = True
        return self._decoder

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
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable[[DFMPipeline, int, int, dict], Any] | None = None,
        return_dict: bool = True,
        batch_size: int = 64,
    ) -> DFMPipelineOutput | tuple:
        """Generate one image per seed.

        Args:
            class_labels: one label per image, or one for all; None = ``seed % num_classes`` (as ``dfm sample``).
            num_images: how many, when neither ``seeds`` nor a list of labels says it (default 1).
            seeds: one seed per image (its noise depends on it only); default drawn from ``generator``.
            num_inference_steps: steps per stage, e.g. (30, 10); an int is split as the run's steps are.
            thresholds, guidance_scale, solver: as ``dfm sample`` (default: the run's).
            callback_on_step_end: called as ``callback(pipe, step, stage, {"preview": tensor})`` when a stage
                reaches its threshold (the steps where DFM has a preview), ``step`` the sampler step index.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: choose one of {OUTPUT_TYPES}")
        seeds, labels = self._seeds_and_labels(class_labels, num_images, seeds, generator)
        steps = self._steps(num_inference_steps)
        cfg, model = self.run_config, self.model
        shape = (model.config.in_channels, *model.config.input_size)
        decomposition = make_decomposition(cfg.method)
        images, previews = [], []
        callback = self._stage_callback(callback_on_step_end, steps or cfg.method.steps)
        with self.progress_bar(total=len(seeds)) as bar:
            for lo in range(0, len(seeds), batch_size):
                batch_seeds = seeds[lo : lo + batch_size]
                batch_labels = None if labels is None else labels[lo : lo + batch_size]
                x, p = generate(model, decomposition, cfg, shape, batch_labels, batch_seeds,
                                guidance=guidance_scale, steps=steps, thresholds=thresholds, solver=solver,
                                batch_size=batch_size, device=self.device, decoder=self.decoder,
                                callback=callback)  # fmt: skip
                images.append(x)
                previews.append(p)
                bar.update(len(batch_seeds))
        images = torch.cat(images)
        stage_previews = [torch.cat([p[s] for p in previews]) for s in range(len(previews[0]))]
        out_images = self._convert(crop_border(images, self.padding), output_type)
        out_previews = [self._convert(p, output_type) for p in stage_previews]
        if not return_dict:
            return out_images, out_previews
        return DFMPipelineOutput(images=out_images, previews=out_previews)

    def _seeds_and_labels(self, class_labels, num_images, seeds, generator) -> tuple[list[int], list[int] | None]:
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
        num_classes = self.model.num_classes
        if class_labels is None:
            return seeds, default_labels(seeds, num_classes)
        labels = [int(class_labels)] * count if isinstance(class_labels, int) else [int(c) for c in class_labels]
        if len(labels) != count:
            raise ValueError(f"got {len(labels)} class_labels for {count} images: give one per image, or one")
        if num_classes == 0 or any(not 0 <= c < num_classes for c in labels):
            raise ValueError(f"class_labels {sorted(set(labels))}: this model has classes 0..{num_classes - 1}")
        return seeds, labels

    def _steps(self, num_inference_steps) -> list[int] | None:
        if num_inference_steps is None:
            return None
        run_steps = list(self.run_config.method.steps)
        if isinstance(num_inference_steps, int):  # split like the run's steps, e.g. 40 -> (30, 10)
            total = sum(run_steps)
            split = [max(1, round(num_inference_steps * s / total)) for s in run_steps[:-1]]
            return [*split, max(1, num_inference_steps - sum(split))]
        steps = [int(s) for s in num_inference_steps]
        if len(steps) != len(run_steps):
            raise ValueError(f"num_inference_steps={tuple(steps)}: give one step count per stage ({len(run_steps)})")
        return steps

    def _stage_callback(self, callback, steps):
        if callback is None:
            return None
        ends = np.cumsum(steps).tolist()
        return lambda stage, preview: callback(self, int(ends[stage]), int(stage), {"preview": preview})

    @staticmethod
    def _convert(x: torch.Tensor, output_type: str) -> Any:
        arr = to_uint8(x)  # (N, H, W, C) uint8, what dfm sample writes; videos (N, T, H, W, C)
        if output_type == "pil" and x.dim() == 5:
            raise ValueError('output_type="pil" holds images; for video runs use "np" or "pt"')
        if output_type == "pil":
            return [PIL.Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]
        floats = arr.astype(np.float32) / 255.0
        return floats if output_type == "np" else torch.from_numpy(floats).movedim(-1, 1)
