"""The ``dfm`` command line: ``dfm train``, ``dfm sample``, ``dfm eval``, ``dfm prepare``, ``dfm presets``.

Errors a user can cause end the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
from pathlib import Path

from dfm.autoencoder import add_autoencoder_parser
from dfm.bench.cli import add_bench_parser
from dfm.checkpoint import describe_os_error
from dfm.config import RunConfig
from dfm.data.photos import add_data_parser
from dfm.data.prepare import add_prepare_parser
from dfm.eval.cli import add_eval_parser
from dfm.finetune import diffusers_finetune_config, finetune_config
from dfm.presets import PRESETS, get_preset, with_method
from dfm.refine_command import add_refine_parser, add_upscale_parser
from dfm.resolve import apply_overrides
from dfm.run import CONFIG_FILE, Run
from dfm.sample_command import add_sample_parser
from dfm.training import Trainer, TrainingError, finish_distributed, init_distributed

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
    if args.method == "dfm" and cfg.method.name != "dfm":
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
    if args.classes is not None and not args.classes.strip(" ,"):
        raise ValueError(f"--classes {args.classes!r}: give the classes to train on, e.g. 5,6,7,8,9 (leave --classes "
                         "out to train on every class)")  # fmt: skip
    out = args.out or f"runs/finetune-{args.method}"
    ov = _flag_overrides(args, classes="data.classes", precision="train.precision")
    saved = Path(out) / CONFIG_FILE
    if args.resume not in (None, "", "none") and not source.exists() and saved.is_file():
        # The run's own config.json holds everything it needs, and its checkpoints the weights: no source to read.
        cfg = apply_overrides(RunConfig.load(saved), [f"train.steps={args.steps}", *ov, *args.override])
        return _fit(cfg, out, args)
    try:
        source_run = Run.open(source)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"--from {source}: expected a run directory or its pretrained/ directory ({err})"
        ) from None
    cfg = finetune_config(source_run.config, args.method, args.steps, args.like,
                          source_video=len(source_run.spec.sample_shape) == 4)  # fmt: skip
    cfg = apply_overrides(cfg, [f"train.init_from={source}", *ov, *args.override])
    return _fit(cfg, out, args)


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


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="try a trained model in the browser, watching it generate coarse to fine",
                       description="A local web page with the model's controls; each stage's preview appears as "
                       "soon as the stage reaches its threshold. Needs `pip install 'dfm[serve]'`.")  # fmt: skip
    p.add_argument("run", help="a run directory or its pretrained/ directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                   "another address needs --allow-remote)")  # fmt: skip
    p.add_argument("--allow-remote", action="store_true", help="allow a --host beyond the loopback (e.g. 0.0.0.0): "
                   "every request then needs the token printed in the URL at start")  # fmt: skip
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
    serve(args.run, args.host, args.port, args.device, allow_remote=args.allow_remote)
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
                f"{name:20s} {c.method.name:9s} {c.model.name:14s} data={c.data.dataset} steps={c.train.steps} "
                f"batch={c.train.batch_size}"
            )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfm", description="Decomposable Flow Matching")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_finetune(sub)
    add_sample_parser(sub)
    add_refine_parser(sub)
    add_upscale_parser(sub)
    _add_presets(sub)
    _add_serve(sub)
    add_autoencoder_parser(sub)
    add_bench_parser(sub)
    add_eval_parser(sub)
    add_prepare_parser(sub)
    add_data_parser(sub)
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
