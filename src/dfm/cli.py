"""The ``dfm`` command line: ``dfm train``, ``dfm sample``, ``dfm eval``, ``dfm prepare``, ``dfm presets``.

Errors a user can cause end the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shlex
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dfm.autoencoder import add_autoencoder_parser
from dfm.bench.cli import add_bench_parser
from dfm.checkpoint import describe_os_error, ensure_writable
from dfm.config import PRESETS, RunConfig, apply_overrides, get_preset, validate_sampling, with_method
from dfm.data.prepare import add_prepare_parser
from dfm.eval.cli import add_eval_parser
from dfm.factory import make_decomposition
from dfm.finetune import diffusers_finetune_config, finetune_config
from dfm.generate import (
    METHOD_FILE,
    RUN_CONFIG,
    _data_spec,
    data_padding,
    default_labels,
    generate,
    load_run,
    make_decoder,
    parse_seeds,
    previews_exact,
    run_checkpoint,
    shard,
)
from dfm.outputs import save_json, write_outputs
from dfm.text import TextCondition
from dfm.train import Trainer, TrainingError, finish_distributed, init_distributed
from dfm.visual import grid_columns

__all__ = ["build_parser", "describe_os_error", "main"]


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a DFM or Flow Matching model",
        description="Train a model. Settings come from a preset, then --config, then -o overrides.",
    )
    p.add_argument(
        "--preset", default="quickstart", choices=sorted(PRESETS), help="named settings (default: quickstart)"
    )
    p.add_argument("--config", help="a config.json to start from instead of a preset")
    p.add_argument(
        "--method",
        choices=["dfm", "fm", "cascade", "pyramidal"],
        help="dfm (default), or a baseline: fm (Flow Matching), cascade, pyramidal (Pyramidal Flow)",
    )
    p.add_argument("--out", help="run directory (default: runs/<preset>[-<method>])")
    p.add_argument("--steps", type=int, help="optimiser steps (train.steps)")
    p.add_argument("--batch-size", type=int, help="global batch size (train.batch_size)")
    p.add_argument("--lr", type=float, help="learning rate (optim.lr)")
    p.add_argument("--seed", type=int, help="run seed (train.seed)")
    p.add_argument("--data", help="dataset: fashion-mnist, an image folder or a `dfm prepare` directory")
    p.add_argument("--data-dir", help="where built-in datasets live")
    p.add_argument("--model", help="model name from the registry, e.g. DFM-DiT-B/2")
    p.add_argument("--resume", help="'auto' (latest checkpoint of --out) or a checkpoint directory")
    p.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any setting, e.g. -o method.stage_probs=0.7,0.3 -o train.precision=fp32 (repeatable)",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="image folders: check every file at start and leave out unreadable ones with a warning (data.skip_bad)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


#: flags that `dfm train` and `dfm finetune` share, as the settings they set
_COMMON_FLAGS = {"batch_size": "train.batch_size", "lr": "optim.lr", "seed": "train.seed", "data": "data.dataset",
                 "data_dir": "data.data_dir"}  # fmt: skip


def _flag_overrides(args, **more: str) -> list[str]:
    """``section.key=value`` overrides for the flags given on the command line (common ones plus ``more``)."""
    pairs = {**_COMMON_FLAGS, **more}
    return [f"{key}={getattr(args, flag)}" for flag, key in pairs.items() if getattr(args, flag) is not None]


def _train_config(args) -> RunConfig:
    cfg = RunConfig.load(args.config) if args.config else get_preset(args.preset)
    if args.method == "dfm" and cfg.method.method != "dfm":
        raise ValueError("this preset is not a DFM preset: pick a DFM preset (e.g. quickstart) with --method dfm")
    if args.method:
        cfg = with_method(cfg, args.method)
    ov = _flag_overrides(args, steps="train.steps", model="model.name")
    if args.skip_bad:
        ov.append("data.skip_bad=true")
    return apply_overrides(cfg, ov + args.override)


def _run_train(args) -> int:
    cfg = _train_config(args)
    suffix = f"-{args.method}" if args.method and args.method != "dfm" and args.method not in cfg.preset else ""
    return _fit(cfg, args.out or f"runs/{cfg.preset or 'run'}{suffix}", args)


def _fit(cfg: RunConfig, out: str, args) -> int:
    """Train ``cfg`` into ``out`` (one process or a torchrun rank) and say where everything is."""
    d = init_distributed()
    trainer = Trainer(cfg, out, resume=args.resume, dist_info=d, progress=not args.no_progress)
    run = trainer.fit()
    # Release the (FSDP-sharded) modules, their hooks and pending collectives while the process group is alive:
    # torn down at interpreter exit after destroy_process_group, rank 1 sometimes aborted ("terminate called
    # without an active exception").
    del trainer
    gc.collect()
    finish_distributed()
    if d.main:
        print(f"run directory: {run}")
        print(f"  samples:     {run / 'samples'}")
        print(f"  loss curve:  {run / 'loss.png'}")
        how = '--prompt "..."' if cfg.model.backbone != "dit" else "--seeds 0-63"  # text models sample from prompts
        print(f"  model:       {run / 'pretrained'}   (dfm sample {run} {how})")
    return 0


def _add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained Flow Matching model as a DFM (or as Flow Matching, the baseline)",
        description="Start from a one-stage model (a --method fm run or its pretrained/ directory, or a diffusers "
        "FLUX / SD3 directory). --method dfm converts it into a DFM that is exactly the pretrained model at step 0 "
        "(its modules become the coarse stage's, the new stage starts at zero), then trains it with the method "
        "settings of --like; --method fm fine-tunes it as it is. The learning rate is a tenth of the pretrained "
        "run's unless --lr is given. A diffusers model trains with the paper's recipe (dfm.finetune."
        "diffusers_finetune_config) on captioned latents (dfm prepare --text-encoder).",
    )
    p.add_argument("--from", dest="source", required=True,
                   help="a run directory, a pretrained/ directory, or a diffusers FLUX / SD3 directory "
                   "(model_index.json + transformer/)")  # fmt: skip
    p.add_argument("--method", default="dfm", choices=["dfm", "fm"], help="dfm (default) or fm")
    p.add_argument("--like", default="quickstart", choices=sorted(PRESETS), help="DFM preset for the method settings")
    p.add_argument("--out", help="run directory (default: runs/finetune-<method>)")
    p.add_argument("--steps", type=int, default=800, help="optimiser steps (default 800)")
    p.add_argument("--batch-size", type=int, help="global batch size (default: the pretrained run's)")
    p.add_argument("--lr", type=float, help="learning rate (default: a tenth of the pretrained run's)")
    p.add_argument("--seed", type=int, help="run seed (train.seed)")
    p.add_argument("--data", help="the new data: fashion-mnist, an image folder or a `dfm prepare` directory")
    p.add_argument("--data-dir", help="where built-in datasets live")
    p.add_argument("--classes", help="train on these classes only, e.g. 5,6,7,8,9 (data.classes)")
    p.add_argument("--resume", help="'auto' (latest checkpoint of --out) or a checkpoint directory")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="train.precision (diffusers models: bf16 default)")
    p.add_argument("--lora", type=int, metavar="RANK", help="diffusers models: LoRA of this rank on the transformer "
                   "blocks (peft); the new stage modules always train fully")  # fmt: skip
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="diffusers models: recompute activations")
    p.add_argument("--ema", action="store_true", help="diffusers models: keep an EMA of the trainable weights "
                   "(off by default: it doubles the memory of a full fine-tune)")  # fmt: skip
    p.add_argument("-o", "--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any setting (repeatable)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_finetune)


def _run_finetune(args) -> int:
    source = Path(args.source)
    if (source / "model_index.json").is_file():
        return _run_finetune_diffusers(args, source)
    if args.lora is not None or args.gradient_checkpointing:
        raise ValueError(f"--lora and --gradient-checkpointing apply to diffusers FLUX / SD3 models, not to {source}")
    file = source / RUN_CONFIG if (source / "checkpoints").is_dir() else source / METHOD_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"--from {source}: expected a run directory or its pretrained/ directory ({file} missing)"
        )
    cfg = finetune_config(RunConfig.load(file), args.method, args.steps, args.like)
    ov = [f"train.init_from={source}", *_flag_overrides(args, classes="data.classes", precision="train.precision")]
    cfg = apply_overrides(cfg, ov + args.override)
    return _fit(cfg, args.out or f"runs/finetune-{args.method}", args)


def _run_finetune_diffusers(args, source: Path) -> int:
    """``dfm finetune --from <diffusers FLUX / SD3 directory>``: the paper's recipe on captioned latents."""
    if args.data is None:
        raise ValueError("--data: give the captioned latents of `dfm prepare --text-encoder` to fine-tune on")
    if args.classes:
        raise ValueError("--classes: a text-to-image model trains on captions, not classes; leave --classes out")
    cfg = diffusers_finetune_config(source, args.method, args.steps)
    ov = _flag_overrides(args, precision="train.precision", lora="model.lora_rank", lora_alpha="model.lora_alpha")
    if args.gradient_checkpointing:
        ov.append("model.gradient_checkpointing=true")
    if args.ema:
        ov.append("optim.ema=true")
    cfg = apply_overrides(cfg, ov + args.override)
    return _fit(cfg, args.out or f"runs/finetune-{cfg.model.backbone}-{args.method}", args)


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate images from a run or a save_pretrained directory")
    p.add_argument("run", help="run directory (uses its latest checkpoint) or a save_pretrained directory")
    p.add_argument("--seeds", help="one image per seed, e.g. 0-49999 or 1,5,9 (default 0-63; with prompts, one "
                   "seed per prompt: 0-<prompts - 1>)")  # fmt: skip
    p.add_argument("--classes", help="class per image, cycled: e.g. 3 or 0,1,2 (default: seed %% number of classes)")
    p.add_argument("--prompt", action="append", default=[], help="text-to-image runs (FLUX / SD3): a prompt, "
                   "repeatable; prompts are cycled over the seeds")  # fmt: skip
    p.add_argument("--prompts", help="text-to-image runs: a file with one prompt per line")
    p.add_argument("--time-shift", action="store_true", help="FLUX's resolution-dependent time shift of the "
                   "sampling grid (method.time_shift)")  # fmt: skip
    p.add_argument("--guidance", help="classifier-free guidance: one scale, or one per stage like 1.0,2.0")
    p.add_argument("--steps", help="sampling steps per stage, e.g. 30,10")
    p.add_argument("--thresholds", help="stage thresholds, e.g. 0.7")
    p.add_argument("--solver", choices=["euler", "heun"])
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
    p.set_defaults(func=_run_sample)


