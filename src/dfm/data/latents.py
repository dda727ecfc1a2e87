"""Pre-encoded VAE latents on disk, and the dataset that trains on them.

A latent directory holds ``latents.json`` and safetensors shards. Each shard stores, per image, the
VAE posterior ``mean`` and ``std`` (raw latent units, ``(N, c, h, w)``) and the class ``label``.
Keeping the posterior instead of one sample lets training draw a fresh latent every time an image
is seen, ``z = mean + std * eps``, as when encoding on the fly. Items are then normalised with the
shift and scale recorded in the JSON, ``x = (z - shift) * scale``, so that the model sees roughly
unit-variance inputs; generated ``x`` decodes with ``z = x / scale + shift``.

``latents.json`` (version 1)::

    {"format": "dfm-latents", "version": 1, "latent_shape": [c, h, w], "image_resolution": R,
     "vae": "<path or hub id>", "shift": s, "scale": k, "num_classes": n, "class_names": [...],
     "splits": {"train": {"num_samples": N, "files": ["train-00000.safetensors", ...]}}}

Text-conditioned latents (``dfm prepare --text-encoder``, for the diffusers FLUX / SD3 backbones) also store, per
image, its caption's ``prompt_embeds`` (L, D) and ``pooled`` (D,) in the shards (in the storage dtype), the empty
prompt's embedding once in ``empty_prompt.safetensors``, and ``"text": {"encoder": ..., "max_length": L, ...}`` in
the JSON; their items are ``(x, TextCondition)`` and they have no classes. The text embeddings are read from the
shards on demand (memory-mapped), not loaded whole: at 128 T5 tokens of 4096 features in bf16 they are 1 MiB per
image.

The JSON is written last, so a directory without it is an unfinished preparation.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dfm.data.base import DFMDataset, random_hflip
from dfm.data.vae import load_vae
from dfm.text import TextCondition

__all__ = ["FORMAT", "LatentDataset", "LatentWriter", "is_latent_dir", "read_latent_info"]

FORMAT = "dfm-latents"
VERSION = 1
INFO_FILE = "latents.json"
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
TEXT_KEYS = ("prompt_embeds", "pooled")


def is_latent_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory written by ``dfm prepare`` (it holds ``latents.json``)."""
    return (Path(path) / INFO_FILE).is_file()


