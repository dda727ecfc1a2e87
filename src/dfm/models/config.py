"""The configuration of a DFM-DiT: one small dataclass that round-trips to JSON.

Stages are numbered coarse to fine, 0-based (stage 0 is the coarsest). Stage ``s`` sees the finest input
resized by ``1 / stage_factors[s]`` in each spatial dimension and is patchified with patch
``patch_size // stage_factors[s]``, so every stage yields the same token grid
``input_size / patch_size``. Videos keep their frame count in every stage (the pyramid is spatial, per frame).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

#: How the overlapping head treats the half-patch strip along the image border, where only one token's window
#: reaches a pixel across the border: "crop" drops the part of a window outside the image and divides by the
#: weights left; "mirror" folds that part back into the image, mirrored at the border, so the tent weights sum to 1
#: there as inside and every border pixel is a blend too.
HEAD_BORDERS = ("crop", "mirror")

POSITION_CHOICES = ("rope", "sincos")
SPECIALISE_CHOICES = ("none", "mlp", "attention", "all")


@dataclass(frozen=True)
class DiTConfig:
    """Settings of :class:`dfm.models.DFMDiT`.

    Example:
        >>> cfg = DiTConfig(input_size=(32, 32), in_channels=1, patch_size=4, hidden_size=128, depth=4,
        ...                 num_heads=4, num_classes=10)
        >>> cfg.stage_input_size(0), cfg.stage_patch_size(0), cfg.num_tokens
        ((16, 16), 2, 64)
    """

    input_size: tuple[int, ...] = (32, 32)
    """Size of the finest stage: (H, W) for images, (T, H, W) for videos."""
    in_channels: int = 4
    stage_factors: tuple[int, ...] = (2, 1)
    """Spatial down-sampling factor of every stage relative to the finest, coarse to fine; ends with 1.
    ``(1,)`` is the one-stage model, i.e. a standard DiT (the Flow Matching baseline)."""
    patch_size: int = 2
    """Patch size of the finest stage; stage s uses ``patch_size // stage_factors[s]``."""
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    """Number of real classes; the label ``num_classes`` is the null class used for guidance."""
    pos: str = "rope"
    """"rope": axial 2D (3D for video) rotary embedding of q and k; "sincos": fixed sin-cos added to tokens."""
    rope_base: float = 10000.0
    use_stage_embedding: bool = True
    """Add a learned embedding of the main stage to the conditioning vector (only exists when S > 1)."""
    specialise: str = "none"
    """Per-stage expert copies of block weights: "none", "mlp", "attention" or "all"."""
    head_overlap: bool = False
    """Each token's output head draws a 2p x 2p window centred on its p x p patch, blended with its neighbours' by
    a tent window that sums to 1 (overlap-add): the output has no edges on the token grid by construction. Stages
    with an odd patch size (1) keep the plain head."""
    head_border: str = "crop"
    """The overlapping head along the image border (:data:`HEAD_BORDERS`): "crop" (what every earlier run trained
    with) or "mirror" (the outside part of each border window folded back in, against the dotted border that "crop"
    leaves: removes it but scored worse at 800 steps at 64 px, docs/RESULTS.md)."""

    def __post_init__(self) -> None:
        # JSON gives lists; keep tuples so that configs compare and hash the same after a round trip.
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "stage_factors", tuple(int(v) for v in self.stage_factors))
        self._validate()

    def _validate(self) -> None:
        if len(self.input_size) not in (2, 3) or min(self.input_size) < 1:
            raise ValueError(f"input_size={self.input_size} must be (H, W) or (T, H, W) with positive entries")
        if self.in_channels < 1:
            raise ValueError(f"in_channels={self.in_channels} must be >= 1")
        factors = self.stage_factors
        if not factors or factors[-1] != 1 or min(factors) < 1:
            raise ValueError(f"stage_factors={factors} must be positive, coarse to fine, and end with 1")
        if any(a <= b for a, b in zip(factors, factors[1:])):
            raise ValueError(f"stage_factors={factors} must be strictly decreasing (coarse to fine)")
        if self.patch_size < 1:
            raise ValueError(f"patch_size={self.patch_size} must be >= 1")
        for s, f in enumerate(factors):
            if self.patch_size % f:
                lcm = math.lcm(*factors)
                raise ValueError(
                    f"patch_size={self.patch_size} of the finest stage is not divisible by the resolution "
                    f"factor {f} of stage {s}; use a patch size that is a multiple of {lcm}"
                )
        for size in self.input_size[-2:]:
            if size % self.patch_size:
                raise ValueError(
                    f"input_size={self.input_size}: spatial size {size} is not divisible by "
                    f"patch_size={self.patch_size}"
                )
        if self.hidden_size < 1 or self.depth < 0 or self.num_heads < 1:
            raise ValueError("hidden_size, depth and num_heads must be positive")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        axes = len(self.input_size)
        if self.pos == "rope" and self.head_dim < 2 * axes:
            raise ValueError(f"head dim {self.head_dim} is too small for {axes}D RoPE; use fewer heads")
        if self.pos == "sincos" and self.hidden_size < 2 * axes:
            raise ValueError(f"hidden_size={self.hidden_size} is too small for {axes}D sin-cos positions")
        if self.head_border not in HEAD_BORDERS:
            raise ValueError(f"head_border={self.head_border!r}: choose one of {', '.join(HEAD_BORDERS)}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} must be > 0")
        if self.num_classes < 0:
            raise ValueError(f"num_classes={self.num_classes} must be >= 0 (0 = unconditional)")
        if self.pos not in POSITION_CHOICES:
            raise ValueError(f"pos={self.pos!r} is not one of {POSITION_CHOICES}")
        if self.specialise not in SPECIALISE_CHOICES:
            raise ValueError(f"specialise={self.specialise!r} is not one of {SPECIALISE_CHOICES}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_stages(self) -> int:
        return len(self.stage_factors)

    @property
    def is_video(self) -> bool:
        return len(self.input_size) == 3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def token_grid(self) -> tuple[int, ...]:
        """(T, h, w) for video, (h, w) for images: the same for every stage."""
        return (*self.input_size[:-2], *(size // self.patch_size for size in self.input_size[-2:]))

    @property
    def num_tokens(self) -> int:
        return math.prod(self.token_grid)

    def stage_input_size(self, stage: int) -> tuple[int, ...]:
        """Spatial (or (T, H, W)) size of the level that stage ``stage`` receives."""
        f = self.stage_factors[stage]
        return (*self.input_size[:-2], *(size // f for size in self.input_size[-2:]))

    def stage_patch_size(self, stage: int) -> int:
        return self.patch_size // self.stage_factors[stage]

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiTConfig:
        if data.get("precondition"):  # format 1 kept the preconditioning inside the network
            raise ValueError(
                "this model was saved with its preconditioning inside it (dfm before 2026-12-05): "
                "load its directory with dfm.Run(path), which reads it as a network and its wrapper"
            )
        data = {k: v for k, v in data.items() if k not in ("precondition", "data_std")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DiTConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)
