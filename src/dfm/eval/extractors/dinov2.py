"""DINOv2 ViT-L/14 for the Fréchet DINOv2 distance (FDD), as in dgm-eval (Stein et al., 2023).

Parameter names match the published `dinov2_vitl14_pretrain.pth` (blocks not chunked), so it loads
with `strict=True`. The network is a pre-norm ViT with LayerScale:

    x = x + ls1 * attn(norm1(x)) ;  x = x + ls2 * mlp(norm2(x))

The position embedding is stored for a 37x37 patch grid (518 px) and bicubically resized to the
input grid. The feature is the final-norm CLS token (1024-d for ViT-L).
Preprocessing (dgm-eval, which resizes PIL images): PIL-like bicubic resize to 224x224, ImageNet
mean/std normalisation.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..weights import WeightsSpec, load_into, resolve_weights, sha256_file
from .base import IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor, FeatureOutput, Preprocessing, register_extractor

__all__ = ["DinoV2", "DINOV2_WEIGHTS"]

DINOV2_WEIGHTS = WeightsSpec(
    filename="dinov2_vitl14_pretrain.pth",
    url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
    env_var="DFM_DINOV2_WEIGHTS",
)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, D/H)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(FeatureExtractor):
    """DINOv2 ViT backbone returning the normalised CLS token. Defaults are ViT-L/14 at 224 px.

    `depth` (and the other sizes) can be reduced to test the same code quickly with random weights.
    """

    name = "dinov2-vitl14"
    preprocessing = Preprocessing(
        size=224, interpolation="bicubic", antialias=True, mean=IMAGENET_MEAN, std=IMAGENET_STD, pil_like=True
    )

    def __init__(
        self, dim: int = 1024, depth: int = 24, heads: int = 16, patch_size: int = 14, pretrain_grid: int = 37
    ) -> None:
        super().__init__()
        self.feature_dim = dim
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid**2, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # unused at inference, kept for strict loading
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def interpolate_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embedding for a grid_h x grid_w patch grid (bicubic resize of the stored grid)."""
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = int(math.sqrt(patch_pos.shape[1]))
        if (grid_h, grid_w) == (side, side):
            return self.pos_embed
        grid = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        # As in the DINOv2 code: a scale factor with a 0.1 offset (not a target size), which sets
        # the sampling positions; the output size is still grid_h x grid_w.
        scale = ((grid_h + 0.1) / side, (grid_w + 0.1) / side)
        grid = F.interpolate(grid.float(), scale_factor=scale, mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)], dim=1)

    def features_and_logits(self, x: torch.Tensor) -> FeatureOutput:
        patch = self.patch_embed.proj.kernel_size[0]
        tokens = self.patch_embed(x)  # (N, T, D)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_embed(x.shape[-2] // patch, x.shape[-1] // patch)
        for block in self.blocks:
            tokens = block(tokens)
        return FeatureOutput(self.norm(tokens)[:, 0])  # (N, D)


@register_extractor("dinov2-vitl14", "DINOv2 ViT-L/14 CLS token (FDD, dgm-eval protocol)", DINOV2_WEIGHTS.env_var)
def build_dinov2_vitl14(weights: str | Path | None = None, download: bool = True) -> DinoV2:
    path = resolve_weights("dinov2-vitl14", DINOV2_WEIGHTS, weights, download)
    model = DinoV2()
    load_into(model, path, "dinov2-vitl14")
    model.weights_path, model.weights_sha256 = str(path), sha256_file(path)
    return model
