"""``dfm sample``: images (or clips) from a run or a save_pretrained directory, through :class:`dfm.generate.Generator`.

Seeds are taken shard by shard (:data:`SHARD` at a time) and the outputs are written as they come, so any number
of seeds runs in bounded memory; what the outputs would need on disk is checked before anything is drawn. With
torchrun, every rank draws a contiguous part of each shard and rank 0 writes; an image depends on its seed, not on
the rank that drew it.

``--until-stage K`` stops every sampling when stage K reaches its threshold: it writes the stage-K previews and the
state of every seed (``state/``), and ``dfm refine OUT --pick SEEDS`` finishes the chosen ones
(:mod:`dfm.refine_command`). ``--vary SEED`` keeps the coarse level of the image of SEED and draws its finer
levels again from each of ``--seeds``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from dfm.checkpoint import ensure_writable
from dfm.generate import Generation, Generator, encode_prompts, parse_seeds, shard
from dfm.outputs import SampleWriter, crop_border, save_json
from dfm.run import Run
from dfm.training.distributed import Dist, finish_distributed, init_distributed
from dfm.visual import grid_columns, save_png, to_uint8

SHARD = 4096  #: seeds drawn (over all ranks) before their outputs are written
STATE_DIR, STATE_FILE = "state", "state.json"


def add_sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate images from a run or a save_pretrained directory")
    p.add_argument("run", help="run directory (uses its latest checkpoint) or a save_pretrained directory")
    p.add_argument("--seeds", help="one image per seed, e.g. 0-49999 or 1,5,9 (default 0-63; with prompts, one "
                   "seed per prompt: 0-<prompts - 1>)")  # fmt: skip
    p.add_argument("--classes", help="class per image, cycled: e.g. 3 or 0,1,2 (default: seed %% number of classes)")
    p.add_argument("--prompt", action="append", default=[], help="text-to-image runs (FLUX / SD3): a prompt, "
                   "repeatable; prompts are cycled over the seeds")  # fmt: skip
    p.add_argument("--prompts", help="text-to-image runs: a file with one prompt per line")
    p.add_argument("--until-stage", type=int, metavar="K", help="stop when stage K (1 = the coarsest) reaches its "
                   "threshold: write its previews and the state of every seed, then finish the ones you pick with "
                   "dfm refine OUT --pick SEEDS")  # fmt: skip
    p.add_argument("--vary", type=int, metavar="SEED", help="variations of the image of SEED: keep its coarse "
                   "level(s), draw the finer levels again from each of --seeds (default 0-15)")  # fmt: skip
    p.add_argument("--keep", type=int, default=1, help="with --vary: how many coarse levels to keep (default 1)")
    add_sampler_flags(p)
    p.add_argument("--checkpoint", help="a specific checkpoint directory of the run")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--out", help="output directory (default: <run>/samples/cli)")
    add_output_flags(p)
    p.set_defaults(func=run_sample)


def add_sampler_flags(p) -> None:
    p.add_argument("--time-shift", action="store_true", default=None, help="FLUX's resolution-dependent time shift "
                   "of the sampling grid (sampler.time_shift)")  # fmt: skip
    p.add_argument("--shift", type=float, help="SD3's constant shift of the sampling grid: below 1 more steps near "
                   "the data, above 1 more at high noise (sampler.shift, default 1 = none)")  # fmt: skip
    p.add_argument("--shift-from", type=int, help="the first stage --shift warps, 0-based; -1 = the finest only "
                   "(sampler.shift_from, default 0 = every stage)")  # fmt: skip
    p.add_argument("--guidance", help="classifier-free guidance: one scale, or one per stage like 1.0,2.0 "
                   "(sampler.guidance)")  # fmt: skip
    p.add_argument("--steps", help="sampling steps per stage, e.g. 30,10 (sampler.steps)")
    p.add_argument(
        "--thresholds",
        help="stage thresholds, e.g. 0.7 (sampler.thresholds; DFM only: Pyramidal Flow "
        "and the cascade run each stage on its own time grid)",
    )
    p.add_argument("--solver", choices=["euler", "heun"], help="sampler.solver")


def add_output_flags(p) -> None:
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--png", action="store_true", help="also write one PNG per image")
    p.add_argument("--npz", action="store_true", help="also write an ADM-style samples.npz (arr_0, labels, seeds)")
    p.add_argument("--mp4", action="store_true", help="videos: also write video.mp4 (needs dfm[video])")
    p.add_argument("--no-grid", action="store_true")
    p.add_argument("--no-progression", action="store_true")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")


def numbers(text: str | None, flag: str, kind: type = float, example: str = "0.7") -> list | None:
    """A comma-separated list of numbers of a flag, or None when the flag was not given."""
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{flag} {text!r}: give comma-separated numbers, e.g. {flag} {example}")
    return values


def sampler_settings(gen: Generator, args) -> Any:
    """The sampler of the command's flags, checked (:meth:`dfm.generate.Generator.settings`)."""
    return gen.settings(steps=numbers(args.steps, "--steps", int, "30,10"),
                        thresholds=numbers(args.thresholds, "--thresholds"),
                        guidance=numbers(args.guidance, "--guidance", example="1.5"), solver=args.solver,
                        time_shift=args.time_shift, shift=args.shift, shift_from=args.shift_from)  # fmt: skip


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        try:
            prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        except OSError as err:
            raise ValueError(f"--prompts {args.prompts}: cannot read it ({err.strerror})") from None
    return prompts


