"""Stable Diffusion 3 (diffusers ``SD3Transformer2DModel``) as a multi-stage DFM.

SD3 embeds a (B, 16, H, W) latent with ``pos_embed`` (a patch-2 Conv2d plus cropped sin-cos positions), maps
tokens back with ``norm_out`` / ``proj_out`` (Linear D -> 2 * 2 * out_channels) and unpatchifies them itself with
``self.out_channels``. Its time input is ``sigma * 1000`` (not scaled inside), it has no guidance embedder, and it
predicts ``noise - x0``.

Conversion, for any stage factors (default (2, 1)): every level is lifted (nearest neighbour) to the full latent
resolution and the lifted levels are concatenated on channels, (B, S * 16, H, W).

- ``pos_embed.proj`` -> :class:`SD3StagePatchEmbed`: one patch-2 Conv2d per stage over its 16 channels, summed;
  the coarsest stage's is the pretrained Conv2d, so it embeds the lifted coarse level exactly as the pretrained
  model would; new stages' convolutions start at zero. The sin-cos positions are added by ``pos_embed`` as before.
- ``proj_out`` -> :class:`SD3StageHead`: one head per stage (the coarsest the pretrained one, the others zero),
  their outputs interleaved so that SD3's own unpatchify (with ``out_channels = S * 16``) yields (B, S * 16, H, W);
  the adapter splits the channels and average-pools stage s by its factor, which undoes the nearest lift exactly.
- ``time_text_embed`` / ``norm_out`` -> :class:`~dfm.adapters.common.StageTimeEmbed` /
  :class:`~dfm.adapters.common.StageNormOut`.

At initialisation the coarsest velocity is ``-pool(F(lift(coarse)))`` with ``F`` the pretrained SD3 (the same
arithmetic, plus additions of exact zeros), and every new stage's velocity is 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dfm.adapters.common import (
    AdapterConfig,
    StageAdapter,
    StageNormOut,
    StageTimeEmbed,
    TextCondition,
    lift,
    pool,
    zero_,
)


class SD3StagePatchEmbed(nn.Module):
    """``pos_embed.proj`` of the converted model: the channel-concatenated lifted levels, one Conv2d per stage,
    summed (stage 1's the pretrained one)."""

    def __init__(self, base: nn.Conv2d, num_stages: int) -> None:
        super().__init__()
        self.base = base
        kernel, stride = base.kernel_size, base.stride
        self.stages = nn.ModuleList(
            zero_(nn.Conv2d(base.in_channels, base.out_channels, kernel, stride)).to(base.weight)
            for _ in range(num_stages - 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        parts = x.chunk(len(self.stages) + 1, dim=1)
        out = self.base(parts[0])
        for part, conv in zip(parts[1:], self.stages):
            out = out + conv(part)
        return out


class SD3StageHead(nn.Module):
    """``proj_out`` of the converted model: the (B, N, S * D) output of :class:`StageNormOut` split per stage, each
    stage's head applied, and the outputs laid out as (patch row, patch column, stage, channel) per token, which is
    SD3's unpatchify order for ``S * C`` output channels."""

    def __init__(self, base: nn.Linear, num_stages: int, patch: int) -> None:
        super().__init__()
        self.base, self.patch = base, patch
        self.stages = nn.ModuleList(
            zero_(nn.Linear(base.in_features, base.out_features)).to(base.weight) for _ in range(num_stages - 1)
        )

    def forward(self, hidden: Tensor) -> Tensor:
        parts = hidden.chunk(len(self.stages) + 1, dim=-1)
        outs = [self.base(parts[0])] + [head(part) for part, head in zip(parts[1:], self.stages)]
        b, n, _ = outs[0].shape
        stacked = torch.stack([o.reshape(b, n, self.patch * self.patch, -1) for o in outs], dim=-2)
        return stacked.reshape(b, n, -1)


class SD3DFMAdapter(StageAdapter):
    """A diffusers ``SD3Transformer2DModel`` converted to a DFM (see the module docstring).

    ``model(levels_t, t, y=None, main_stage=None) -> velocities``: levels (B, 16, H / f_s, W / f_s) coarse to
    fine, ``t`` (B, S) with t = 1 data, ``y`` a :class:`~dfm.adapters.common.TextCondition` or None for the empty
    prompt. The transformer is modified in place.
    """

    model_type = "dfm-sd3-adapter"

    def __init__(
        self, transformer: nn.Module, stage_factors: Sequence[int] = (2, 1), guidance: float | None = None
    ) -> None:
        if guidance is not None:
            raise ValueError("SD3 has no guidance embedder: leave guidance=None")
        if transformer.config.out_channels != transformer.config.in_channels:
            raise ValueError("expected an SD3 transformer whose output has its input's channels")
        super().__init__(transformer, AdapterConfig(tuple(stage_factors), None))

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @classmethod
    def _transformer_class(cls) -> type[nn.Module]:
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def _install(self) -> None:
        if self.num_stages == 1:  # one stage: the pretrained transformer unchanged
            return
        t, s = self.transformer, self.num_stages
        t.pos_embed.proj = SD3StagePatchEmbed(t.pos_embed.proj, s)
        t.time_text_embed = StageTimeEmbed(t.time_text_embed, s)
        t.norm_out = StageNormOut(t.norm_out, s)
        t.proj_out = SD3StageHead(t.proj_out, s, t.config.patch_size)
        t.out_channels = s * self.latent_channels  # SD3's unpatchify reads this attribute (not its config)

    def _wrappers(self) -> dict[str, nn.Module]:
        if self.num_stages == 1:
            return {}
        t = self.transformer
        return {"pos_embed.proj": t.pos_embed.proj, "time_text_embed": t.time_text_embed, "norm_out": t.norm_out,
                "proj_out": t.proj_out}  # fmt: skip

    def _run(self, levels: list[Tensor], sigma: Tensor, cond: TextCondition) -> list[Tensor]:
        x = torch.cat([lift(lv, f) for lv, f in zip(levels, self.stage_factors)], dim=1)
        out = self.transformer(
            hidden_states=x,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled,
            timestep=(sigma[:, 0] * 1000.0).to(x.dtype),
            return_dict=False,
        )[0]
        return [pool(part, f) for part, f in zip(out.chunk(self.num_stages, dim=1), self.stage_factors)]