def _numbers(text: str | None, flag: str, kind: type = float, example: str = "0.7") -> list | None:
    if text is None:
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give comma-separated numbers, e.g. {flag} {example}") from None


def _sampling_settings(args, cfg: RunConfig) -> tuple[list[float] | None, list[int] | None, list[float] | None]:
    """--guidance, --steps and --thresholds, checked against the model's stages before any sampling."""
    stages = cfg.method.stages
    guidance = _numbers(args.guidance, "--guidance", example="1.5")
    steps = _numbers(args.steps, "--steps", int, example="30,10")
    thresholds = _numbers(args.thresholds, "--thresholds")
    if steps is not None and len(steps) != stages:
        raise ValueError(f"--steps {args.steps}: this model has {stages} stage(s), give one step count per stage")
    if thresholds is not None and len(thresholds) != stages - 1:
        raise ValueError(
            f"--thresholds {args.thresholds}: this model has {stages} stage(s), give {stages - 1} threshold(s)"
        )
    if guidance is not None and len(guidance) not in (1, stages):
        raise ValueError(f"--guidance {args.guidance}: give one scale, or one per stage ({stages})")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    m = cfg.method
    trial = dataclasses.replace(
        m, steps=tuple(steps or m.steps), thresholds=tuple(m.thresholds if thresholds is None else thresholds)
    )
    for g in guidance or [m.guidance]:
        validate_sampling(dataclasses.replace(trial, guidance=g))
    return guidance, steps, thresholds