def read_latent_info(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``latents.json`` of a latent directory."""
    info_path = Path(path) / INFO_FILE
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {info_path}: {err}; run `dfm prepare` again") from err
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise ValueError(
            f"{info_path} is not a {FORMAT} v{VERSION} file (format={info.get('format')!r}, "
            f"version={info.get('version')!r}); run `dfm prepare` again"
        )
    return info


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then move the result to ``path`` in one step."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class LatentWriter:
    """Write latents in shards of ``shard_size`` samples, then the JSON (see the module doc).

    Example:
        >>> with LatentWriter(out, latent_shape=(4, 8, 8), vae="my-vae", shift=0.0, scale=0.18,
        ...                   class_names=["cat", "dog"]) as writer:        # doctest: +SKIP
        ...     writer.add("train", mean, std, labels)
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        latent_shape: tuple[int, ...],
        vae: str,
        shift: float,
        scale: float,
        class_names: list[str],
        shard_size: int = 10_000,
        dtype: torch.dtype = torch.float32,
        extra: dict[str, Any] | None = None,
        text: dict[str, Any] | None = None,
    ) -> None:
        """``text``: settings of the text encoder (its source, ``max_length``) for text-conditioned latents, whose
        batches then come with a :class:`~dfm.text.TextCondition` and which need :meth:`set_empty_prompt`."""
        if shard_size < 1:
            raise ValueError(f"shard_size={shard_size} must be at least 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.info: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "latent_shape": list(latent_shape),
            "vae": vae,
            "shift": float(shift),
            "scale": float(scale),
            "num_classes": len(class_names),
            "class_names": list(class_names),
            "dtype": str(dtype).removeprefix("torch."),
            "splits": {},
            **(extra or {}),
        }
        if text is not None:
            self.info["text"] = dict(text)
        self.shard_size = shard_size
        self.dtype = dtype
        self._pending: dict[str, list[dict[str, torch.Tensor]]] = {}
        self._empty_prompt: TextCondition | None = None

    def add(
        self, split: str, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor, text: TextCondition | None = None
    ) -> None:
        """Queue a batch of posteriors (and, for text latents, their captions' embeddings); full shards are
        written as soon as they fill."""
        expected = tuple(self.info["latent_shape"])
        if tuple(mean.shape[1:]) != expected or mean.shape != std.shape or labels.shape != mean.shape[:1]:
            raise ValueError(
                f"batch shapes mean {tuple(mean.shape)}, std {tuple(std.shape)}, labels "
                f"{tuple(labels.shape)} do not match latent shape {expected}"
            )
        if (text is None) != ("text" not in self.info):
            raise ValueError("text embeddings go with a writer made with text=..., and every batch needs them")
        batch = {"mean": mean.detach().cpu().to(self.dtype), "std": std.detach().cpu().to(self.dtype),
                 "label": labels.cpu().long()}  # fmt: skip
        if text is not None:
            if text.batch != mean.shape[0]:
                raise ValueError(f"{text.batch} text embeddings for {mean.shape[0]} latents")
            batch.update(prompt_embeds=text.prompt_embeds.detach().cpu().to(self.dtype),
                         pooled=text.pooled.detach().cpu().to(self.dtype))  # fmt: skip
        self.info["splits"].setdefault(split, {"num_samples": 0, "files": []})
        self._pending.setdefault(split, []).append(batch)
        while sum(b["mean"].shape[0] for b in self._pending[split]) >= self.shard_size:
            self._flush(split, self.shard_size)

    def set_empty_prompt(self, condition: TextCondition) -> None:
        """The empty prompt's embedding (batch 1), written once beside the shards."""
        if condition.batch != 1:
            raise ValueError(f"the empty prompt is one condition (batch 1), got {condition.batch}")
        self._empty_prompt = condition

    def _flush(self, split: str, count: int | None = None) -> None:
        pending = self._pending.get(split, [])
        if not pending:
            return
        joined = {key: torch.cat([b[key] for b in pending]) for key in pending[0]}
        total = joined["mean"].shape[0]
        count = total if count is None else count
        split_info = self.info["splits"][split]
        name = f"{split}-{len(split_info['files']):05d}.safetensors"
        tensors = {key: v[:count].contiguous() for key, v in joined.items()}
        _atomic_write(self.out_dir / name, lambda tmp: save_file(tensors, tmp))
        split_info["files"].append(name)
        split_info["num_samples"] += count
        self._pending[split] = [{key: v[count:] for key, v in joined.items()}] if total > count else []

    def close(self) -> None:
        """Write the remaining partial shards (and the empty prompt), then ``latents.json``."""
        for split in list(self._pending):
            self._flush(split)
        if "text" in self.info:
            if self._empty_prompt is None:
                raise ValueError("text latents need the empty prompt's embedding: call set_empty_prompt")
            empty = {"prompt_embeds": self._empty_prompt.prompt_embeds.detach().cpu().to(self.dtype).contiguous(),
                     "pooled": self._empty_prompt.pooled.detach().cpu().to(self.dtype).contiguous()}  # fmt: skip
            _atomic_write(self.out_dir / EMPTY_PROMPT_FILE, lambda tmp: save_file(empty, tmp))
        text = json.dumps(self.info, indent=2)
        _atomic_write(self.out_dir / INFO_FILE, lambda tmp: Path(tmp).write_text(text))

    def __enter__(self) -> LatentWriter:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:  # an interrupted run leaves no JSON: the directory is not mistaken for data
            self.close()


