"""Generation from a trained run: load the model and sample with per-image seeds (the files ``dfm sample``
writes are :mod:`dfm.outputs`'; its names are importable from here too).

An image is a function of its seed, its class and the sampler settings: its starting noise depends on its seed
only, so ``--seeds 0-49999`` gives seed 17 the same image whether it is drawn alone, in a batch of 256, or on any
number of GPUs. Precisely: bitwise the same for the same batch composition (same ``--batch-size`` and number of
processes, hence the same neighbours); otherwise equal up to float rounding, because matrix products reduce in an
order that depends on the batch shape, which in rare cases moves a uint8 pixel by one level (one pixel in 256
images, measured between ``--batch-size 64`` and ``--batch-size 1``).

Text-to-image runs (diffusers FLUX / SD3 backbones, :mod:`dfm.adapters`): ``labels`` is a
:class:`~dfm.text.TextCondition` with one row per image (``dfm sample --prompt`` encodes the prompts with the text
encoder recorded by ``dfm prepare``), and guidance is true classifier-free guidance against the empty prompt.
``method.time_shift`` shifts the sampling grid as FLUX's pipeline does (one token count for all stages).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dfm.baselines import CascadeModel
from dfm.checkpoint import EMA_FILE, MODEL_FILE, find_latest, load_weights, non_finite
from dfm.config import RunConfig
from dfm.data import build_dataset
from dfm.data.latents import is_latent_dir, read_latent_info
from dfm.data.vae import load_vae
from dfm.decomposition import Decomposition
from dfm.factory import make_model, make_schedule
from dfm.methods import get_method
from dfm.models import DFMDiT
from dfm.outputs import crop_border, save_json, save_mp4, write_outputs  # noqa: F401 (dfm sample's writers)
from dfm.text import TextCondition
from dfm.visual import grid_columns, image_grid, progression_grid, save_gif, save_png

RUN_CONFIG = "config.json"
METHOD_FILE = "dfm_run.json"  # the RunConfig saved next to a save_pretrained model


def parse_seeds(text: str) -> list[int]:
    """``"0-49999"``, ``"1,5,9"`` or ``"0-9,100"`` -> list of seeds."""
    seeds: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
            if first < 0 or last < first:
                raise ValueError
            seeds.extend(range(first, last + 1))
    except ValueError:
        raise ValueError(f"cannot parse seeds {text!r}: use a range like 0-49999 or a list like 1,5,9") from None
    if not seeds:
        raise ValueError("no seeds given")
    return seeds


def run_checkpoint(path: str | Path, checkpoint: str | Path | None = None) -> Path | None:
    """The checkpoint :func:`load_run` loads from ``path``: ``checkpoint`` if given, else the run's latest complete
    one; None for a directory that is not a training run (e.g. ``pretrained/``) or a run with no checkpoint yet."""
    path = Path(path)
    if not ((path / RUN_CONFIG).is_file() and (path / "checkpoints").is_dir()):
        return None
    return Path(checkpoint) if checkpoint else find_latest(path / "checkpoints")


def load_run(
    path: str | Path, ema: bool = True, checkpoint: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, RunConfig]:
    """Load (model, run config) from a run directory (latest checkpoint, EMA weights by default) or from a
    ``save_pretrained`` directory written by the trainer (``pretrained/``)."""
    path = Path(path)
    if (path / RUN_CONFIG).is_file() and (path / "checkpoints").is_dir():
        cfg = RunConfig.load(path / RUN_CONFIG)
        ckpt = run_checkpoint(path, checkpoint)
        if ckpt is None:
            raise FileNotFoundError(f"{path} has no complete checkpoint yet: train longer or pass another run")
        shape, num_classes = _data_spec(cfg, path)
        model = make_model(cfg, shape, num_classes)
        if cfg.model.backbone != "dit":  # checkpoints hold the trainable weights (EMA: if kept) and the empty prompt
            state = {**load_weights(ckpt, ema=False), **(load_weights(ckpt, ema=True) if ema else {})}
            if "empty_pooled" in state:
                model.set_empty_prompt(TextCondition(state.pop("empty_prompt_embeds"), state.pop("empty_pooled")))
        else:
            state = load_weights(ckpt, ema=ema)
        try:
            if cfg.model.backbone != "dit":
                unexpected = model.load_state_dict(state, strict=False).unexpected_keys
                if unexpected:
                    raise RuntimeError(f"unexpected weights {unexpected[:3]}")
            else:
                model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"{ckpt} does not fit the run config {path / RUN_CONFIG}: {str(err).splitlines()[0]}"
            ) from None
        _require_finite(model, ckpt / (EMA_FILE if ema else MODEL_FILE))
        return model.to(device).eval(), cfg
    if (path / "dfm_adapter.json").is_file():  # a diffusers backbone's save_pretrained (dfm.adapters)
        from dfm.adapters import load_saved_adapter

        model = _require_finite(load_saved_adapter(path).to(device).eval(), path)
        return model, RunConfig.load(path / METHOD_FILE)
    if (path / "cascade.json").is_file():
        model = CascadeModel.from_pretrained(path, device=device).eval()
        return _require_finite(model, path), RunConfig.load(path / METHOD_FILE)
    if (path / "model.safetensors").is_file():
        model = _require_finite(DFMDiT.from_pretrained(path, device=device).eval(), path)
        if (path / METHOD_FILE).is_file():
            cfg = RunConfig.load(path / METHOD_FILE)
        else:  # a bare model: assume the default Laplacian pyramid with its number of stages
            cfg = RunConfig()
            s = model.config.num_stages
            cfg.method.stages = s
            if s == 1:
                cfg.method.method, cfg.method.steps, cfg.method.thresholds = "fm", (40,), ()
        return model, cfg
    raise FileNotFoundError(f"{path} is neither a run directory (config.json + checkpoints/) nor a save_pretrained one")


def _require_finite(model: nn.Module, source: Path) -> nn.Module:
    bad = non_finite(model.state_dict())
    if bad:
        raise ValueError(
            f"{source} holds inf or NaN weights ({len(bad)} tensors, e.g. {bad[0]}): the run diverged; sample an "
            "earlier checkpoint with --checkpoint, or retrain with a lower learning rate"
        )
    return model


def _data_spec(cfg: RunConfig, run: Path) -> tuple[tuple[int, ...], int]:
    """Sample shape and class count of a run: from the trainer's ``data_spec.json``, else from the data set."""
    spec = run / "data_spec.json"
    if spec.is_file():
        d = json.loads(spec.read_text())
        return tuple(d["sample_shape"]), int(d["num_classes"])
    ds = build_dataset(  # runs written before data_spec.json existed
        cfg.data.dataset,
        cfg.data.resolution,
        train=True,
        data_dir=cfg.data.data_dir,
        frames=cfg.data.frames,
        num_clips=cfg.data.num_clips,
    )
    return tuple(ds.sample_shape), int(ds.num_classes)


