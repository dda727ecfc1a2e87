"""``dfm sample``: images (or clips) from a run or a save_pretrained directory, through :class:`dfm.generate.Generator`.

With torchrun, every rank draws a contiguous shard of the seeds and rank 0 writes the outputs; an image depends on
its seed, not on the rank that drew it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dfm.checkpoint import ensure_writable
from dfm.generate import Generator, encode_prompts, parse_seeds, shard
from dfm.outputs import save_json, write_outputs
from dfm.run import Run
from dfm.training.distributed import finish_distributed, init_distributed
from dfm.visual import grid_columns


def add_sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate images from a run or a save_pretrained directory")
    p.add_argument("run", help="run directory (uses its latest checkpoint) or a save_pretrained directory")
    p.add_argument("--seeds", help="one image per seed, e.g. 0-49999 or 1,5,9 (default 0-63; with prompts, one "
                   "seed per prompt: 0-<prompts - 1>)")  # fmt: skip
    p.add_argument("--classes", help="class per image, cycled: e.g. 3 or 0,1,2 (default: seed %% number of classes)")
    p.add_argument("--prompt", action="append", default=[], help="text-to-image runs (FLUX / SD3): a prompt, "
                   "repeatable; prompts are cycled over the seeds")  # fmt: skip
    p.add_argument("--prompts", help="text-to-image runs: a file with one prompt per line")
    p.add_argument("--time-shift", action="store_true", default=None, help="FLUX's resolution-dependent time shift "
                   "of the sampling grid (sampler.time_shift)")  # fmt: skip
    p.add_argument("--guidance", help="classifier-free guidance: one scale, or one per stage like 1.0,2.0 "
                   "(sampler.guidance)")  # fmt: skip
    p.add_argument("--steps", help="sampling steps per stage, e.g. 30,10 (sampler.steps)")
    p.add_argument("--thresholds", help="stage thresholds, e.g. 0.7 (sampler.thresholds)")
    p.add_argument("--solver", choices=["euler", "heun"], help="sampler.solver")
    p.add_argument("--checkpoint", help="a specific checkpoint directory of the run")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--out", help="output directory (default: <run>/samples/cli)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--png", action="store_true", help="also write one PNG per image")
    p.add_argument("--npz", action="store_true", help="also write an ADM-style samples.npz (arr_0, labels, seeds)")
    p.add_argument("--mp4", action="store_true", help="videos: also write video.mp4 (needs dfm[video])")
    p.add_argument("--no-grid", action="store_true")
    p.add_argument("--no-progression", action="store_true")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.set_defaults(func=run_sample)


def numbers(text: str | None, flag: str, kind: type = float, example: str = "0.7") -> list | None:
    """A comma-separated list of numbers of a flag, or None when the flag was not given."""
    if text is None:
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give comma-separated numbers, e.g. {flag} {example}") from None


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        try:
            prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        except OSError as err:
            raise ValueError(f"--prompts {args.prompts}: cannot read it ({err.strerror})") from None
    return prompts


def _gather_on_rank0(d, images, previews):
    """All ranks' samples on rank 0 (object gather works for gloo and nccl); None on the other ranks."""
    gathered = [None] * d.world if d.main else None
    dist.gather_object((images, previews), gathered, dst=0)
    finish_distributed()
    if not d.main:
        return None
    return torch.cat([g[0] for g in gathered]), [torch.cat([g[1][i] for g in gathered]) for i in range(len(previews))]


def run_sample(args) -> int:
    d = init_distributed()
    prompts = _read_prompts(args)
    seeds = parse_seeds(args.seeds or (f"0-{len(prompts) - 1}" if prompts else "0-63"))
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    run = Run.open(args.run)
    gen = Generator.from_run(run, ema=not args.no_ema, checkpoint=args.checkpoint, device=d.device)
    if prompts and not gen.text_conditioned:
        raise ValueError("--prompt/--prompts: this run is not text-conditioned (it takes --classes)")
    if gen.text_conditioned and not prompts:
        raise ValueError("this run is text-to-image: give --prompt TEXT (repeatable) or --prompts FILE")
    if gen.text_conditioned and args.classes:
        raise ValueError("--classes: this run is text-to-image; give --prompt TEXT instead")
    settings = gen.settings(steps=numbers(args.steps, "--steps", int, "30,10"),
                            thresholds=numbers(args.thresholds, "--thresholds"),
                            guidance=numbers(args.guidance, "--guidance", example="1.5"), solver=args.solver,
                            time_shift=args.time_shift)  # fmt: skip
    labels = gen.labels(seeds, numbers(args.classes, "--classes", int, "0,1,2") if args.classes else None)
    out = Path(args.out or Path(args.run) / "samples" / "cli")
    if d.main:
        ensure_writable(out)
        if not gen.previews_exact:
            print("note: the stage previews of this latent run are approximate (the partial latent is upsampled, "
                  "then decoded); a scale-equivariant autoencoder (dfm autoencoder finetune) makes them exact",
                  file=sys.stderr)  # fmt: skip
    mine = shard(list(range(len(seeds))), d.rank, d.world)
    if gen.text_conditioned:
        chosen = encode_prompts(run, prompts, len(seeds), d.device)[torch.tensor(mine, dtype=torch.long)]
    else:
        chosen = None if labels is None else [labels[i] for i in mine]
    result = gen.generate([seeds[i] for i in mine], chosen, settings, batch_size=args.batch_size,
                          precision=args.precision, progress=d.main)  # fmt: skip
    images, previews = result.images, result.previews
    if d.world > 1:
        gathered = _gather_on_rank0(d, images, previews)
        if gathered is None:
            return 0
        images, previews = gathered
    written = write_outputs(
        images, previews, seeds, labels, out, grid=not args.no_grid, pngs=args.png or gen.text_conditioned,
        npz=args.npz, progression=not args.no_progression, mp4=args.mp4, crop=gen.spec.padding,
        nrow=grid_columns(min(len(images), 256), gen.num_classes),
    )  # fmt: skip
    ckpt = run.checkpoint(args.checkpoint)
    save_json(out / "sampling.json", {
        "run": str(args.run),
        "checkpoint": str(ckpt) if ckpt else None,  # None: a save_pretrained directory
        "ema": run.weights_are_ema(not args.no_ema),  # the weights really used: a run without an EMA has none
        "seeds": args.seeds,
        "count": len(seeds),
        "classes": args.classes,
        "prompts": [prompts[i % len(prompts)] for i in range(len(seeds))] if prompts else None,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in vars(settings).items()},  # the sampler as used
        "network_evaluations": gen.network_evaluations(settings),
        "precision": args.precision,
        "method": run.config.method.name,
        "decomposition": repr(gen.method.decomposition(run.config.method)),
        "cropped_padding": gen.spec.padding,
    })  # fmt: skip
    for kind, path in written.items():
        print(f"{kind:16s} {path}")
    return 0
