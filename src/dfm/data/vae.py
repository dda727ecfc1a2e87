"""A thin wrapper around diffusers' ``AutoencoderKL`` (the image VAE of SD, SDXL and FLUX).

The paper trains in a VAE latent space. We keep the VAE outside the model: images are encoded once
(``dfm prepare``) and generated latents are decoded for viewing and evaluation. diffusers is an
optional dependency (``pip install "dfm[vae]"``), imported only when a VAE is loaded.

Latents are normalised the diffusers way, ``x = (z - shift) * scale``, with ``shift`` and
``scale`` taken from the VAE config (``shift_factor``, ``scaling_factor``) unless given.

Example:
    >>> vae = load_vae("path/to/vae")                 # doctest: +SKIP
    >>> mean, std = vae.encode(images)                # doctest: +SKIP
    >>> images_again = vae.decode(mean)               # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

__all__ = ["VAE", "load_vae", "require_diffusers"]


def require_diffusers() -> Any:
    """Import and return ``diffusers``, or fail with the command that installs it."""
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(
            'VAE latents need the optional dependency diffusers; install it with pip install "dfm[vae]"'
        ) from err
    return diffusers


#: written by ``dfm autoencoder finetune`` beside the weights of an autoencoder trained with the SE term
SE_FILE = "dfm_autoencoder.json"


class VAE:
    """An ``AutoencoderKL`` with the encode/decode/normalise calls ``dfm`` needs.

    Args:
        model: a diffusers ``AutoencoderKL``.
        source: where it was loaded from (recorded in prepared latent datasets).
        shift, scale: latent normalisation; default to the config's ``shift_factor`` (0 when absent)
            and ``scaling_factor``.
    """

    def __init__(self, model: Any, source: str = "", shift: float | None = None, scale: float | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.source = source
        config = model.config
        self.shift = float(shift if shift is not None else (getattr(config, "shift_factor", None) or 0.0))
        self.scale = float(scale if scale is not None else getattr(config, "scaling_factor", 1.0))
        self.latent_channels = int(config.latent_channels)
        #: trained for scale equivariance (``dfm autoencoder finetune`` wrote SE_FILE beside its weights): a coarse
        #: latent then decodes to the coarse image, so DFM's stage previews can be decoded straight from it
        self.scale_equivariant = False
        self.downsample_factor = 2 ** (len(config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def latent_shape(self, channels: int, resolution: int) -> tuple[int, int, int]:
        """Shape of the latent of a ``resolution x resolution`` image."""
        if resolution % self.downsample_factor:
            raise ValueError(
                f"resolution {resolution} is not divisible by the VAE's downsampling factor "
                f"{self.downsample_factor}; pick a multiple of {self.downsample_factor}"
            )
        return (self.latent_channels, resolution // self.downsample_factor, resolution // self.downsample_factor)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mean, std)`` of images ``x (B, C, H, W)`` in [-1, 1], in raw latent units."""
        posterior = self.model.encode(x.to(self.device, self.dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (clamped) from raw latents ``z (B, c, h, w)``."""
        images = self.model.decode(z.to(self.device, self.dtype)).sample
        return images.float().clamp_(-1.0, 1.0)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents to model space: ``(z - shift) * scale``."""
        return (z - self.shift) * self.scale

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model space back to raw latents: ``x / scale + shift``."""
        return x / self.scale + self.shift

    def decode_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from model-space latents (what a model trained on latents generates)."""
        return self.decode(self.denormalize(x))


def load_vae(
    path_or_hub_id: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    subfolder: str | None = None,
    shift: float | None = None,
    scale: float | None = None,
) -> VAE:
    """Load an ``AutoencoderKL`` saved with ``save_pretrained`` (a folder) or from a hub id.

    A hub id needs network access to the model hub (or a filled local cache). For a full pipeline
    folder, pass ``subfolder="vae"``; it is also tried automatically when the folder has a ``vae/``.
    """
    diffusers = require_diffusers()
    source = str(path_or_hub_id)
    local = os.path.isdir(source)
    if local:  # record an absolute path so that prepared latents find their VAE from any directory
        source = os.path.abspath(source)
    if local and subfolder is None and not os.path.isfile(os.path.join(source, "config.json")):
        if os.path.isfile(os.path.join(source, "vae", "config.json")):
            subfolder = "vae"
        else:
            raise FileNotFoundError(
                f"{source} holds no config.json (nor vae/config.json); pass a folder written by "
                "AutoencoderKL.save_pretrained or a model hub id"
            )
    elif not local and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        # hub ids are "owner/name"; anything else was meant as a folder
        raise FileNotFoundError(f"VAE folder {source} does not exist; pass a save_pretrained folder or a hub id")
    try:
        model = diffusers.AutoencoderKL.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype)
    except OSError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise FileNotFoundError(f"cannot load a VAE from {source!r}: {first_line}") from err
    vae = VAE(model.to(device), source=source, shift=shift, scale=scale)
    marker = os.path.join(source, subfolder or "", SE_FILE) if local else None
    if marker is not None and os.path.isfile(marker):
        with open(marker) as f:
            vae.scale_equivariant = bool(json.load(f).get("scale_equivariant", False))
    return vae
