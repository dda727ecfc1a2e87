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

import contextlib
import copy
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from dfm.checkpoint import (
    EMA_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    check_state,
    clean_leftovers,
    ensure_writable,
    find_latest,
    first_mismatch,
    is_optimizer_state,
    is_step,
    load_checkpoint,
    load_state_file,
    non_finite,
    optimizer_mismatch,
    save_checkpoint,
    state_dict_error,
)
from dfm.config import check_lr
from dfm.data import build_dataset
from dfm.data.vae import SE_FILE, load_vae, require_diffusers
from dfm.decomposition import LaplacianPyramid
from dfm.training.log import truncate_log

FACTORS = (2, 4)
CHECKPOINTS = "checkpoints"  #: OUT/checkpoints/step_*/ (dfm.checkpoint: atomic, safetensors weights)
LOG_FILE = "log.jsonl"
LEGACY_CHECKPOINT = "checkpoint.pt"  #: the single checkpoint file of runs written before OUT/checkpoints/
ADAM_BETAS = (0.9, 0.99)  #: AdamW's betas of the fine-tuning
#: what the state.pt of an autoencoder checkpoint holds
SE_STATE = {"optimizer": (is_optimizer_state, "an optimizer state (a dict of state and param_groups)"),
            "step": (is_step, "a step number")}  # fmt: skip


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


# ------------------------------------------------------------------------------------------------ SE fine-tuning
@dataclass
class SEConfig:
    """Settings of ``dfm autoencoder finetune`` (the paper: 10,000 steps at 256 px, batch 64, factors 2 and 4)."""

    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    se_weight: float = 1.0  #: weight of the scale-equivariance term
    factors: tuple[int, ...] = FACTORS  #: one drawn at random per step, as in the paper
    recon: str = "l1"  #: l1 | l2 reconstruction of the full image
    kl_weight: float = 1e-6  #: the KL term of the posterior (Stable Diffusion's VAE training weight)
    freeze_encoder: bool = False  #: train the decoder only (the latent space, hence prepared latents, stays)
    precision: str = "fp32"  #: fp32 | bf16 (autocast)
    ema_decay: float = 0.0  #: 0 = no EMA; else the saved model is the EMA
    seed: int = 0
    ckpt_every: int = 200  #: a checkpoint every this many steps (0 = only at the end; the last step is always saved)
    keep_last: int = 2  #: checkpoints kept in OUT/checkpoints

    def validate(self) -> SEConfig:
        """Check the settings; a ``ValueError`` names the flag and what to give. Returns self."""
        if self.recon not in ("l1", "l2") or self.precision not in ("fp32", "bf16"):
            raise ValueError("--recon must be l1 or l2, --precision fp32 or bf16")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"--steps {self.steps} and --batch-size {self.batch_size} must be >= 1")
        check_lr(self.lr, ADAM_BETAS[0], "--lr")
        for flag, value in (("--se-weight", self.se_weight), ("--kl-weight", self.kl_weight)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{flag} {value} must be a finite number >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema {self.ema_decay} must be in [0, 1) (0: no EMA)")
        if self.ckpt_every < 0 or self.keep_last < 1:
            raise ValueError(f"--ckpt-every {self.ckpt_every} must be >= 0 (0: only at the end)")
        if not self.factors or any(f < 2 for f in self.factors):
            raise ValueError(f"--factors {','.join(map(str, self.factors))}: downsampling factors >= 2, e.g. 2,4")
        return self


def se_losses(model: Any, x: Tensor, factor: int, recon: str = "l1") -> dict[str, Tensor]:
    """The training terms for a diffusers ``AutoencoderKL`` on images ``x`` in [-1, 1]: reconstruction of ``x``,
    scale equivariance (decode the ``factor``x area-downsampled latent, compare with the downsampled image) and
    the posterior's KL to N(0, I) (mean over elements)."""
    posterior = model.encode(x).latent_dist
    z = posterior.sample()
    dist = F.l1_loss if recon == "l1" else F.mse_loss
    rec = dist(model.decode(z).sample.float(), x.float())
    se = dist(model.decode(down(z, factor)).sample.float(), down(x, factor).float())
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).float().mean()
    return {"recon": rec, "se": se, "kl": kl}