def label_function(gen: Generator, classes: Sequence[int] | None) -> Callable[[int, int], int] | None:
    """``label(index, seed)`` of the image at ``index``: ``classes`` cycled, else ``seed % num_classes``."""
    gen.labels([0], classes)  # checks the classes against the model
    if gen.num_classes == 0:
        return None
    if classes:
        return lambda i, seed: int(classes[i % len(classes)])
    return lambda i, seed: int(seed) % gen.num_classes


def run_sample(args) -> int:
    d = init_distributed()
    prompts = _read_prompts(args)
    seeds = parse_seeds(args.seeds or (f"0-{len(prompts) - 1}" if prompts else "0-15" if args.vary is not None
                                       else "0-63"))  # fmt: skip
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    if args.until_stage is not None and args.vary is not None:
        raise ValueError("--until-stage and --vary: choose one")
    run = Run.open(args.run)
    gen = Generator.from_run(run, ema=not args.no_ema, checkpoint=args.checkpoint, device=d.device)
    if prompts and not gen.text_conditioned:
        raise ValueError("--prompt/--prompts: this run is not text-conditioned (it takes --classes)")
    if gen.text_conditioned and not prompts:
        raise ValueError("this run is text-to-image: give --prompt TEXT (repeatable) or --prompts FILE")
    if gen.text_conditioned and args.classes:
        raise ValueError("--classes: this run is text-to-image; give --prompt TEXT instead")
    settings = sampler_settings(gen, args)
    classes = numbers(args.classes, "--classes", int, "0,1,2") if args.classes else None
    label = label_function(gen, classes)
    until = None if args.until_stage is None else gen.check_stage(args.until_stage - 1, "--until-stage")
    base_label = None
    if args.vary is not None:
        gen.check_keep(args.keep)
        base_label = None if label is None else label(0, args.vary)
    out = Path(args.out or Path(args.run) / "samples" / "cli")
    writer = None
    if d.main:
        ensure_writable(out)
        if not gen.previews_exact:
            print("note: the stage previews of this latent run are approximate (the partial latent is upsampled, "
                  "then decoded); a scale-equivariant autoencoder (dfm autoencoder finetune) makes them exact",
                  file=sys.stderr)  # fmt: skip
        shape, crop = gen.spec.sample_shape, gen.spec.padding
        if until is not None:  # the outputs are the stage's previews, at its resolution (and padding)
            shape = gen.sampler.decomposition.level_shapes((1, *shape))[until][1:]
            crop = crop * shape[-1] // gen.spec.sample_shape[-1]
        native = None if gen.decoder is not None else (shape[0], *crop_border(torch.zeros(1, *shape), crop).shape[2:])
        writer = SampleWriter(out, len(seeds), native, crop, grid=not args.no_grid, pngs=args.png or
                              gen.text_conditioned, npz=args.npz, progression=not args.no_progression, mp4=args.mp4,
                              nrow=grid_columns(min(len(seeds), 256), gen.num_classes))  # fmt: skip
        if until is not None:
            (out / STATE_DIR).mkdir(exist_ok=True)

    def draw(ids: list[int], positions: range) -> Generation:
        if gen.text_conditioned:
            return gen.generate(ids, encode_prompts(run, [prompts[i % len(prompts)] for i in positions], len(ids),
                                                    d.device), settings, batch_size=args.batch_size,
                                precision=args.precision)  # fmt: skip
        labels = None if label is None else [label(i, s) for i, s in zip(positions, ids)]
        if args.vary is not None:
            return gen.vary(args.vary, ids, base_label, settings, keep=args.keep, batch_size=args.batch_size,
                            precision=args.precision)  # fmt: skip
        return gen.generate(ids, labels, settings, batch_size=args.batch_size, precision=args.precision,
                            progress=d.main, until_stage=until)  # fmt: skip

    for number, start in enumerate(range(0, len(seeds), SHARD)):
        ids = seeds[start : start + SHARD]
        part = shard(range(len(ids)), d.rank, d.world)
        mine = draw([ids[i] for i in part], range(start + part[0], start + part[-1] + 1) if part else range(0))
        if d.world > 1:
            mine = _gather_on_rank0(d, mine)
        if mine is None:
            continue
        labels = None if label is None else [label(start + i, s) for i, s in enumerate(ids)]
        writer.add(mine.images, mine.previews, ids, labels)
        if until is not None:
            _save_state(out / STATE_DIR / f"shard_{number:05d}.safetensors", mine, ids, labels, start)
        if d.main and len(seeds) > SHARD:
            print(f"{min(start + SHARD, len(seeds)):,} / {len(seeds):,} images", file=sys.stderr)
    if d.world > 1:
        finish_distributed()
    if not d.main:
        return 0
    written = writer.close()
    if args.vary is not None:
        base = gen.generate([args.vary], None if base_label is None else [base_label], settings)
        written["base"] = str(save_png(to_uint8(gen.crop(base.images))[0], out / f"base_seed{args.vary:06d}.png"))
    ckpt = run.checkpoint(args.checkpoint)
    record = {
        "run": str(args.run),
        "checkpoint": str(ckpt) if ckpt else None,  # None: a save_pretrained directory
        "ema": run.weights_are_ema(not args.no_ema),  # the weights really used: a run without an EMA has none
        "seeds": repr(seeds),
        "count": len(seeds),
        "classes": args.classes,
        "prompts": prompts or None,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in vars(settings).items()},  # the sampler as used
        "network_evaluations": gen.network_evaluations(settings),
        "precision": args.precision,
        "batch_size": args.batch_size,
        "method": run.config.method.name,
        "decomposition": repr(getattr(gen.sampler, "decomposition", None)),
        "cropped_padding": gen.spec.padding,
        "until_stage": args.until_stage,
        "vary": None if args.vary is None else {"seed": args.vary, "keep": args.keep, "class": base_label},
    }
    save_json(out / "sampling.json", record)
    if until is not None:
        save_json(out / STATE_FILE, record)
        written["state"] = str(out / STATE_DIR)
    for kind, path in written.items():
        print(f"{kind:16s} {path}")
    if until is not None:
        print(f"finish the ones you like: dfm refine {out} --pick {seeds[0]},...", file=sys.stderr)
    return 0


