"""The stage-2 network of the cascaded baseline: a one-stage DiT that also sees a conditioning image.

The conditioning image (the upsampled, noised stage-1 result) goes through its own patch embedding; its tokens
are **concatenated** with the tokens of the noisy input, so the transformer runs on 2N tokens, and only the N
generated tokens reach the output head (method.md section 7). Conditioning token i sits at the same grid
position as generated token i: both halves get the same RoPE angles (or the same sin-cos table), so attention
can align a pixel with its own conditioning. The conditioning level t_c (cond = t_c · low + (1 - t_c) · ε) has
its own timestep embedder, added to the adaLN conditioning vector like the other embeddings.

Everything else is the :class:`~dfm.models.DFMDiT` with one stage, so ``save_pretrained``/``from_pretrained`` and
the initialisation are inherited (the saved config is a plain one-stage ``DiTConfig``).

Call contract::

    model(x_t, t, y, cond, cond_t) -> velocity (B, C, *input_size)
    x_t, cond: (B, C, *input_size);  t, cond_t: (B,) in [0, 1];  y: (B,) labels or None (null class)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfm.models.config import DiTConfig
from dfm.models.dit import DFMDiT
from dfm.models.layers import TimestepEmbedder, patchify, unpatchify


class ConditionedDiT(DFMDiT):
    """A one-stage DFM-DiT with concatenated conditioning-image tokens (the cascade's stage 2).

    Example:
        >>> import torch
        >>> from dfm.models import DiTConfig
        >>> cfg = DiTConfig(input_size=(16, 16), in_channels=1, patch_size=2, hidden_size=32, depth=1,
        ...                 num_heads=2, num_classes=3, stage_factors=(1,))
        >>> model = ConditionedDiT(cfg)
        >>> x = torch.randn(2, 1, 16, 16)
        >>> model(x, torch.rand(2), torch.tensor([0, 3]), torch.randn(2, 1, 16, 16), torch.rand(2)).shape
        torch.Size([2, 1, 16, 16])
    """

    def __init__(self, config: DiTConfig) -> None:
        if config.num_stages != 1:
            raise ValueError(f"the cascade's stage-2 model has one stage, got stage_factors={config.stage_factors}")
        super().__init__(config)
        d, p, c = config.hidden_size, config.patch_size, config.in_channels
        self.cond_embedder = nn.Linear(c * p * p, d)
        self.cond_t_embedder = TimestepEmbedder(d)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The DiT initialisation, plus the conditioning embedders initialised like their input counterparts."""
        super().initialize_weights()
        if hasattr(self, "cond_t_embedder"):  # absent while DFMDiT.__init__ runs
            nn.init.normal_(self.cond_t_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.cond_t_embedder.mlp[2].weight, std=0.02)

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        cond: Tensor | None = None,
        cond_t: Tensor | None = None,
    ) -> Tensor:
        """Predict the velocity of ``x`` given the conditioning image ``cond`` at level ``cond_t``."""
        cfg = self.config
        batch = x.shape[0]
        expected = (batch, cfg.in_channels, *cfg.input_size)
        if tuple(x.shape) != expected:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected {expected}")
        if cond is None or cond_t is None:
            raise ValueError("the cascade's stage-2 model needs the conditioning image and its level cond_t")
        if tuple(cond.shape) != expected:
            raise ValueError(f"cond has shape {tuple(cond.shape)}, expected the upsampled size {expected}")
        t, cond_t = t.reshape(batch).float(), cond_t.reshape(batch).float()
        p = cfg.patch_size
        c = self.y_embedder(y, batch, x.device) + self.t_embedders[0](t) + self.cond_t_embedder(cond_t)  # (B, D)

        tokens = self.x_embedders[0](patchify(x, p))  # (B, N, D)
        cond_tokens = self.cond_embedder(patchify(cond, p))  # (B, N, D)
        n = tokens.shape[1]

        rope = None
        if cfg.pos == "rope":
            rope = (torch.cat([self.rope_cos, self.rope_cos]), torch.cat([self.rope_sin, self.rope_sin]))
        else:
            tokens, cond_tokens = tokens + self.pos_embed, cond_tokens + self.pos_embed
        seq = torch.cat([tokens, cond_tokens], dim=1)  # (B, 2N, D)
        expert_mask = torch.ones(batch, 1, dtype=torch.bool, device=x.device) if cfg.specialise != "none" else None
        for block in self.blocks:
            seq = block(seq, c, rope, expert_mask)  # (B, 2N, D)

        # Only the generated tokens reach the head; the conditioning tokens have done their work in attention.
        out = self.final_layers[0](self.norm_final(seq[:, :n]), c)  # (B, N, p² C)
        return unpatchify(out, cfg.input_size, cfg.in_channels, p)
