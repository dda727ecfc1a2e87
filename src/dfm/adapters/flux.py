"""FLUX (diffusers ``FluxTransformer2DModel``) as a two-stage DFM.

FLUX packs the (B, 16, H, W) latent into 2x2 patches, i.e. (H/2 * W/2) tokens of 64 features ordered (channel, row,
column), embeds them with ``x_embedder`` (Linear 64 -> D), places them with RoPE ids ``(0, row, column)`` and maps
tokens back with ``proj_out`` (Linear D -> 64). Its time input is ``sigma`` (multiplied by 1000 inside, as is the
guidance input of guidance-distilled models) and it predicts ``noise - x0``.

Conversion (stage factors (2, 1): the coarse level is H/2 x W/2, one coarse pixel per token):

- ``x_embedder`` -> :class:`FluxStageEmbed`. The tokens are ``[coarse pixel (16) | fine 2x2 patch (64)]``. The
  coarse stage embeds its pixel with the pretrained weights summed over each 2x2 block: the pretrained embedding of
  the nearest-neighbour lift of the coarse level (whose 2x2 patches repeat one pixel) is exactly that sum. The fine
  stage has a new zero Linear(64, D).
- ``proj_out`` -> :class:`FluxStageHead`. The coarse output is the pretrained head with its rows averaged over each
  2x2 block, i.e. the pretrained output average-pooled (which undoes the nearest lift); the fine stage has a new zero
  Linear(D, 64).
- ``time_text_embed`` and ``norm_out`` -> :class:`~dfm.adapters.common.StageTimeEmbed` /
  :class:`~dfm.adapters.common.StageNormOut` (new time embedder with zero last linear, zero stage embedding, copy
  of the final adaLN norm).

Both weight operations are done on the fly from the kept pretrained modules, so the pretrained parameters stay
where diffusers expects them (LoRA, saving). At initialisation the coarse velocity is ``-pool(F(lift(coarse)))``
(``F`` the pretrained FLUX, up to float rounding of the weight sums) and the fine velocity is 0.

Stage factors other than (2, 1) would need patches smaller than one latent pixel at the coarse stage: not
supported (SD3's adapter, which lifts instead, supports any factors). ``stage_factors=(1,)`` is the one-stage case
(any adapter): no module is swapped, the transformer is used as it is in our time and sign convention (plain Flow
Matching fine-tuning, the paper's baseline).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfm.adapters.common import (
    AdapterConfig,
    StageAdapter,
    StageNormOut,
    StageTimeEmbed,
    TextCondition,
    flux_image_ids,
    pack,
    unpack,
    zero_,
)
from dfm.models.surgery import lift_patch_embedding, pool_head

PACK = 2  #: FLUX's 2x2 latent packing, the pretrained patch size


class FluxStageEmbed(nn.Module):
    """``x_embedder`` of the converted model: per-token features ``[stage 1 | stage 2 | ...]``, each stage's patch
    embedded and the embeddings summed (stage 1 from the pretrained weights summed over each lift block)."""

    def __init__(self, base: nn.Linear, channels: int, patches: Sequence[int]) -> None:
        super().__init__()
        self.base, self.channels, self.patches = base, channels, tuple(patches)
        self.stages = nn.ModuleList(
            zero_(nn.Linear(channels * p * p, base.out_features)).to(base.weight) for p in self.patches[1:]
        )

    def forward(self, tokens: Tensor) -> Tensor:
        parts = tokens.split([self.channels * p * p for p in self.patches], dim=-1)
        weight = lift_patch_embedding(self.base.weight, self.channels, PACK, PACK // self.patches[0])
        out = F.linear(parts[0], weight, self.base.bias)
        for part, layer in zip(parts[1:], self.stages):
            out = out + layer(part)
        return out


class FluxStageHead(nn.Module):
    """``proj_out`` of the converted model: the (B, N, S * D) output of :class:`StageNormOut` split per stage and
    mapped by each stage's head; outputs concatenated per token (stage 1's from the pooled pretrained rows)."""

    def __init__(self, base: nn.Linear, channels: int, patches: Sequence[int]) -> None:
        super().__init__()
        self.base, self.channels, self.patches = base, channels, tuple(patches)
        self.stages = nn.ModuleList(
            zero_(nn.Linear(base.in_features, channels * p * p)).to(base.weight) for p in self.patches[1:]
        )

    def forward(self, hidden: Tensor) -> Tensor:
        parts = hidden.chunk(len(self.patches), dim=-1)
        factor = PACK // self.patches[0]
        weight = pool_head(self.base.weight, self.channels, PACK, factor)
        bias = pool_head(self.base.bias, self.channels, PACK, factor)
        outs = [F.linear(parts[0], weight, bias)] + [layer(part) for part, layer in zip(parts[1:], self.stages)]
        return torch.cat(outs, dim=-1)


class FluxDFMAdapter(StageAdapter):
    """A diffusers ``FluxTransformer2DModel`` converted to a DFM (see the module docstring).

    ``model(levels_t, t, y=None, main_stage=None) -> velocities``: levels (B, 16, H/2, W/2) and (B, 16, H, W),
    ``t`` (B, 2) with t = 1 data, ``y`` a :class:`~dfm.adapters.common.TextCondition` (T5 ``prompt_embeds``, CLIP
    ``pooled``) or None for the empty prompt. ``guidance``: the guidance-distilled input (FLUX-dev), None for
    models without a guidance embedder. The transformer is modified in place.
    """

    model_type = "dfm-flux-adapter"

    def __init__(
        self, transformer: nn.Module, stage_factors: Sequence[int] = (2, 1), guidance: float | None = 1.0
    ) -> None:
        cfg = transformer.config
        if cfg.patch_size != 1 or cfg.in_channels % (PACK * PACK):
            raise ValueError("expected a FLUX transformer over 2x2-packed latents (patch_size 1, in_channels 4 C)")
        if tuple(stage_factors) not in ((PACK, 1), (1,)):
            raise ValueError(
                f"FLUX stage factors must be (2, 1) (one coarse pixel per 2x2 token) or (1,) (one stage), "
                f"got {stage_factors}"
            )
        guidance = float(guidance) if cfg.guidance_embeds and guidance is not None else None
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("this FLUX has a guidance embedder: give a guidance value (1.0 for training)")
        super().__init__(transformer, AdapterConfig(tuple(stage_factors), guidance))

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // (PACK * PACK)

    @property
    def patches(self) -> tuple[int, ...]:
        """Patch size of every stage on its own level (1 for the coarse, 2 for the fine stage)."""
        return tuple(PACK // f for f in self.stage_factors)

    @classmethod
    def _transformer_class(cls) -> type[nn.Module]:
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def _install(self) -> None:
        if self.num_stages == 1:  # one stage: the pretrained transformer unchanged
            return
        t, c, s = self.transformer, self.latent_channels, self.num_stages
        t.x_embedder = FluxStageEmbed(t.x_embedder, c, self.patches)
        t.time_text_embed = StageTimeEmbed(t.time_text_embed, s)
        t.norm_out = StageNormOut(t.norm_out, s)
        t.proj_out = FluxStageHead(t.proj_out, c, self.patches)

    def _wrappers(self) -> dict[str, nn.Module]:
        if self.num_stages == 1:
            return {}
        t = self.transformer
        return {"x_embedder": t.x_embedder, "time_text_embed": t.time_text_embed, "norm_out": t.norm_out,
                "proj_out": t.proj_out}  # fmt: skip

    def _run(self, levels: list[Tensor], sigma: Tensor, cond: TextCondition) -> list[Tensor]:
        b, _, h, w = levels[-1].shape
        tokens = torch.cat([pack(lv, p) for lv, p in zip(levels, self.patches)], dim=-1)
        dtype, device = tokens.dtype, tokens.device
        guidance = None
        if self.config.guidance is not None:
            guidance = torch.full((b,), self.config.guidance, device=device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled,
            timestep=sigma[:, 0].to(dtype),
            img_ids=flux_image_ids(h // PACK, w // PACK, device, dtype),
            txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=device, dtype=dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        parts = out.split([self.latent_channels * p * p for p in self.patches], dim=-1)
        return [unpack(part, p, lv.shape[-2:]) for part, p, lv in zip(parts, self.patches, levels)]
