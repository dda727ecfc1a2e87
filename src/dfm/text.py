"""Text conditioning for the diffusers FLUX / SD3 backbones: :class:`TextCondition`, captions and text encoders.

A text-to-image model is conditioned on a :class:`TextCondition` ``(prompt_embeds (B, L, D), pooled (B, D))``:
FLUX's T5 token embeddings and CLIP pooled embedding, SD3's concatenated CLIP + T5 token embeddings and its two
CLIP pooled embeddings. Wherever our class-conditional models take labels ``y`` (the objective, the sampler,
the trainer, ``dfm.generate``), a text model takes a ``TextCondition``; the unconditional branch of classifier-free
guidance and caption dropout use the empty prompt's embedding.

A text encoder is any callable ``prompts (list of str) -> TextCondition`` (:data:`TextEncoder`); tests pass a
fake one. :func:`load_text_encoder` builds the real one from a diffusers FLUX or SD3 directory: the pipeline is
loaded with ``transformer=None, vae=None`` (only the tokenizers and text encoders) and its ``encode_prompt`` is
called, with ``max_length`` T5 tokens (512 T5 tokens of 4096 features in bf16 are 4 MiB per image: ``dfm prepare``
defaults to 128).

Captions of an image folder (:func:`read_captions`): a ``captions.jsonl`` at the folder's root, one
``{"file": "<path relative to the folder>", "text": "..."}`` per line, or one ``<image stem>.txt`` beside each image.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["TextCondition", "TextEncoder", "diffusers_kind", "load_text_encoder", "read_captions"]

CAPTIONS_FILE = "captions.jsonl"
#: diffusers transformer class -> our backbone name
BACKBONES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}


@dataclass(frozen=True)
class TextCondition:
    """Text conditioning of a diffusers text-to-image transformer.

    ``prompt_embeds``: (B, L, D_joint) per-token embeddings (``encoder_hidden_states``);
    ``pooled``: (B, D_pooled) pooled embedding (``pooled_projections``). A batch of 1 broadcasts.
    Slicing (``cond[2:5]``, an index tensor) selects samples; :meth:`cat` joins conditions on the batch.
    """

    prompt_embeds: Tensor
    pooled: Tensor

    def __post_init__(self) -> None:
        if self.prompt_embeds.ndim != 3 or self.pooled.ndim != 2:
            raise ValueError(
                f"TextCondition needs prompt_embeds (B, L, D) and pooled (B, D), got "
                f"{tuple(self.prompt_embeds.shape)} and {tuple(self.pooled.shape)}"
            )
        if self.prompt_embeds.shape[0] != self.pooled.shape[0]:
            raise ValueError(f"prompt_embeds and pooled disagree on the batch: {self.batch} vs {self.pooled.shape[0]}")

    @property
    def batch(self) -> int:
        return self.prompt_embeds.shape[0]

    def __len__(self) -> int:
        return self.batch

    def __getitem__(self, index: int | slice | Tensor) -> TextCondition:
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return TextCondition(self.prompt_embeds[index], self.pooled[index])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextCondition:
        return TextCondition(
            self.prompt_embeds.to(device=device, dtype=dtype), self.pooled.to(device=device, dtype=dtype)
        )

    def expand(self, batch: int) -> TextCondition:
        """This condition for a batch of ``batch`` (a batch of 1 is broadcast)."""
        if self.batch == batch:
            return self
        if self.batch != 1:
            raise ValueError(f"text condition has batch {self.batch}, the latents {batch}")
        return TextCondition(self.prompt_embeds.expand(batch, -1, -1), self.pooled.expand(batch, -1))

    @staticmethod
    def cat(conditions: Sequence[TextCondition]) -> TextCondition:
        """The conditions joined on the batch axis (their token counts must agree)."""
        lengths = {c.prompt_embeds.shape[1:] for c in conditions}
        if len(lengths) != 1:
            raise ValueError(f"text conditions of different shapes cannot be joined: {sorted(map(tuple, lengths))}")
        return TextCondition(
            torch.cat([c.prompt_embeds for c in conditions]), torch.cat([c.pooled for c in conditions])
        )

    def where(self, mask: Tensor, other: TextCondition) -> TextCondition:
        """Per sample, ``other`` where ``mask`` (B,) is true, else this condition (``other`` may be a batch of 1):
        caption dropout replaces the dropped captions by the empty prompt this way."""
        other = other.expand(self.batch).to(self.prompt_embeds.device, self.prompt_embeds.dtype)
        mask = mask.to(self.prompt_embeds.device)
        return TextCondition(
            torch.where(mask[:, None, None], other.prompt_embeds, self.prompt_embeds),
            torch.where(mask[:, None], other.pooled, self.pooled),
        )


#: ``prompts -> TextCondition`` (batch = number of prompts)
TextEncoder = Callable[[list[str]], TextCondition]


def _pipeline_dtype(dtype: torch.dtype | None) -> dict[str, torch.dtype | None]:
    """The dtype keyword of the installed diffusers' ``Pipeline.from_pretrained``: ``dtype`` where it knows it (it
    deprecated ``torch_dtype`` in 2026 and warns on it), else ``torch_dtype`` (older pipelines would pass an unknown
    ``dtype`` on to their components and load float32)."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def diffusers_kind(path: str | os.PathLike[str]) -> str:
    """``"flux"`` or ``"sd3"`` for a diffusers model directory (``model_index.json`` + ``transformer/``), read
    from ``transformer/config.json``; a one-line ``ValueError`` for anything else."""
    path = Path(path)
    config = path / "transformer" / "config.json"
    if not (path / "model_index.json").is_file() or not config.is_file():
        raise FileNotFoundError(f"{path} is not a diffusers model directory (needs model_index.json and transformer/)")
    name = json.loads(config.read_text()).get("_class_name")
    if name not in BACKBONES:
        raise ValueError(
            f"{path} holds a diffusers {name}, neither FLUX nor SD3: fine-tuning converts a FluxTransformer2DModel "
            "or an SD3Transformer2DModel"
        )
    return BACKBONES[name]