def _save_state(path: Path, gen: Generation, seeds: Sequence[int], labels: Sequence[int] | None, start: int) -> None:
    """The stopped samplings of a shard (model space, float32), with their seeds, labels and positions (images
    ``start`` on: what picks their prompt)."""
    state = gen.state
    tensors = {f"level_{i}": lv.contiguous() for i, lv in enumerate(state.levels)}
    tensors.update({f"preview_{i}": p.contiguous() for i, p in enumerate(state.previews)})
    tensors["seeds"] = torch.tensor(list(seeds), dtype=torch.int64)
    tensors["positions"] = torch.arange(start, start + len(seeds), dtype=torch.int64)
    if labels is not None:
        tensors["labels"] = torch.tensor(list(labels), dtype=torch.int64)
    meta = {"step": str(state.step), "stage": str(state.stage)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata=meta)
    tmp.replace(path)


def _gather_on_rank0(d: Dist, part: Generation) -> Generation | None:
    """All ranks' part of a shard on rank 0 (object gather works for gloo and nccl); None on the other ranks."""
    gathered = [None] * d.world if d.main else None
    dist.gather_object(part, gathered, dst=0)
    if not d.main:
        return None
    parts = [g for g in gathered if g is not None and len(g.images)]
    images = torch.cat([g.images for g in parts])
    previews = [torch.cat([g.previews[i] for g in parts]) for i in range(len(parts[0].previews))]
    states = [g.state for g in parts if g.state is not None]
    from dfm.sampling import SamplingState

    return Generation(images, previews, SamplingState.cat(states) if states else None)


def read_state(out: Path) -> tuple[dict[str, Any], list[Path]]:
    """The record and the shard files of ``dfm sample --until-stage`` (what ``dfm refine`` reads)."""
    record_file, folder = out / STATE_FILE, out / STATE_DIR
    if not record_file.is_file() or not folder.is_dir():
        raise FileNotFoundError(f"{out} holds no sampling state ({STATE_FILE} and {STATE_DIR}/): write one with "
                                "dfm sample RUN --until-stage 1 --out DIR")  # fmt: skip
    try:
        record = json.loads(record_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{record_file} is damaged ({err.msg}): sample again with --until-stage") from None
    return record, sorted(folder.glob("shard_*.safetensors"))
