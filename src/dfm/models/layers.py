"""Building blocks of the DFM-DiT: patchify, embedders, adaLN-Zero blocks and output heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfm.models.config import HEAD_BORDERS
from dfm.models.positions import apply_rope

#################################################################################
#                              Patchify / unpatchify                            #
#################################################################################


def patchify(x: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) or (B, C, T, H, W) -> (B, N, C * patch^2), tokens row-major over (T, h, w).

    Video frames are patchified independently (patch 1 x p x p) and their tokens concatenated over time.
    """
    video = x.ndim == 5
    if not video:
        x = x.unsqueeze(2)
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 3, 5, 1, 4, 6)  # (B, T, h, w, C, p, p)
    return x.reshape(b, t * (h // patch) * (w // patch), c * patch * patch)


def unpatchify(x: Tensor, size: tuple[int, ...], channels: int, patch: int) -> Tensor:
    """Inverse of :func:`patchify`: (B, N, C * patch^2) -> (B, C, *size) with size (H, W) or (T, H, W)."""
    t = size[0] if len(size) == 3 else 1
    h, w = size[-2] // patch, size[-1] // patch
    b = x.shape[0]
    x = x.reshape(b, t, h, w, channels, patch, patch)
    x = x.permute(0, 4, 1, 2, 5, 3, 6)  # (B, C, T, h, p, w, p)
    x = x.reshape(b, channels, t, h * patch, w * patch)
    return x if len(size) == 3 else x.squeeze(2)


def overlaps(patch: int) -> bool:
    """Whether a stage with this patch size gets the overlapping head (an even patch: the window is 2p wide)."""
    return patch >= 2 and patch % 2 == 0


def tent_window(patch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """(2p, 2p) separable tent ``w(i) w(j)``, ``w(i) = (i + 1/2) / p`` rising then falling: windows placed every p
    pixels sum to 1 (``w(i) + w(i + p) = 1``)."""
    i = torch.arange(2 * patch, device=device, dtype=dtype) + 0.5
    w = torch.minimum(i, 2 * patch - i) / patch
    return w[:, None] * w[None, :]


def _fold_back(canvas: Tensor, margin: int) -> Tensor:
    """Add the ``margin`` outer rows and columns of ``canvas`` (..., H + 2m, W + 2m) onto the image inside,
    mirrored at its border, and return the image (..., H, W)."""
    m = margin
    inner = canvas[..., m:-m, :].clone()
    inner[..., :m, :] += canvas[..., :m, :].flip(-2)
    inner[..., -m:, :] += canvas[..., -m:, :].flip(-2)
    out = inner[..., m:-m].clone()
    out[..., :m] += inner[..., :m].flip(-1)
    out[..., -m:] += inner[..., -m:].flip(-1)
    return out


def overlap_unpatchify(x: Tensor, size: tuple[int, ...], channels: int, patch: int, border: str = "crop") -> Tensor:
    """(B, N, C * (2p)^2) -> (B, C, *size): each token's 2p x 2p window, centred on its patch, weighted by
    :func:`tent_window` and summed with its neighbours' (divided by the windows' sum, which is 1 away from the
    image border; ``border``: :data:`HEAD_BORDERS`). Videos: frame by frame."""
    if border not in HEAD_BORDERS:
        raise ValueError(f"border={border!r}: choose one of {', '.join(HEAD_BORDERS)}")
    t = size[0] if len(size) == 3 else 1
    h, w = size[-2] // patch, size[-1] // patch
    b, k, m = x.shape[0], 2 * patch, patch // 2
    x = x.reshape(b * t, h * w, channels, k, k) * tent_window(patch, x.device, x.dtype)
    x = x.reshape(b * t, h * w, channels * k * k).transpose(1, 2)  # (B t, C k k, L): F.fold's layout
    if border == "crop":
        fold = dict(output_size=size[-2:], kernel_size=k, stride=patch, padding=m)
        windows = tent_window(patch, x.device, x.dtype).reshape(1, k * k, 1).expand(1, k * k, h * w)
        out = F.fold(x, **fold) / F.fold(windows, **fold)  # divided by the windows' sum at every pixel
    else:  # fold onto the image with its margin of half a patch, then fold the margin back in: the weights sum to 1
        out = _fold_back(F.fold(x, (size[-2] + 2 * m, size[-1] + 2 * m), kernel_size=k, stride=patch), m)
    out = out.reshape(b, t, channels, *size[-2:]).transpose(1, 2)
    return out if len(size) == 3 else out.squeeze(2)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, with (B, D) modulations broadcast over the tokens of x (B, N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                                   Embedders                                   #
#################################################################################


class TimestepEmbedder(nn.Module):
    """e(t) = MLP([cos(s t w_k), sin(s t w_k)]_k), w_k = 10000^(-k / (F/2)), s = ``time_scale``.

    t lies in [0, 1]; ``time_scale`` = 1000 spreads it over the range the DiT frequencies were designed for.
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256, time_scale: float = 1000.0) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.time_scale = time_scale
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def sinusoidal(self, t: Tensor) -> Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = self.time_scale * t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:  # (B,) -> (B, D)
        return self.mlp(self.sinusoidal(t))


class LabelEmbedder(nn.Module):
    """Class embedding with a null class (index ``num_classes``) for classifier-free guidance.

    It never drops labels itself: label dropout for guidance is the training loop's job (``method.label_dropout``
    in :class:`dfm.training.Trainer`, seeded per step so that a run is reproducible); pass ``y = null_class`` there.
    """

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: Tensor | None, batch: int, device: torch.device) -> Tensor:
        null = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if y is None:
            y = null
        return self.embedding(y)


#################################################################################
#                                 Core DiT model                                #
#################################################################################


class StageLinear(nn.Linear):
    """A linear layer with optional per-stage expert copies (parameter specialisation).

    Without experts it is ``nn.Linear``. With experts, the weights used for a sample whose main stage is q
    are the 50/50 average of the shared and the expert weights, W_q = (W + E_q) / 2, b_q = (b + e_q) / 2,
    so y = (x W^T + b) / 2 + (x E_q^T + e_q) / 2. Experts start as copies of the shared weights.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int = 0) -> None:
        super().__init__(in_features, out_features)
        self.expert_weight: nn.Parameter | None = None
        self.expert_bias: nn.Parameter | None = None
        if num_experts:
            self.expert_weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
            self.expert_bias = nn.Parameter(torch.empty(num_experts, out_features))

    @torch.no_grad()
    def reset_experts(self) -> None:
        if self.expert_weight is not None and self.expert_bias is not None:
            self.expert_weight.copy_(self.weight.expand_as(self.expert_weight))
            self.expert_bias.copy_(self.bias.expand_as(self.expert_bias))

    def forward(self, x: Tensor, expert_mask: Tensor | None = None) -> Tensor:
        """x: (B, ..., in); expert_mask: (B, S) bool one-hot of the main stage (needed with experts)."""
        shared = F.linear(x, self.weight, self.bias)
        if self.expert_weight is None or self.expert_bias is None:
            return shared
        if expert_mask is None:
            raise ValueError("a specialised layer needs the main stage of every sample")
        # One pass per stage over the whole batch, then a select: static shapes (torch.compile friendly) and a
        # sample's output depends only on its own stage's expert, at the price of S extra matmuls per layer
        # (specialisation is an ablation; gathering per-sample weights would cost B copies of the weights).
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        expert = F.linear(x, self.expert_weight[0], self.expert_bias[0])
        for s in range(1, self.expert_weight.shape[0]):
            out_s = F.linear(x, self.expert_weight[s], self.expert_bias[s])
            expert = torch.where(expert_mask[:, s].view(shape), out_s, expert)
        return 0.5 * (shared + expert)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``, RoPE applied to q and k."""

    def __init__(self, dim: int, num_heads: int, num_experts: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = StageLinear(dim, 3 * dim, num_experts)
        self.proj = StageLinear(dim, dim, num_experts)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, expert_mask: Tensor | None) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x, expert_mask).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d), expert_mask)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, num_experts: int = 0) -> None:
        super().__init__()
        self.fc1 = StageLinear(dim, hidden, num_experts)
        self.fc2 = StageLinear(hidden, dim, num_experts)

    def forward(self, x: Tensor, expert_mask: Tensor | None) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x, expert_mask), approximate="tanh"), expert_mask)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += g1 * Attn(mod(LN(x))); x += g2 * MLP(mod(LN(x))), modulations from c."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, specialise: str = "none", num_stages: int = 1
    ) -> None:
        super().__init__()
        experts = num_stages if specialise != "none" else 0
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, experts if specialise in ("attention", "all") else 0)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), experts if specialise in ("mlp", "all") else 0)
        self.adaLN_act = nn.SiLU()
        self.adaLN_modulation = StageLinear(dim, 6 * dim, experts if specialise == "all" else 0)

    def forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor] | None, expert_mask: Tensor | None) -> Tensor:
        mods = self.adaLN_modulation(self.adaLN_act(c), expert_mask).chunk(6, dim=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope, expert_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp), expert_mask)
        return x


class FinalLayer(nn.Module):
    """Output head of one stage: adaLN modulation of the normalised tokens, then a linear map to p^2 * C values.

    The LayerNorm (no affine parameters) is the same for every head, so the model applies it once and hands
    the normalised tokens to all heads.
    """

    def __init__(self, dim: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x_normed: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(x_normed, shift, scale))
