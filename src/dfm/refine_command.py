"""``dfm refine`` and ``dfm upscale``: what only a decomposed model can do, on the command line.

``dfm refine OUT --pick 3,17,42`` finishes the samplings that ``dfm sample RUN --until-stage K --out OUT`` stopped,
for the seeds picked from its previews, with the run, weights and sampler they started with: each image is the one
an uninterrupted ``dfm sample`` gives for its seed (bit for bit when finished in the same batches, e.g.
``--batch-size 1`` for both; otherwise equal up to float rounding).

``dfm upscale RUN --images DIR`` takes every image of DIR (its size: the resolution of one of the model's coarse
stages, e.g. 16x16 for a two-stage 32x32 model) as the coarse level, clean and held fixed, and generates the finer
levels: a super-resolution from a model trained for generation.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from dfm.checkpoint import ensure_writable
from dfm.config import SamplerConfig
from dfm.data.image_folder import find_images, open_image
from dfm.generate import Generator, encode_prompts, parse_seeds
from dfm.outputs import SampleWriter, save_json
from dfm.run import Run
from dfm.sample_command import (
    add_output_flags,
    add_sampler_flags,
    label_function,
    numbers,
    read_state,
    sampler_settings,
)
from dfm.sampling import SamplingState
from dfm.visual import grid_columns


def add_refine_parser(sub) -> None:
    p = sub.add_parser("refine", help="finish the samplings that dfm sample --until-stage stopped, for picked seeds")
    p.add_argument("state", help="the --out folder of dfm sample RUN --until-stage K")
    p.add_argument("--pick", required=True, help="the seeds to finish, e.g. 3,17,42 or 0-9")
    p.add_argument("--out", help="output directory (default: <state>/refined)")
    add_output_flags(p)
    p.set_defaults(func=run_refine)


def add_upscale_parser(sub) -> None:
    p = sub.add_parser("upscale", help="upscale low-resolution images with a DFM model (its finer stages only)")
    p.add_argument("run", help="run directory or its pretrained/ directory (a pixel-space DFM model)")
    p.add_argument("--images", required=True, help="a folder of images at the resolution of a coarse stage")
    p.add_argument("--seeds", help="one seed per image (default 0-<images - 1>)")
    p.add_argument("--classes", help="class per image, cycled (default: none, the unconditional branch)")
    add_sampler_flags(p)
    p.add_argument("--checkpoint", help="a specific checkpoint directory of the run")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--out", help="output directory (default: <run>/samples/upscale)")
    add_output_flags(p)
    p.set_defaults(func=run_upscale)


def _load_picked(shards: list[Path], picked: list[int]) -> tuple[SamplingState, list[int], list[int] | None,
                                                                 list[int]]:  # fmt: skip
    """The saved states of the picked seeds, in the order asked: (state, seeds, labels, positions)."""
    wanted = {seed: k for k, seed in enumerate(picked)}
    found: dict[int, tuple] = {}
    step = stage = None
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            seeds = f.get_tensor("seeds").tolist()
            rows = [i for i, s in enumerate(seeds) if s in wanted and s not in found]
            if not rows:
                continue
            meta = f.metadata()
            step, stage = int(meta["step"]), int(meta["stage"])
            keys = f.keys()
            index = torch.tensor(rows)
            levels = [f.get_tensor(f"level_{i}")[index] for i in range(sum(k.startswith("level_") for k in keys))]
            previews = [f.get_tensor(f"preview_{i}")[index] for i in range(sum(k.startswith("preview_") for k in keys))]
            labels = f.get_tensor("labels")[index].tolist() if "labels" in keys else None
            positions = f.get_tensor("positions")[index].tolist()
            for j, row in enumerate(rows):
                found[seeds[row]] = ([lv[j] for lv in levels], [p[j] for p in previews],
                                     None if labels is None else labels[j], positions[j])  # fmt: skip
    missing = [s for s in picked if s not in found]
    if missing:
        raise ValueError(f"--pick: seeds {missing[:8]} were not sampled into this state")
    rows = [found[s] for s in picked]
    levels = [torch.stack([r[0][i] for r in rows]) for i in range(len(rows[0][0]))]
    previews = [torch.stack([r[1][i] for r in rows]) for i in range(len(rows[0][1]))]
    labels = None if rows[0][2] is None else [r[2] for r in rows]
    return SamplingState(levels, step, stage, previews), picked, labels, [r[3] for r in rows]


def run_refine(args) -> int:
    record, shards = read_state(Path(args.state))
    picked = list(parse_seeds(args.pick)[:])
    if len(set(picked)) != len(picked):
        raise ValueError(f"--pick {args.pick}: a seed is picked twice")
    run = Run.open(record["run"])
    ema = record["ema"] is not False
    gen = Generator.from_run(run, ema=ema, checkpoint=record["checkpoint"])
    # the sampler of the first half: every SamplerConfig field the record holds (one it lacks, written before that
    # setting existed, stays the run's)
    settings = gen.settings(**{f.name: record.get(f.name) for f in dataclasses.fields(SamplerConfig)})
    state, seeds, labels, positions = _load_picked(shards, picked)
    if gen.text_conditioned:
        prompts = record["prompts"]
        labels = encode_prompts(run, [prompts[i % len(prompts)] for i in positions], len(seeds), gen.device)
    out = Path(args.out or Path(args.state) / "refined")
    ensure_writable(out)
    result = gen.refine(state, labels, settings, batch_size=args.batch_size, precision=args.precision,
                        progress=True)  # fmt: skip
    written = _write(gen, out, result, seeds, None if gen.text_conditioned else labels, args)
    save_json(out / "sampling.json", {**record, "refined_from": str(args.state), "seeds": args.pick,
                                      "count": len(seeds)})  # fmt: skip
    for kind, path in written.items():
        print(f"{kind:16s} {path}")
    return 0


def read_images(folder: Path, channels: int) -> tuple[torch.Tensor, list[Path]]:
    """Every image of ``folder`` as a batch in [-1, 1] with ``channels`` channels; they must share one size."""
    files = find_images(Path(folder)) if Path(folder).is_dir() else []
    if not files:
        raise ValueError(f"--images {folder}: no images (png, jpg, ...) in that folder")
    arrays = [np.asarray(open_image(f, "L" if channels == 1 else "RGB"), dtype=np.float32) for f in files]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"--images {folder}: the images differ in size ({sorted(sizes)[:3]}): give one size")
    x = torch.from_numpy(np.stack(arrays)) / 127.5 - 1.0
    return (x[:, None] if channels == 1 else x.permute(0, 3, 1, 2)).contiguous(), files


def run_upscale(args) -> int:
    run = Run.open(args.run)
    gen = Generator.from_run(run, ema=not args.no_ema, checkpoint=args.checkpoint)
    gen.check_stage(0, "upscale")
    images, files = read_images(Path(args.images), gen.spec.sample_shape[0])
    seeds = list(parse_seeds(args.seeds or f"0-{len(images) - 1}")[:])
    if len(seeds) != len(images):
        raise ValueError(f"--seeds {args.seeds}: give one seed per image ({len(images)})")
    settings = sampler_settings(gen, args)
    classes = numbers(args.classes, "--classes", int, "0,1,2") if args.classes else None
    label = label_function(gen, classes) if classes else None
    labels = None if gen.num_classes == 0 else [gen.network.null_class] * len(seeds)
    if label is not None:
        labels = [label(i, s) for i, s in enumerate(seeds)]
    out = Path(args.out or Path(args.run) / "samples" / "upscale")
    ensure_writable(out)
    result = gen.upscale(images, seeds, labels, settings, batch_size=args.batch_size, precision=args.precision,
                         progress=True)  # fmt: skip
    written = _write(gen, out, result, seeds, labels, args)
    save_json(out / "upscale.json", {"run": str(args.run), "images": [str(f) for f in files], "seeds": seeds,
                                     "classes": args.classes, **vars(settings)})  # fmt: skip
    for kind, path in written.items():
        print(f"{kind:16s} {path}")
    print(f"upscaled {len(images)} image(s) of {'x'.join(map(str, images.shape[2:]))} to "
          f"{'x'.join(map(str, gen.spec.sample_shape[1:]))}", file=sys.stderr)  # fmt: skip
    return 0


def _write(gen: Generator, out: Path, result, seeds, labels, args) -> dict[str, str]:
    writer = SampleWriter(out, len(seeds), None, gen.spec.padding, grid=not args.no_grid, pngs=args.png,
                          npz=args.npz, progression=not args.no_progression, mp4=args.mp4,
                          nrow=grid_columns(min(len(seeds), 256), gen.num_classes))  # fmt: skip
    writer.add(result.images, result.previews, seeds, labels)
    return writer.close()


__all__ = ["add_refine_parser", "add_upscale_parser", "read_images", "run_refine", "run_upscale"]
