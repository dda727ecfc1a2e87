"""What the FLUX and SD3 adapters share: text conditioning, latent packing, the per-stage modules that are swapped
into a diffusers transformer, the adapter base class (input checks, stage masking, time conversion, save/load),
LoRA and FSDP helpers.

How a pretrained one-stage transformer becomes a multi-stage DFM (paper Sec. 5, as :mod:`dfm.finetune` does for our
own DiT): the pretrained patch embedding, timestep embedder and output head become the *coarsest* stage's; every
new stage gets its own patch embedding, timestep embedder (added into the transformer's conditioning vector ``temb``,
which diffusers already forms as a sum), final adaLN norm and output head, plus a stage-index embedding. New patch
embeddings, output heads, the last linear of new timestep embedders (``SiLU(0) = 0`` would freeze the first one
otherwise) and the stage embedding start at zero, so a new stage adds nothing to the tokens nor to ``temb`` and
outputs 0: at initialisation the coarse stage's velocity is exactly the pretrained model's, see the model modules.

Rather than rewriting diffusers' ``forward``, the adapters replace submodules (``x_embedder`` / ``pos_embed.proj``,
``time_text_embed``, ``norm_out``, ``proj_out``) by wrappers that keep the pretrained module as ``base`` and hold
the new modules in ``stages``; the per-stage times are stashed on the time wrapper just before the transformer runs.
Gradient checkpointing, PEFT, ``_no_split_modules`` and ``save_pretrained`` of the transformer keep working (the
wrappers are swapped back for saving, so the saved transformer is a plain diffusers one).

Time: diffusers' flow models use ``x_sigma = (1 - sigma) x0 + sigma noise`` with velocity ``noise - x0``; ours uses
``t = 1 - sigma`` and ``v = x0 - noise``, so the adapters pass ``sigma = 1 - t`` and negate every output.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dfm.adapters.lora import add_lora, block_classes
from dfm.text import TextCondition

ADAPTER_CONFIG = "dfm_adapter.json"
STAGE_WEIGHTS = "dfm_stages.safetensors"
LORA_WEIGHTS = "dfm_lora.safetensors"
TRANSFORMER_DIR = "transformer"


# ---------------------------------------------------------------------------------------------- latent helpers
def pack(x: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C p p) tokens, features ordered (channel, row, column) as FLUX packs."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: Tensor, patch: int, size: Sequence[int]) -> Tensor:
    """Inverse of :func:`pack`: (B, N, C p p) -> (B, C, H, W) with ``size = (H, W)``."""
    b, _, d = tokens.shape
    h, w = size
    c = d // (patch * patch)
    x = tokens.reshape(b, h // patch, w // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def flux_image_ids(
    height: int, width: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(height * width, 3) FLUX position ids of a token grid, rows ``(0, row, column)`` in raster order."""
    rows = torch.arange(height, device=device, dtype=dtype)[:, None].expand(height, width)
    cols = torch.arange(width, device=device, dtype=dtype)[None, :].expand(height, width)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(height * width, 3)