def scratch_autoencoder(channels: int = 1, latent_channels: int = 4) -> Any:
    """A small ``AutoencoderKL`` (2x downsampling, about 0.2M parameters) that trains on a CPU."""
    diffusers = require_diffusers()
    return diffusers.AutoencoderKL(
        in_channels=channels, out_channels=channels, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, sample_size=32,
    )  # fmt: skip


def finetune_se(model: Any, images: Tensor, out: str | Path, cfg: SEConfig, progress: bool = True) -> Path:
    """Train ``model`` (a diffusers ``AutoencoderKL``) on ``images`` with reconstruction + SE + KL; resumes from the
    latest checkpoint in ``out/checkpoints`` (written as the trainer's: atomically, weights in safetensors, no
    pickled code), exactly as if it had never stopped; writes the (EMA) model with ``save_pretrained`` into ``out``
    and one row per step into ``out/log.jsonl``."""
    out = ensure_writable(out)
    cfg.validate()
    if any(images.shape[-1] % (f * 2 ** (len(model.config.block_out_channels) - 1)) for f in cfg.factors):
        raise ValueError(f"image size {images.shape[-1]} must be divisible by every SE factor times the VAE's factor")
    model.train().requires_grad_(True)
    if cfg.freeze_encoder:
        for part in (model.encoder, model.quant_conv):
            part.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=ADAM_BETAS, weight_decay=0.0)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    root = out / CHECKPOINTS
    clean_leftovers(root)
    step = _resume(out, model, ema, opt)
    truncate_log(out, step, LOG_FILE)  # rows past the checkpoint are written again; a torn last row goes
    log = out / LOG_FILE
    bar = tqdm(total=cfg.steps, initial=step, desc="autoencoder", disable=not progress, dynamic_ncols=True)
    while step < cfg.steps:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
        factor = cfg.factors[int(torch.randint(len(cfg.factors), (1,), generator=gen))]
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # the posterior sample
        ctx = torch.autocast("cpu", torch.bfloat16) if cfg.precision == "bf16" else contextlib.nullcontext()
        with ctx:
            terms = se_losses(model, images[idx].float(), factor, cfg.recon)
        loss = terms["recon"] + cfg.se_weight * terms["se"] + cfg.kl_weight * terms["kl"]
        if not torch.isfinite(loss):
            raise ValueError(f"the loss became {float(loss)} at step {step + 1}: lower --lr; the last checkpoint in "
                             f"{root} is intact")  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - cfg.ema_decay)
        row = {"step": step, "factor": factor, **{k: round(float(v.detach()), 6) for k, v in terms.items()}}
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        bar.update(1)
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
            _save(root, step, model, ema, opt, cfg.keep_last)
    bar.close()
    final = (ema if ema is not None else model).eval()
    final.save_pretrained(out)
    record = {"scale_equivariant": cfg.se_weight > 0, "se_weight": cfg.se_weight, "factors": list(cfg.factors),
              "steps": cfg.steps}  # fmt: skip
    (out / SE_FILE).write_text(json.dumps(record) + "\n")
    return out


def _save(root: Path, step: int, model: Any, ema: Any, opt: torch.optim.Optimizer, keep_last: int) -> Path:
    """Checkpoint ``step``; weights that hold inf or NaN are refused, so the latest checkpoint always resumes."""
    weights, averaged = model.state_dict(), ema.state_dict() if ema is not None else {}
    bad = non_finite(weights) + non_finite(averaged)
    if bad:
        last = find_latest(root)
        kept = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written"
        raise ValueError(f"the weights became inf or NaN by step {step} (e.g. {bad[0]}): lower --lr; not saving them: "
                         f"{kept}")  # fmt: skip
    return save_checkpoint(root, step, weights, averaged, {"optimizer": opt.state_dict(), "step": step}, keep_last)