def previews_exact(decoder: Callable | None) -> bool:
    """Whether stage previews of a run decode exactly: pixel runs, or latent runs whose autoencoder is
    scale-equivariant (``dfm autoencoder finetune``)."""
    return decoder is None or bool(getattr(getattr(decoder, "__self__", None), "scale_equivariant", False))


def make_decoder(cfg: RunConfig, device: str | torch.device = "cpu") -> Callable[[Tensor], Tensor] | None:
    """For latent runs, the VAE decoder (model space -> pixels in [-1, 1]); None for pixel-space runs."""
    if not is_latent_dir(Path(cfg.data.dataset)):
        return None
    info = read_latent_info(Path(cfg.data.dataset))
    vae = load_vae(info["vae"], device=device, shift=info.get("shift"), scale=info.get("scale"))
    return vae.decode_normalized


@torch.no_grad()
def generate(
    model: nn.Module,
    decomposition: Decomposition,
    cfg: RunConfig,
    shape: Sequence[int],
    labels: Sequence[int] | TextCondition | None,
    seeds: Sequence[int],
    *,
    guidance: float | Sequence[float] | None = None,
    steps: Sequence[int] | None = None,
    thresholds: Sequence[float] | None = None,
    solver: str | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    decoder: Callable[[Tensor], Tensor] | None = None,
    progress: bool = False,
    callback: Callable[[int, Tensor], None] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Sample one image per seed (class ``labels[i]``, or text condition row i); returns (images, per-stage
    previews) on the CPU."""
    m = cfg.method
    schedule = make_schedule(m, steps, thresholds)
    if m.time_shift:  # FLUX's shift for the finest latent's token count, (H / 2) * (W / 2)
        from dfm.adapters.flux import flux_time_shift

        tokens = (shape[-2] // 2) * (shape[-1] // 2)
        schedule = schedule.warped(lambda t: flux_time_shift(t, tokens))
    guidance = m.guidance if guidance is None else guidance
    solver = solver or m.solver
    images: list[Tensor] = []
    all_previews: list[list[Tensor]] = []
    exact = previews_exact(decoder)
    batches = range(0, len(seeds), batch_size)
    if progress:
        batches = tqdm(batches, desc="sample", unit="batch", dynamic_ncols=True)
    for lo in batches:
        sd = list(seeds[lo : lo + batch_size])
        if isinstance(labels, TextCondition):
            y = labels[lo : lo + batch_size].to(device)
        else:
            y = None if labels is None else torch.as_tensor(list(labels[lo : lo + batch_size]), device=device)
        ctx = (
            torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        )
        common = dict(seeds=sd, guidance=guidance, solver=solver, device=device)
        if callback is not None:  # callback(stage, preview) when a stage reaches its threshold
            common["callback"] = callback
        with ctx:
            out = get_method(m.method).sample(model, decomposition, m, schedule, (len(sd), *shape), y, **common)
        imgs, prev = out.images.float(), [p.float() for p in out.previews]
        if decoder is not None:
            imgs = decoder(imgs)
            # A scale-equivariant autoencoder decodes a coarse latent to the coarse image: previews exactly; any
            # other decodes the partial latent upsampled to full size, an approximation (previews_exact says which)
            prev = [decoder(p if exact else upsample_like(p, out.images)) for p in prev]
        images.append(imgs.cpu())
        if not all_previews:
            all_previews = [[] for _ in prev]
        for i, p in enumerate(prev):
            all_previews[i].append(p.cpu())
    return torch.cat(images), [torch.cat(p) for p in all_previews]


def upsample_like(x: Tensor, ref: Tensor) -> Tensor:
    return torch.nn.functional.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


def data_padding(cfg: RunConfig, run: str | Path | None = None) -> int:
    """Pixels of padding the data set added on every side (the data set's ``padding``: 32x32 Fashion-MNIST is 28x28
    padded by 2, 64x64 is that image upsampled, so 4), which saved images drop again to compare with the real data.

    Read from the run's ``data_spec.json`` (run or ``pretrained/`` directory); runs written before it recorded the
    padding fall back to the rule for Fashion-MNIST.
    """
    spec = Path(run) / "data_spec.json" if run is not None else None
    if spec is not None and spec.is_file():
        recorded = json.loads(spec.read_text()).get("padding")
        if recorded is not None:
            return int(recorded)
    res = cfg.data.resolution
    fashion = str(cfg.data.dataset).lower().partition(":")[0] == "fashion-mnist"
    return 2 * res // 32 if fashion and res and res % 32 == 0 else 0


def default_labels(seeds: Sequence[int], num_classes: int) -> list[int] | None:
    """Class ``seed % num_classes`` per image, so that an image is a function of its seed alone."""
    return None if num_classes == 0 else [s % num_classes for s in seeds]


def sample_grid_files(
    model: nn.Module,
    decomposition: Decomposition,
    cfg: RunConfig,
    out_dir: Path,
    step: int,
    num_classes: int,
    shape: Sequence[int],
    n: int = 40,
    decoder: Callable[[Tensor], Tensor] | None = None,
    text: TextCondition | None = None,
) -> Path:
    """The trainer's periodic pictures: a grid of samples and a coarse-to-fine progression (fixed seeds); a text
    model draws image i with row i of ``text``."""
    device = next(model.parameters()).device
    labels = default_labels(range(n), num_classes) if text is None else text
    images, previews = generate(
        model,
        decomposition,
        cfg,
        shape,
        labels,
        list(range(n)),
        device=device,
        precision=cfg.train.precision,
        decoder=decoder,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    nrow = grid_columns(n, num_classes)
    if images.dim() == 5:  # video: an animated grid, and the middle frame for the still pictures
        frames = [image_grid(images[:, :, f], nrow=nrow) for f in range(images.shape[2])]
        save_gif(frames, out_dir / f"step_{step:08d}.gif")
        images = images[:, :, images.shape[2] // 2]
        previews = [p[:, :, p.shape[2] // 2] for p in previews]
    save_png(image_grid(images, nrow=nrow), out_dir / f"step_{step:08d}.png")
    if len(previews) > 1:
        save_png(progression_grid(previews, images, max_rows=min(n, 10)), out_dir / f"progression_{step:08d}.png")
    return out_dir / f"step_{step:08d}.png"


def shard(seq: Sequence[int], rank: int, world: int) -> list[int]:
    """Contiguous shard of ``seq`` for ``rank`` (``world`` processes): ranks' shards concatenate back to ``seq``."""
    per = math.ceil(len(seq) / world)
    return list(seq[rank * per : (rank + 1) * per])
