"""DFM-DiT: a DiT that sees every level of a multi-scale decomposition at once (paper Sec. 3.3).

Compared with a standard DiT (Peebles & Xie, 2023) it has one patch embedding, one timestep embedder and one
output head per stage, and a stage-index embedding; everything else is shared. With one stage it *is* a
standard DiT (no stage embedding is created), which is the Flow Matching baseline.

Model contract (time convention of the package: t = 0 noise, t = 1 data)::

    model(levels_t, t, y, main_stage) -> velocities
    levels_t:   list of S tensors, coarse to fine, (B, C, H_s, W_s) or (B, C, T, H_s, W_s)
    t:          (B, S) float in [0, 1] ((B,) accepted when S = 1)
    y:          (B,) long class labels, or None for the null class (unconditional branch of guidance)
    main_stage: (B,) long, 0-based; stages s > main_stage are inactive: their inputs and timesteps are
                replaced by 0 before use, so they have no effect on any output. None = last stage.

The outputs are the network's, F: a run trained with preconditioning (``method.precondition``, on in every preset)
samples through :class:`dfm.models.precondition.Preconditioned`, which its method adds (``dfm.Run`` and
``DFMPipeline`` do it for you).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dfm.models.config import DiTConfig
from dfm.models.layers import (
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    StageLinear,
    TimestepEmbedder,
    overlap_unpatchify,
    overlaps,
    patchify,
    unpatchify,
)
from dfm.models.positions import rope_tables, sincos_embedding

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "dfm-dit"


class DFMDiT(nn.Module):
    """The DFM-DiT backbone; see the module docstring for the call contract.

    Example:
        >>> import torch
        >>> from dfm.models import DFMDiT, DiTConfig
        >>> cfg = DiTConfig(input_size=(32, 32), in_channels=1, patch_size=4, hidden_size=64, depth=2,
        ...                 num_heads=2, num_classes=10)
        >>> model = DFMDiT(cfg)
        >>> levels = [torch.randn(2, 1, 16, 16), torch.randn(2, 1, 32, 32)]
        >>> out = model(levels, torch.rand(2, 2), torch.tensor([3, 10]), torch.tensor([0, 1]))
        >>> [tuple(o.shape) for o in out], float(out[1].detach().abs().max())  # zero-initialised heads
        ([(2, 1, 16, 16), (2, 1, 32, 32)], 0.0)
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        d, s_count, c = config.hidden_size, config.num_stages, config.in_channels
        patches = [config.stage_patch_size(s) for s in range(s_count)]

        self.x_embedders = nn.ModuleList(nn.Linear(c * p * p, d) for p in patches)
        self.t_embedders = nn.ModuleList(TimestepEmbedder(d) for _ in range(s_count))
        self.y_embedder = LabelEmbedder(config.num_classes, d)
        # A stage embedding in a one-stage model would be a constant bias on c: leave it out so that S = 1
        # is exactly a standard DiT.
        self.stage_embedder = nn.Embedding(s_count, d) if config.use_stage_embedding and s_count > 1 else None
        self.blocks = nn.ModuleList(
            DiTBlock(d, config.num_heads, config.mlp_ratio, config.specialise, s_count) for _ in range(config.depth)
        )
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        # Per stage: how the head's token outputs become the level (overlapping windows, or patches side by side).
        overlapping = [config.head_overlap and overlaps(p) for p in patches]
        overlap = functools.partial(overlap_unpatchify, border=config.head_border)
        self._rebuild = [overlap if o else unpatchify for o in overlapping]
        self.final_layers = nn.ModuleList(FinalLayer(d, 2 * p if o else p, c) for p, o in zip(patches, overlapping))

        # Positions are fixed functions of the token grid: non-persistent buffers, not weights.
        if config.pos == "rope":
            cos, sin = rope_tables(config.token_grid, config.head_dim, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.register_buffer("pos_embed", sincos_embedding(config.token_grid, d), persistent=False)
        self.initialize_weights()

    # ------------------------------------------------------------------ properties of the contract
    @property
    def num_stages(self) -> int:
        return self.config.num_stages

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, N(0, 0.02) embeddings, adaLN-Zero and zero output heads.

        With zero adaLN modulations every block is the identity and the zero heads make a fresh model output
        exactly 0 (and a preconditioned one exactly c_skip * x).
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.y_embedder.embedding.weight, std=0.02)
        if self.stage_embedder is not None:
            nn.init.normal_(self.stage_embedder.weight, std=0.02)
        for embedder in self.t_embedders:
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation.weight)
            nn.init.zeros_(block.adaLN_modulation.bias)
        for head in self.final_layers:
            for layer in (head.adaLN_modulation[-1], head.linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        for module in self.modules():
            if isinstance(module, StageLinear):
                module.reset_experts()

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, levels: Sequence[Tensor], t: Tensor) -> Tensor:
        cfg = self.config
        if len(levels) != cfg.num_stages:
            raise ValueError(f"got {len(levels)} levels, the model has {cfg.num_stages} stages")
        batch = levels[0].shape[0]
        for s, level in enumerate(levels):
            expected = (batch, cfg.in_channels, *cfg.stage_input_size(s))
            if tuple(level.shape) != expected:
                raise ValueError(f"level {s} has shape {tuple(level.shape)}, expected {expected}")
        if t.ndim == 1 and cfg.num_stages == 1:
            t = t[:, None]
        if tuple(t.shape) != (batch, cfg.num_stages):
            raise ValueError(f"t has shape {tuple(t.shape)}, expected (batch, stages) = {(batch, cfg.num_stages)}")
        return t

    def forward(
        self,
        levels: Sequence[Tensor],
        t: Tensor,
        y: Tensor | None = None,
        main_stage: Tensor | None = None,
    ) -> list[Tensor]:
        """Predict one velocity per stage: v_s = G_s(X^t_1..X^t_S, t_1..t_S, y, main stage)."""
        cfg = self.config
        t = self._check_inputs(levels, t).float()
        batch, device = t.shape[0], t.device
        stages = torch.arange(cfg.num_stages, device=device)
        if main_stage is None:
            main_stage = torch.full((batch,), cfg.num_stages - 1, dtype=torch.long, device=device)
        active = stages[None, :] <= main_stage[:, None]  # (B, S)
        t = torch.where(active, t, 0.0)
        expert_mask = stages[None, :] == main_stage[:, None] if cfg.specialise != "none" else None

        cond = self.y_embedder(y, batch, device)  # (B, D) adaLN conditioning vector
        if self.stage_embedder is not None:
            cond = cond + self.stage_embedder(main_stage)
        embeddings = []
        for s, level in enumerate(levels):
            per_sample = (-1,) + (1,) * (level.ndim - 1)  # broadcast (B,) over a level
            x = torch.where(active[:, s].view(per_sample), level, 0.0)
            embeddings.append(self.x_embedders[s](patchify(x, cfg.stage_patch_size(s))))  # (B, N, D)
            cond = cond + self.t_embedders[s](t[:, s])
        tokens = sum(embeddings[1:], embeddings[0])  # the stages' token embeddings are summed

        rope = None
        if cfg.pos == "rope":
            rope = (self.rope_cos, self.rope_sin)
        else:
            tokens = tokens + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens, cond, rope, expert_mask)  # (B, N, D)

        tokens = self.norm_final(tokens)
        outputs = []
        for s, head in enumerate(self.final_layers):
            patch = cfg.stage_patch_size(s)
            outputs.append(self._rebuild[s](head(tokens, cond), cfg.stage_input_size(s), cfg.in_channels, patch))
        return outputs

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (no pickle) into ``directory``."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        # Write to temporary names first so that an interrupted save never leaves a half-written pair.
        tmp_weights, tmp_config = path / (WEIGHTS_NAME + ".tmp"), path / (CONFIG_NAME + ".tmp")
        save_file(state, tmp_weights, metadata={"format": "pt", "model_type": MODEL_TYPE})
        tmp_config.write_text(json.dumps({"model_type": MODEL_TYPE, **self.config.to_dict()}, indent=2) + "\n")
        os.replace(tmp_weights, path / WEIGHTS_NAME)
        os.replace(tmp_config, path / CONFIG_NAME)
        return path

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], device: str | torch.device = "cpu", format1: bool = False
    ) -> DFMDiT:
        """Load a model written by :meth:`save_pretrained`; mismatching weights raise a ValueError.

        ``format1``: a directory written before the preconditioning left the network, read as the network alone
        (:class:`dfm.Run` does this and adds the wrapper its config recorded)."""
        path = Path(directory)
        config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        for file in (config_file, weights_file):
            if not file.is_file():
                raise FileNotFoundError(f"{file} not found: expected a directory written by save_pretrained")
        data = json.loads(config_file.read_text())
        model_type = data.pop("model_type", None)
        if model_type != MODEL_TYPE:
            raise ValueError(f"{config_file} has model_type={model_type!r}, expected {MODEL_TYPE!r}")
        if format1:
            data = {k: v for k, v in data.items() if k not in ("precondition", "data_std")}
        model = cls(DiTConfig.from_dict(data))
        state = load_file(weights_file)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [
            f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or wrong:
            problems = [
                f"{name}: {items[:3]}{' ...' if len(items) > 3 else ''}"
                for name, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
                if items
            ]
            raise ValueError(
                f"weights {weights_file} do not match the config {config_file} ({'; '.join(problems)}); "
                "the config was edited or the files come from different models"
            )
        model.load_state_dict(state)
        return model.to(device)