def _resume(out: Path, model: Any, ema: Any, opt: torch.optim.Optimizer) -> int:
    """Load the latest checkpoint of ``out`` (or the single ``checkpoint.pt`` of older versions) into the model, its
    EMA and the optimizer; its step (0 without one). Whatever does not fit is an error naming the file."""
    ckpt = find_latest(out / CHECKPOINTS)
    if ckpt is not None:
        loaded = load_checkpoint(ckpt)
        state = check_state(loaded["state"], ckpt / STATE_FILE, SE_STATE)
        parts = [(model, loaded["model"], ckpt / MODEL_FILE)]
        parts += [(ema, loaded["ema"], ckpt / EMA_FILE)] if ema is not None else []
        where = ckpt / STATE_FILE
    elif (out / LEGACY_CHECKPOINT).is_file():
        where = out / LEGACY_CHECKPOINT
        fields = {"model": (lambda v: isinstance(v, dict), "the model's weights (a dict)"), **SE_STATE}
        if ema is not None:
            fields["ema"] = (lambda v: isinstance(v, dict), "the EMA's weights (a dict)")
        state = check_state(load_state_file(where), where, fields)
        parts = [(model, state["model"], where)] + ([(ema, state["ema"], where)] if ema is not None else [])
    else:
        return 0
    settings = "resume with the same --ema and --freeze-encoder, or use another --out"
    for module, weights, file in parts:
        if not all(torch.is_tensor(v) for v in weights.values()):
            raise CheckpointError(f"checkpoint file {file} holds something else than weights: delete it, or use "
                                  "another --out")  # fmt: skip
        bad = non_finite(weights)
        if bad:
            raise CheckpointError(f"checkpoint file {file} holds inf or NaN weights (e.g. {bad[0]}): the run had "
                                  "diverged; delete it to fall back to an earlier checkpoint, or start again in "
                                  "another --out with a lower --lr")  # fmt: skip
        try:
            reason = first_mismatch(module.state_dict(), weights)
            if reason is None:
                module.load_state_dict(weights)
        except (RuntimeError, ValueError, KeyError) as err:
            reason = state_dict_error(err)
        if reason is not None:
            raise CheckpointError(f"checkpoint file {file} does not fit this autoencoder: {reason}; {settings}")
    why = optimizer_mismatch(opt, state["optimizer"])
    if why is None:
        try:
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
            why = state_dict_error(err)
    if why is not None:
        raise CheckpointError(f"checkpoint file {where} holds the optimizer state of another training ({why}); "
                              f"{settings}")  # fmt: skip
    return int(state["step"])


# ------------------------------------------------------------------------------------------------ command line
def add_autoencoder_parser(sub) -> None:
    p = sub.add_parser("autoencoder", help="autoencoders for latent DFM: measure and train scale equivariance")
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
    t = commands.add_parser(
        "finetune",
        help="make an AutoencoderKL scale-equivariant (or train a small one from scratch with --init scratch)",
        description="Reconstruction + scale equivariance (decode(down(z)) against down(x), the factor drawn per step) "
        "+ KL. Resumes from the latest checkpoint in OUT/checkpoints; writes the model with save_pretrained into OUT.",
    )
    t.add_argument("--vae", help="the AutoencoderKL to fine-tune (a save_pretrained directory or hub id)")
    t.add_argument("--init", choices=["scratch"], help="scratch: a small new AutoencoderKL instead of --vae")
    t.add_argument("--channels", type=int, default=1, help="with --init scratch: image channels (default 1)")
    t.add_argument("--data", default="fashion-mnist", help="images: fashion-mnist or an image folder")
    t.add_argument("--resolution", type=int, default=32)
    t.add_argument("--num-images", type=int, default=10000, help="training images held in memory (default 10000)")
    t.add_argument("--out", required=True, help="output directory (also the resume point)")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--se-weight", type=float, default=1.0, help="weight of the scale-equivariance term (default 1)")
    t.add_argument("--factors", default="2,4", help="SE downsampling factors, one drawn per step (default 2,4)")
    t.add_argument("--recon", choices=["l1", "l2"], default="l1")
    t.add_argument("--kl-weight", type=float, default=1e-6)
    t.add_argument("--freeze-encoder", action="store_true", help="train the decoder only (the latents stay valid)")
    t.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    t.add_argument("--ema", type=float, default=0.0, help="EMA decay of the saved weights (default 0: none)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--ckpt-every",
        type=int,
        default=200,
        help="a checkpoint every N steps (default 200; 0: only at the end; the last step is always saved)",
    )
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=run_autoencoder)