def _sample_labels(classes: str | None, seeds: list[int], num_classes: int) -> list[int] | None:
    """One label per seed: ``--classes`` cycled over the seeds, else ``seed % num_classes``."""
    if not classes:
        return default_labels(seeds, num_classes)
    if num_classes == 0:
        raise ValueError("--classes: this model is unconditional (no classes); leave --classes out")
    chosen = _numbers(classes, "--classes", int, example="0,1,2")
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad or not chosen:
        raise ValueError(f"--classes {classes} out of range: this model has classes 0..{num_classes - 1}")
    return [chosen[i % len(chosen)] for i in range(len(seeds))]


def _gather_on_rank0(d, images, previews):
    """All ranks' samples on rank 0 (object gather works for gloo and nccl); None on the other ranks."""
    gathered = [None] * d.world if d.main else None
    dist.gather_object((images, previews), gathered, dst=0)
    finish_distributed()
    if not d.main:
        return None
    return torch.cat([g[0] for g in gathered]), [torch.cat([g[1][i] for g in gathered]) for i in range(len(previews))]


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        try:
            prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        except OSError as err:
            raise ValueError(f"--prompts {args.prompts}: cannot read it ({err.strerror})") from None
    return prompts


def _encode_prompts(cfg: RunConfig, prompts: list[str], seeds: list[int], device) -> TextCondition:
    """One text condition per seed (prompts cycled), encoded once per prompt with the encoder that prepared the
    training captions (recorded in the latents' JSON)."""
    from dfm import text
    from dfm.data.latents import read_latent_info

    info = read_latent_info(cfg.data.dataset).get("text") or {}
    encoder = text.load_text_encoder(info["encoder"], int(info["max_length"]), device)
    encoded = encoder(prompts)
    return encoded[torch.tensor([i % len(prompts) for i in range(len(seeds))])]