class LatentDataset(DFMDataset):
    """Latents prepared by ``dfm prepare`` as ``(x float32 (c, h, w), y int64)`` items.

    Args:
        root: the latent directory.
        split: which split to read (``"train"`` by default).
        sample_posterior: draw ``z = mean + std * eps`` per item (default) instead of using the mean.
        random_flip: flip latents left-right at random. Off by default: for a convolutional VAE the
            flipped latent is only close to, not equal to, the latent of the flipped image.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        sample_posterior: bool = True,
        random_flip: bool = False,
    ) -> None:
        self.root = Path(root)
        info = read_latent_info(self.root)
        if split not in info["splits"]:
            raise ValueError(f"split {split!r} not in {self.root / INFO_FILE}; it has {sorted(info['splits'])}")
        self.info = info
        self.split = split
        self.sample_posterior = sample_posterior
        self.random_flip = random_flip
        self.text = info.get("text")  #: the text encoder's settings, for text-conditioned latents (else None)
        shards = []
        self._text_files: list[tuple[Any, int]] = []  # (open shard, its first index) for text embeddings
        start = 0
        for name in info["splits"][split]["files"]:
            try:
                if self.text is None:
                    shards.append(load_file(str(self.root / name)))
                else:
                    handle = safe_open(str(self.root / name), framework="pt")
                    shards.append({key: handle.get_tensor(key) for key in ("mean", "std", "label")})
                    if not set(TEXT_KEYS) <= set(handle.keys()):
                        raise ValueError(f"it holds no text embeddings although {INFO_FILE} has a 'text' entry")
                    self._text_files.append((handle, start))
                    start += shards[-1]["mean"].shape[0]
            except Exception as err:  # safetensors raises its own error types
                raise ValueError(f"cannot read latent shard {self.root / name}: {err}") from err
        self.mean = torch.cat([s["mean"] for s in shards])
        self.std = torch.cat([s["std"] for s in shards])
        self.labels = torch.cat([s["label"] for s in shards]).long()
        expected_count = info["splits"][split]["num_samples"]
        if self.mean.shape[0] != expected_count or tuple(self.mean.shape[1:]) != tuple(info["latent_shape"]):
            raise ValueError(
                f"{self.root} shards hold {tuple(self.mean.shape)} but {INFO_FILE} says "
                f"{expected_count} x {tuple(info['latent_shape'])}; run `dfm prepare` again"
            )
        self.sample_shape = tuple(info["latent_shape"])
        self.num_classes = int(info["num_classes"])
        self.class_names = list(info["class_names"])
        self.vae_path = str(info["vae"])
        self.latent_shift = float(info["shift"])
        self.latent_scale = float(info["scale"])
        self.image_resolution = info.get("image_resolution")
        self.source_data = info.get("source_data")
        #: pixels of padding of the encoded images (decoded samples drop it to compare with the real images)
        self.padding = int(info.get("padding", _fashion_padding(self.source_data, self.image_resolution)))
        self._vae: Any = None

    @property
    def empty_prompt(self) -> TextCondition | None:
        """The empty prompt's embedding (batch 1, float32) of text latents; None for class-labelled ones."""
        if self.text is None:
            return None
        file = self.root / EMPTY_PROMPT_FILE
        try:
            state = load_file(str(file))
        except Exception as err:
            raise ValueError(f"cannot read {file}: {err}; run `dfm prepare` again") from err
        return TextCondition(state["prompt_embeds"].float(), state["pooled"].float())

    def text_condition(self, indices: torch.Tensor) -> TextCondition:
        """The caption embeddings (float32) of ``indices``, read from the shards."""
        if self.text is None:
            raise ValueError(f"{self.root} holds no text embeddings: prepare it with --text-encoder")
        starts = [s for _, s in self._text_files]
        embeds, pooled = [], []
        for i in torch.as_tensor(indices, dtype=torch.long).tolist():
            k = max(j for j, s in enumerate(starts) if s <= i)
            handle, first = self._text_files[k]
            embeds.append(handle.get_slice("prompt_embeds")[i - first : i - first + 1])
            pooled.append(handle.get_slice("pooled")[i - first : i - first + 1])
        return TextCondition(torch.cat(embeds).float(), torch.cat(pooled).float())

    def autoencoder(self, device: str | torch.device = "cpu") -> Any:
        """The autoencoder that encoded these latents (a :class:`dfm.data.vae.VAE` with their normalisation), loaded
        on first use (needs diffusers) and kept, on ``device``."""
        if self._vae is None:
            self._vae = load_vae(self.vae_path, device=device, shift=self.latent_shift, scale=self.latent_scale)
        elif self._vae.device != torch.device(device):
            self._vae.model.to(device)
        return self._vae

    def __len__(self) -> int:
        return self.mean.shape[0]

    def load(
        self, index: int, augment: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch(torch.tensor([index]), generator=generator, augment=augment)
        return x[0], y[0]

    def get_batch(
        self, indices: torch.Tensor, generator: torch.Generator | None = None, augment: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | TextCondition]:
        """Latents of ``indices`` and their labels (text latents: their :class:`~dfm.text.TextCondition`); with
        ``augment``, posterior samples (and flips when enabled)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        z = self.mean[indices].float()
        if augment and self.sample_posterior:
            eps = torch.randn(z.shape, generator=generator)
            z = z + self.std[indices].float() * eps
        x = (z - self.latent_shift) * self.latent_scale
        if augment and self.random_flip:
            x = random_hflip(x, generator)
        return x, (self.labels[indices] if self.text is None else self.text_condition(indices))


def _fashion_padding(source: str | None, resolution: int | None) -> int:
    """The padding of latents prepared before ``dfm prepare`` recorded it: Fashion-MNIST's rule, else 0."""
    if source is None or resolution is None or str(source).lower().partition(":")[0] != "fashion-mnist":
        return 0
    return 0 if resolution == 28 or (2 * resolution) % 32 else 2 * resolution // 32