def _images(data: str, resolution: int, count: int, channels: int, train: bool = True) -> Tensor:
    """Up to ``count`` images of ``data`` in [-1, 1], with the autoencoder's channels (grey repeated to RGB)."""
    dataset = build_dataset(data, resolution, train=train)
    images, _ = dataset.get_batch(torch.arange(min(count, len(dataset))), augment=False)
    if images.shape[1] == 1 and channels == 3:
        images = images.repeat(1, 3, 1, 1)
    if images.shape[1] != channels:
        raise ValueError(f"--data has {images.shape[1]} channels but the autoencoder takes {channels}")
    return images


def run_finetune(args) -> int:
    if (args.vae is None) == (args.init != "scratch"):
        raise ValueError("give --vae PATH (fine-tune an AutoencoderKL) or --init scratch (a small new one), not both")
    try:
        factors = tuple(int(f) for f in args.factors.split(",") if f.strip())
    except ValueError:
        raise ValueError(
            f"--factors {args.factors!r}: give comma-separated downsampling factors >= 2, e.g. 2,4"
        ) from None
    cfg = SEConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, se_weight=args.se_weight,
                   factors=factors, recon=args.recon, kl_weight=args.kl_weight, freeze_encoder=args.freeze_encoder,
                   precision=args.precision, ema_decay=args.ema, seed=args.seed,
                   ckpt_every=args.ckpt_every).validate()  # fmt: skip
    out = Path(args.out)
    resuming = find_latest(out / CHECKPOINTS) is not None or (out / LEGACY_CHECKPOINT).is_file()
    if resuming and (out / "config.json").is_file():
        diffusers = require_diffusers()  # resume: the architecture saved with the run, weights from the checkpoint
        model = diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(out))
    else:
        torch.manual_seed(cfg.seed)  # a scratch model's initial weights
        model = load_vae(args.vae).model if args.vae is not None else scratch_autoencoder(channels=args.channels)
        ensure_writable(out)
        model.save_config(out)  # so that a resumed run rebuilds the same architecture
    torch.manual_seed(cfg.seed)
    images = _images(args.data, args.resolution, args.num_images, int(model.config.in_channels))
    finetune_se(model, images, out, cfg, progress=not args.no_progress)
    print(f"autoencoder written to {out} (AutoencoderKL.save_pretrained; dfm prepare --vae {out} uses it)")
    return 0


def run_autoencoder(args) -> int:
    if args.autoencoder_command == "finetune":
        return run_finetune(args)
    if args.num_images < 2 or args.batch_size < 1:
        raise ValueError("--num-images must be >= 2 and --batch-size >= 1")
    vae = load_vae(args.vae)
    images = _images(args.data, args.resolution, args.num_images, int(vae.model.config.in_channels), train=False)
    result = measure(vae, images, args.batch_size)
    json_path, table = write(result, args.out, name=str(args.vae))
    print(table.read_text(), end="")
    print(f"written to {json_path} and {table}")
    return 0