def _run_sample(args) -> int:
    d = init_distributed()
    prompts = _read_prompts(args)
    seeds = parse_seeds(args.seeds or (f"0-{len(prompts) - 1}" if prompts else "0-63"))
    out = Path(args.out or Path(args.run) / "samples" / "cli")
    model, cfg = load_run(args.run, ema=not args.no_ema, checkpoint=args.checkpoint, device=d.device)
    if args.time_shift:
        cfg.method.time_shift = True
    if d.main:
        ensure_writable(out)
    num_classes = model.num_classes
    text_model = hasattr(model, "null_condition")
    if prompts and not text_model:
        raise ValueError("--prompt/--prompts: this run is not text-conditioned (it takes --classes)")
    if text_model and not prompts:
        raise ValueError("this run is text-to-image: give --prompt TEXT (repeatable) or --prompts FILE")
    if text_model and args.classes:
        raise ValueError("--classes: this run is text-to-image; give --prompt TEXT instead")
    guidance, steps, thresholds = _sampling_settings(args, cfg)
    labels = _sample_labels(args.classes, seeds, num_classes)
    conditions = _encode_prompts(cfg, prompts, seeds, d.device) if text_model else None
    decomposition = make_decomposition(cfg.method)
    mine = shard(list(range(len(seeds))), d.rank, d.world)
    decoder = make_decoder(cfg, d.device)
    if d.main and not previews_exact(decoder):
        note = (
            "note: the stage previews of this latent run are approximate (the partial latent is upsampled, "
            "then decoded); a scale-equivariant autoencoder (dfm autoencoder finetune) makes them exact"
        )
        print(note, file=sys.stderr)
    if text_model:
        shape, chosen = _data_spec(cfg, Path(args.run))[0], conditions[torch.tensor(mine, dtype=torch.long)]
    else:
        shape = (model.config.in_channels, *model.config.input_size)
        chosen = None if labels is None else [labels[i] for i in mine]
    images, previews = generate(
        model,
        decomposition,
        cfg,
        shape,
        chosen,
        [seeds[i] for i in mine],
        guidance=None if guidance is None else (guidance[0] if len(guidance) == 1 else guidance),
        steps=steps,
        thresholds=thresholds,
        solver=args.solver,
        batch_size=args.batch_size,
        device=d.device,
        precision=args.precision,
        decoder=decoder,
        progress=d.main,
    )
    if d.world > 1:
        gathered = _gather_on_rank0(d, images, previews)
        if gathered is None:
            return 0
        images, previews = gathered
    crop = data_padding(cfg, args.run)
    written = write_outputs(
        images, previews, seeds, labels, out, grid=not args.no_grid, pngs=args.png or text_model, npz=args.npz,
        progression=not args.no_progression, mp4=args.mp4, crop=crop,
        nrow=grid_columns(min(len(images), 256), num_classes),
    )  # fmt: skip
    ckpt = run_checkpoint(args.run, args.checkpoint)
    settings = {
        "run": str(args.run),
        "checkpoint": str(ckpt) if ckpt else None,  # None: a pretrained directory
        "seeds": args.seeds,
        "count": len(seeds),
        "classes": args.classes,
        "prompts": [prompts[i % len(prompts)] for i in range(len(seeds))] if prompts else None,
        "time_shift": cfg.method.time_shift,
        "guidance": guidance or cfg.method.guidance,
        "steps": steps or list(cfg.method.steps),
        "thresholds": thresholds if thresholds is not None else list(cfg.method.thresholds),
        "solver": args.solver or cfg.method.solver,
        "ema": not args.no_ema,
        "precision": args.precision,
        "method": cfg.method.method,
        "decomposition": repr(decomposition),
        "cropped_padding": crop,
    }
    save_json(out / "sampling.json", settings)
    for kind, path in written.items():
        print(f"{kind:16s} {path}")
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="try a trained model in the browser, watching it generate coarse to fine",
                       description="A local web page with the model's controls; each stage's preview appears as "
                       "soon as the stage reaches its threshold. Needs `pip install 'dfm[serve]'`.")  # fmt: skip
    p.add_argument("run", help="a run directory or its pretrained/ directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
    try:
        from dfm.serve import serve  # optional: fastapi and uvicorn (dfm[serve])
    except ImportError as err:
        raise ImportError(f"dfm serve needs fastapi and uvicorn: pip install 'dfm[serve]' ({err})") from None
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: choose a port between 1 and 65535")
    serve(args.run, args.host, args.port, args.device)
    return 0


def _add_presets(sub) -> None:
    p = sub.add_parser("presets", help="list presets, or print one as JSON")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_run_presets)


def _run_presets(args) -> int:
    if args.name:
        print(json.dumps(get_preset(args.name).to_dict(), indent=2))
    else:
        for name in PRESETS:
            c = get_preset(name)
            print(
                f"{name:20s} {c.method.method:9s} {c.model.name:14s} data={c.data.dataset} steps={c.train.steps} "
                f"batch={c.train.batch_size}"
            )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfm", description="Decomposable Flow Matching")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_finetune(sub)
    _add_sample(sub)
    _add_presets(sub)
    _add_serve(sub)
    add_autoencoder_parser(sub)
    add_bench_parser(sub)
    add_eval_parser(sub)
    add_prepare_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["dfm", *argv])  # how the run was asked for, for reports
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ImportError, TrainingError) as err:
        print(f"dfm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine, not the code: a read-only folder, a full disk, a file-size limit
        print(f"dfm {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dfm {args.command}: interrupted (the last checkpoint is intact)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