def load_text_encoder(
    model_dir: str | os.PathLike[str],
    max_length: int = 128,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> TextEncoder:
    """The text encoders of a diffusers FLUX or SD3 directory as a :data:`TextEncoder` (float32 outputs).

    FLUX: ``FluxPipeline.encode_prompt`` (T5 ``prompt_embeds`` of ``max_length`` tokens, CLIP pooled). SD3:
    ``StableDiffusion3Pipeline.encode_prompt`` (CLIP-L, CLIP-G and T5; ``max_length`` T5 tokens after 77 CLIP ones).
    """
    kind = diffusers_kind(model_dir)
    try:
        import diffusers
    except ImportError as err:
        raise ImportError("text encoders need diffusers and transformers: pip install 'dfm[finetune]'") from err
    cls = diffusers.FluxPipeline if kind == "flux" else diffusers.StableDiffusion3Pipeline
    pipe = cls.from_pretrained(str(model_dir), transformer=None, vae=None, **_pipeline_dtype(dtype)).to(device)

    @torch.no_grad()
    def encode(prompts: list[str]) -> TextCondition:
        prompts = list(prompts)
        if kind == "flux":
            embeds, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_length
            )
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
                max_sequence_length=max_length,
            )  # fmt: skip
        return TextCondition(embeds.float().cpu(), pooled.float().cpu())

    return encode


def read_captions(root: str | os.PathLike[str], files: Sequence[str | os.PathLike[str]]) -> list[str]:
    """One caption per image of ``files`` (paths inside the folder ``root``): from ``root/captions.jsonl`` when it
    exists, else from the ``.txt`` beside each image. A one-line ``ValueError`` names images without a caption."""
    root = Path(root)
    rel = [Path(f).resolve().relative_to(root.resolve()).as_posix() for f in files]
    jsonl = root / CAPTIONS_FILE
    if jsonl.is_file():
        table: dict[str, str] = {}
        for n, line in enumerate(jsonl.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                table[Path(row["file"]).as_posix()] = str(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f'{jsonl} line {n}: expected {{"file": ..., "text": ...}}') from None
        missing = [r for r in rel if r not in table]
        captions = [table.get(r, "") for r in rel]
        where = f"in {jsonl}"
    else:
        texts = [root / Path(r).with_suffix(".txt") for r in rel]
        missing = [r for r, t in zip(rel, texts) if not t.is_file()]
        captions = [t.read_text().strip() if t.is_file() else "" for t in texts]
        where = f"(no {CAPTIONS_FILE} in {root}, and no .txt beside them)"
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(rel)} images have no caption {where}, e.g. {missing[0]}: add their captions"
        )
    return captions