def lift(x: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour upsampling by an integer factor (every pixel repeated ``factor x factor`` times)."""
    if factor == 1:
        return x
    return x.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def pool(x: Tensor, factor: int) -> Tensor:
    """Average pooling over ``factor x factor`` blocks: undoes :func:`lift` exactly."""
    return x if factor == 1 else F.avg_pool2d(x, factor)


# ---------------------------------------------------------------------------------------------- swapped modules
def zero_(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to 0 (in place) and return it."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


class StageTimeEmbed(nn.Module):
    """Replaces ``time_text_embed``: the pretrained embedder (stage 1's time, guidance, pooled text) plus, per new
    stage, a timestep embedder (a copy of the pretrained one with its last linear zeroed) and a zero stage-index
    embedding of the main stage. Per-stage times (in the transformer's units) and main stages are stashed with
    :meth:`stash` before the transformer runs."""

    def __init__(self, base: nn.Module, num_stages: int) -> None:
        super().__init__()
        self.base = base
        self.stages = nn.ModuleList(copy.deepcopy(base.timestep_embedder) for _ in range(num_stages - 1))
        for embedder in self.stages:
            zero_(embedder.linear_2)
        dim = base.timestep_embedder.linear_2.out_features
        self.stage_embedding = zero_(nn.Embedding(num_stages, dim).to(base.timestep_embedder.linear_2.weight))
        self._timesteps: Tensor | None = None
        self._main_stage: Tensor | None = None

    def stash(self, timesteps: Tensor | None, main_stage: Tensor | None) -> None:
        """(B, S) per-stage timesteps in the transformer's units and (B,) main stages for the next forward."""
        self._timesteps, self._main_stage = timesteps, main_stage

    def forward(self, *args: Tensor) -> Tensor:
        if self._timesteps is None or self._main_stage is None:
            raise RuntimeError("per-stage times not set: call the DFM adapter, not its transformer directly")
        cond = self.base(*args)
        dtype = args[-1].dtype  # the pooled projection's, as diffusers casts the time features
        for s, embedder in enumerate(self.stages, start=1):
            cond = cond + embedder(self.base.time_proj(self._timesteps[:, s]).to(dtype))
        return cond + self.stage_embedding(self._main_stage).to(cond.dtype)


class StageNormOut(nn.Module):
    """Replaces ``norm_out``: every stage's final adaLN norm (stage 1 the pretrained one, the others copies), their
    outputs concatenated on the feature axis, (B, N, S * D), for :class:`StageHeads`-like ``proj_out`` wrappers."""

    def __init__(self, base: nn.Module, num_stages: int) -> None:
        super().__init__()
        self.base = base
        self.stages = nn.ModuleList(copy.deepcopy(base) for _ in range(num_stages - 1))

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return torch.cat([self.base(x, temb)] + [norm(x, temb) for norm in self.stages], dim=-1)


# ---------------------------------------------------------------------------------------------- helpers on modules
def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@contextlib.contextmanager
def swapped(root: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[None]:
    """Temporarily replace submodules of ``root`` (dotted names) and put the current ones back afterwards."""
    saved = {name: root.get_submodule(name) for name in replacements}
    try:
        for name, module in replacements.items():
            set_submodule(root, name, module)
        yield
    finally:
        for name, module in saved.items():
            set_submodule(root, name, module)


def fsdp_wrap_modules(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """Block classes to shard one by one with FSDP2 (``fully_shard`` on every instance, then on the root), taken
    from the diffusers transformer's ``_no_split_modules``. ``model``: a DFM adapter or a diffusers transformer."""
    transformer = getattr(model, "transformer", model)
    classes = block_classes(transformer)
    if not classes:
        raise ValueError(f"{type(transformer).__name__} names no block classes in _no_split_modules")
    return classes


def atomic_directory(target: Path) -> tuple[Path, Path]:
    """(temporary sibling directory to write into, backup name) for :func:`commit_directory`."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp, target.with_name(f".{target.name}.old-{os.getpid()}")


def commit_directory(tmp: Path, target: Path, old: Path) -> None:
    """Move the finished ``tmp`` to ``target`` (each rename atomic; a previous ``target`` is removed after)."""
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------- the adapter base
@dataclass(frozen=True)
class AdapterConfig:
    """Stage settings of a DFM adapter (saved as JSON next to the transformer)."""

    stage_factors: tuple[int, ...] = (2, 1)
    guidance: float | None = None  #: FLUX guidance-distilled input (None: the transformer has none)

    @property
    def num_stages(self) -> int:
        return len(self.stage_factors)


class StageAdapter(nn.Module):
    """Base class of the FLUX and SD3 DFM adapters; see :mod:`dfm.adapters` for the call contract.

    Subclasses set ``model_type`` and ``latent_channels``, install their wrappers in :meth:`_install`, list them in
    :meth:`_wrappers` and run the transformer in :meth:`_run` (returning per-stage outputs in diffusers' sign).
    """

    model_type: ClassVar[str] = ""

    def __init__(self, transformer: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        factors = tuple(int(f) for f in config.stage_factors)
        if not factors or factors[-1] != 1 or any(a <= b for a, b in zip(factors, factors[1:])):
            raise ValueError(f"stage_factors must decrease strictly to 1, e.g. (2, 1) or (1,), got {factors}")
        self.config = AdapterConfig(factors, config.guidance)
        self.transformer = transformer
        self.register_buffer("empty_prompt_embeds", None)
        self.register_buffer("empty_pooled", None)
        self.lora_settings: dict[str, Any] | None = None
        self._install()

    # -- contract attributes
    @property
    def num_stages(self) -> int:
        return self.config.num_stages

    @property
    def stage_factors(self) -> tuple[int, ...]:
        return self.config.stage_factors

    @property
    def latent_channels(self) -> int:
        raise NotImplementedError

    # -- hooks
    def _install(self) -> None:
        raise NotImplementedError

    def _wrappers(self) -> dict[str, nn.Module]:
        """Dotted name in the transformer -> the wrapper installed there (each has a ``base``)."""
        raise NotImplementedError

    def _run(self, levels: list[Tensor], sigma: Tensor, cond: TextCondition) -> list[Tensor]:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """0: text-conditioned, not class-conditional (what ``dfm sample`` checks before ``--classes``)."""
        return 0

    # -- text
    def null_condition(self, batch: int) -> TextCondition:
        """The empty prompt for a batch of ``batch``: the unconditional branch of classifier-free guidance."""
        if self.empty_prompt_embeds is None:
            raise ValueError("guidance needs the empty prompt's embedding: call set_empty_prompt(TextCondition)")
        return TextCondition(self.empty_prompt_embeds, self.empty_pooled).expand(batch)

    def set_empty_prompt(self, condition: TextCondition) -> None:
        """The embedding of the empty prompt (batch 1), used when the model is called with ``y=None``."""
        if condition.batch != 1:
            raise ValueError(f"the empty prompt is one condition (batch 1), got batch {condition.batch}")
        self.empty_prompt_embeds = condition.prompt_embeds.detach().clone()
        self.empty_pooled = condition.pooled.detach().clone()

    def _text(self, y: TextCondition | None, batch: int, dtype: torch.dtype, device: torch.device) -> TextCondition:
        if y is None:
            if self.empty_prompt_embeds is None:
                raise ValueError("y=None needs the empty prompt's embedding: call set_empty_prompt(TextCondition)")
            y = TextCondition(self.empty_prompt_embeds, self.empty_pooled)
        if not isinstance(y, TextCondition):
            raise TypeError(f"y must be a TextCondition (text embeddings) or None, got {type(y).__name__}")
        return y.expand(batch).to(device, dtype)

    # -- inputs
    def _check_levels(self, levels: Sequence[Tensor]) -> None:
        if len(levels) != self.num_stages:
            raise ValueError(f"got {len(levels)} levels, the model has {self.num_stages} stages")
        fine = levels[-1]
        c, size, multiple = self.latent_channels, tuple(fine.shape[-2:]), math.lcm(2, *self.stage_factors)
        if fine.ndim != 4 or any(n % multiple for n in size):
            raise ValueError(
                f"the finest level must be (B, {c}, H, W) with H and W divisible by {multiple} (2x2 patches of the "
                f"finest latent, stage factors {self.stage_factors}), got {tuple(fine.shape)}"
            )
        for s, (level, f) in enumerate(zip(levels, self.stage_factors)):
            expected = (fine.shape[0], c, size[0] // f, size[1] // f)
            if tuple(level.shape) != expected:
                raise ValueError(f"level {s} has shape {tuple(level.shape)}, expected {expected} ({c} latent channels)")

    def _mask(
        self, levels: Sequence[Tensor], t: Tensor, main_stage: Tensor | None
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        batch, device, count = levels[0].shape[0], levels[0].device, self.num_stages
        if tuple(t.shape) != (batch, count):
            raise ValueError(f"t has shape {tuple(t.shape)}, expected (batch, stages) = {(batch, count)}")
        if main_stage is None:
            main_stage = torch.full((batch,), count - 1, dtype=torch.long, device=device)
        active = torch.arange(count, device=device)[None, :] <= main_stage[:, None]  # (B, S)
        t = torch.where(active, t.float(), 0.0)
        levels = [torch.where(active[:, s, None, None, None], lv, 0.0) for s, lv in enumerate(levels)]
        return levels, t, main_stage

    # -- forward
    def forward(
        self,
        levels: Sequence[Tensor],
        t: Tensor,
        y: TextCondition | None = None,
        main_stage: Tensor | None = None,
    ) -> list[Tensor]:
        """One velocity per stage, coarse to fine, in our convention (t = 1 data, v = data - noise)."""
        self._check_levels(levels)
        levels, t, main_stage = self._mask(levels, t, main_stage)
        dtype, device = self.transformer.dtype, levels[0].device
        cond = self._text(y, levels[0].shape[0], dtype, device)
        sigma = 1.0 - t
        if self.num_stages == 1:  # the pretrained transformer as it is (plain Flow Matching fine-tuning)
            outputs = self._run([lv.to(dtype) for lv in levels], sigma, cond)
            return [-out.to(levels[0].dtype) for out in outputs]
        time_embed: StageTimeEmbed = self.transformer.time_text_embed
        time_embed.stash(sigma * 1000.0, main_stage)
        try:
            outputs = self._run([lv.to(dtype) for lv in levels], sigma, cond)
        finally:
            time_embed.stash(None, None)
        return [-out.to(levels[0].dtype) for out in outputs]

    # -- training helpers
    def stage_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of every new stage module (everything in the wrappers except their ``base``)."""
        for name, wrapper in self._wrappers().items():
            for key, param in wrapper.named_parameters():
                if not key.startswith("base."):
                    yield f"{name}.{key}", param

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the transformer blocks' activations in backward (diffusers' own checkpointing)."""
        self.transformer.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        self.transformer.disable_gradient_checkpointing()

    # -- training checkpoints
    def trainable_state_dict(self, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """What a training checkpoint holds of the model: the parameters that train (LoRA and the new stage
        modules; every parameter in a full fine-tune) and the empty prompt. The frozen weights come from the
        pretrained directory again. ``state``: a full state dict to take them from (FSDP's gathered one)."""
        state = self.state_dict() if state is None else state
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in state.items() if k in keep or k.startswith("empty_")}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load what :meth:`trainable_state_dict` gave; its trainable weights must all be there, and nothing else."""
        expected = {n for n, p in self.named_parameters() if p.requires_grad}
        got = set(state) - {"empty_prompt_embeds", "empty_pooled"}
        if got != expected:
            raise ValueError(f"it holds other weights than the trainable ones: missing {sorted(expected - got)[:3]}, "
                             f"unexpected {sorted(got - expected)[:3]}")  # fmt: skip
        state = dict(state)
        if "empty_pooled" in state:
            self.set_empty_prompt(TextCondition(state.pop("empty_prompt_embeds"), state.pop("empty_pooled")))
        self.load_state_dict(state, strict=False)

    # -- save / load
    def stage_state_dict(self) -> dict[str, Tensor]:
        """The new stage modules' weights and the empty prompt, for :data:`STAGE_WEIGHTS`."""
        state = {name: p.detach() for name, p in self.stage_parameters()}
        if self.empty_prompt_embeds is not None:
            state["empty_prompt_embeds"] = self.empty_prompt_embeds
            state["empty_pooled"] = self.empty_pooled
        return {k: v.contiguous().cpu() for k, v in state.items()}

    def load_stage_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = {name for name, _ in self.stage_parameters()}
        got = set(state) - {"empty_prompt_embeds", "empty_pooled"}
        if got != expected:
            raise ValueError(f"stage weights do not match: missing {sorted(expected - got)[:3]}, "
                             f"unexpected {sorted(got - expected)[:3]}")  # fmt: skip
        params = dict(self.stage_parameters())
        with torch.no_grad():
            for name in expected:
                params[name].copy_(state[name])
        if "empty_prompt_embeds" in state:
            self.set_empty_prompt(TextCondition(state["empty_prompt_embeds"], state["empty_pooled"]))

    def _plain_transformer(self) -> contextlib.AbstractContextManager[None]:
        """Context in which the transformer is a plain diffusers one: wrappers and LoRA layers swapped out."""
        plain = {name: wrapper.base for name, wrapper in self._wrappers().items()}
        for name, module in self.transformer.named_modules():
            if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
                plain[name] = module.get_base_layer()
        return swapped(self.transformer, plain)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``transformer/`` (diffusers ``save_pretrained`` of the plain transformer), the stage settings
        (:data:`ADAPTER_CONFIG`), the new stage modules (:data:`STAGE_WEIGHTS`) and any LoRA weights into a temporary
        sibling directory, then move it into place."""
        target = Path(directory)
        tmp, old = atomic_directory(target)
        try:
            self._write(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        commit_directory(tmp, target, old)
        return target

    def _write(self, path: Path) -> None:
        with self._plain_transformer():
            self.transformer.save_pretrained(path / TRANSFORMER_DIR)
        save_file(self.stage_state_dict(), path / STAGE_WEIGHTS, metadata={"format": "pt"})
        if self.lora_settings is not None:
            from peft.utils import get_peft_model_state_dict

            name = self.lora_settings["adapter_name"]
            lora = get_peft_model_state_dict(self.transformer, adapter_name=name)
            save_file({k: v.detach().contiguous().cpu() for k, v in lora.items()}, path / LORA_WEIGHTS)
        settings = {"model_type": self.model_type, "stage_factors": list(self.stage_factors),
                    "guidance": self.config.guidance, "lora": self.lora_settings}  # fmt: skip
        (path / ADAPTER_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")

    @classmethod
    def _transformer_class(cls) -> type[nn.Module]:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], torch_dtype: torch.dtype | None = None) -> StageAdapter:
        """Load an adapter written by :meth:`save_pretrained`."""
        path = Path(directory)
        if not (path / ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(
                f"{path / ADAPTER_CONFIG} not found: expected a directory written by save_pretrained"
            )
        settings = json.loads((path / ADAPTER_CONFIG).read_text())
        if settings.get("model_type") != cls.model_type:
            raise ValueError(f"{path / ADAPTER_CONFIG} is a {settings.get('model_type')!r}, not a {cls.model_type!r}")
        transformer = cls._transformer_class().from_pretrained(path / TRANSFORMER_DIR, torch_dtype=torch_dtype)
        adapter = cls(transformer, stage_factors=tuple(settings["stage_factors"]), guidance=settings.get("guidance"))
        adapter.load_stage_state_dict(load_file(path / STAGE_WEIGHTS))
        if settings.get("lora"):
            from peft import set_peft_model_state_dict

            lora = settings["lora"]
            add_lora(adapter, lora["rank"], lora["alpha"], lora["target_modules"], lora["adapter_name"])
            result = set_peft_model_state_dict(transformer, load_file(path / LORA_WEIGHTS), lora["adapter_name"])
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"LoRA weights do not match: unexpected {result.unexpected_keys[:3]}")
        return adapter
