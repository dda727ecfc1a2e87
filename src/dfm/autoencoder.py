"""Is an autoencoder fit for DFM? ``dfm autoencoder measure`` (the paper's scale equivariance, measured).

DFM in a latent space decomposes the *latent* into a pyramid. That only means what a pixel pyramid means when the
autoencoder is **scale-equivariant** (SE): decoding a downsampled latent gives the downsampled image. This module
measures, on real images:

- ``recon_psnr``: PSNR of ``decode(encode(x))`` against ``x`` (the posterior mean; images in [-1, 1]);
- ``se_psnr_2x`` / ``se_psnr_4x``: PSNR of ``decode(down(z))`` against ``down(x)``, both downsampled by the same
  factor (area mean, i.e. block averages), the SE error the paper's regulariser trains down;
- ``latent_energy`` / ``pixel_energy``: the share of each Laplacian level's energy (coarse to fine, 3 levels) in
  the latent and in the image. An SE latent puts its energy where the image does; a latent whose coarse level
  holds little of it makes the coarse DFM stage carry little of the picture;
- ``latent_mean`` / ``latent_std`` per channel, and the ``shift`` / ``scale`` that give the latent zero mean and unit
  std (what ``dfm prepare`` would use).

Any object with ``encode(x) -> (mean, std)`` and ``decode(z) -> images`` works (``dfm.data.vae.VAE`` does).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dfm.data import build_dataset
from dfm.data.vae import load_vae
from dfm.decomposition import LaplacianPyramid

FACTORS = (2, 4)


def psnr(a: Tensor, b: Tensor, peak: float = 2.0) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2); inf for identical images."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def down(x: Tensor, factor: int) -> Tensor:
    """Area downsampling (block means) of (B, C, H, W) by ``factor``."""
    return F.avg_pool2d(x, factor) if factor > 1 else x


def level_energy(x: Tensor, stages: int = 3) -> list[float]:
    """Share of the signal energy (mean square) held by each Laplacian level, coarse to fine; sums to 1."""
    levels = LaplacianPyramid(stages, mode="bilinear").decompose(x.float())
    energy = [float(lv.pow(2).sum()) for lv in levels]
    total = sum(energy) or 1.0
    return [e / total for e in energy]


@torch.no_grad()
def measure(vae: Any, images: Tensor, batch_size: int = 32, factors: Sequence[int] = FACTORS) -> dict[str, Any]:
    """The numbers of the module docstring for ``images`` (B, C, H, W) in [-1, 1]."""
    recon, se = [], {f: ([], []) for f in factors}
    latents = []
    for lo in range(0, len(images), batch_size):
        x = images[lo : lo + batch_size]
        z, _ = vae.encode(x)
        latents.append(z.cpu())
        recon.append(vae.decode(z).cpu())
        for f in factors:
            if z.shape[-1] % f or x.shape[-1] % f:
                raise ValueError(f"the latent ({z.shape[-1]} px) is not divisible by the SE factor {f}")
            decoded, target = vae.decode(down(z, f)).cpu(), down(x, f)
            if decoded.shape != target.shape:
                raise ValueError(
                    f"decode(down(z, {f})) has shape {tuple(decoded.shape)} but down(x, {f}) has "
                    f"{tuple(target.shape)}: the decoder must undo the encoder's downsampling"
                )
            se[f][0].append(decoded)
            se[f][1].append(target)
    z = torch.cat(latents)
    mean = z.mean(dim=(0, 2, 3))
    std = z.std(dim=(0, 2, 3))
    stages = max(1, min(3, int(math.log2(min(z.shape[-2:])))))
    result = {
        "num_images": len(images),
        "image_size": list(images.shape[1:]),
        "latent_size": list(z.shape[1:]),
        "recon_psnr": round(psnr(torch.cat(recon), images), 3),
        **{f"se_psnr_{f}x": round(psnr(torch.cat(se[f][0]), torch.cat(se[f][1])), 3) for f in factors},
        "latent_energy": [round(e, 4) for e in level_energy(z, stages)],
        "pixel_energy": [round(e, 4) for e in level_energy(images, stages)],
        "latent_mean": [round(float(v), 5) for v in mean],
        "latent_std": [round(float(v), 5) for v in std],
        "shift": round(float(z.mean()), 5),
        "scale": round(1.0 / float(z.std()), 5),
    }
    return result


def markdown(result: dict[str, Any], name: str = "autoencoder") -> str:
    """A small Markdown table of :func:`measure`'s result."""
    se = [k for k in result if k.startswith("se_psnr_")]
    head = ["autoencoder", "recon PSNR (dB)", *[f"SE PSNR {k[8:]} (dB)" for k in se],
            "latent energy per level (coarse to fine)", "image energy per level", "shift / scale"]  # fmt: skip
    energies = [" / ".join(f"{e:.3f}" for e in result[k]) for k in ("latent_energy", "pixel_energy")]
    row = [name, f"{result['recon_psnr']:.2f}", *[f"{result[k]:.2f}" for k in se], *energies,
           f"{result['shift']} / {result['scale']}"]  # fmt: skip
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |"]) + "\n"


def write(result: dict[str, Any], out: str | Path, name: str = "autoencoder") -> tuple[Path, Path]:
    """``out`` (JSON) and the Markdown table beside it (``.md``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    table = out.with_suffix(".md")
    table.write_text(markdown(result, name))
    return out, table


# ------------------------------------------------------------------------------------------------ command line
def add_autoencoder_parser(sub) -> None:
    p = sub.add_parser("autoencoder", help="autoencoders for latent DFM: measure scale equivariance")
    commands = p.add_subparsers(dest="autoencoder_command", required=True)
    m = commands.add_parser(
        "measure",
        help="reconstruction and scale-equivariance PSNR, latent vs image pyramid energy, latent statistics",
        description=__doc__.split("\n\n")[1],
    )
    m.add_argument("--vae", required=True, help="a diffusers AutoencoderKL directory (save_pretrained) or hub id")
    m.add_argument("--data", default="fashion-mnist", help="images: fashion-mnist or an image folder")
    m.add_argument("--resolution", type=int, default=32, help="image size (default 32)")
    m.add_argument("--num-images", type=int, default=256, help="images to measure on (default 256)")
    m.add_argument("--batch-size", type=int, default=32)
    m.add_argument("--out", default="autoencoder_measure.json", help="JSON output; the Markdown table goes beside it")
    m.set_defaults(func=run_autoencoder)


def run_autoencoder(args) -> int:
    if args.num_images < 2 or args.batch_size < 1:
        raise ValueError("--num-images must be >= 2 and --batch-size >= 1")
    vae = load_vae(args.vae)
    dataset = build_dataset(args.data, args.resolution, train=False)
    count = min(args.num_images, len(dataset))
    images, _ = dataset.get_batch(torch.arange(count), augment=False)
    channels = int(vae.model.config.in_channels)
    if images.shape[1] == 1 and channels == 3:
        images = images.repeat(1, 3, 1, 1)  # grey images through an RGB autoencoder
    if images.shape[1] != channels:
        raise ValueError(f"--data has {images.shape[1]} channels but the autoencoder takes {channels}")
    result = measure(vae, images, args.batch_size)
    json_path, table = write(result, args.out, name=str(args.vae))
    print(table.read_text(), end="")
    print(f"written to {json_path} and {table}")
    return 0
