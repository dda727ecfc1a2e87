"""Command line for evaluation: `dfm eval score|ref|train-classifier|list` (also `python -m dfm.eval`)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from dfm.checkpoint import atomic_write_text, describe_os_error, ensure_writable
from dfm.eval.evaluate import EvalConfig, build_reference, evaluate
from dfm.eval.extractors import EXTRACTORS
from dfm.eval.extractors.classifier import train_fashion_classifier
from dfm.eval.images import load_fashion_mnist
from dfm.eval.reference import save_reference
from dfm.eval.swd import SWDConfig

__all__ = ["add_eval_parser", "run_eval", "main"]

_COMMANDS = ("score", "ref", "train-classifier", "list")


def _weights_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(
            f"--weights expects NAME=PATH (e.g. inception-v3=/path/pt_inception.pth), got {text!r}"
        )
    return name, path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--num-samples", type=_positive_int, default=None, help="use only the first N images")
    parser.add_argument(
        "--weights",
        type=_weights_arg,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="weights file of an extractor (repeatable); else $DFM_<NAME>_WEIGHTS or a download",
    )
    parser.add_argument("--no-download", action="store_true", help="never try to download weights")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval` and its sub-commands on an argparse subparsers object; returns the eval parser."""
    parser = subparsers.add_parser(
        "eval",
        help="score samples (FDD, FID, IS, precision/recall, SWD, ...)",
        description="Evaluate generated samples against a reference. See docs/evaluation.md.",
    )
    commands = parser.add_subparsers(dest="eval_command", metavar="{score,ref,train-classifier,list}")
    commands.required = True

    score = commands.add_parser("score", help="score a folder of PNGs or an ADM-style .npz against a reference")
    score.add_argument("samples", help="folder of PNG/JPEG images, or .npz with key arr_0 (uint8 NHWC)")
    score.add_argument(
        "--ref",
        action="append",
        default=[],
        help="reference: fashion-mnist[:train|:test|:val], a folder, an image .npz, or statistics from `dfm eval ref` "
        "(repeatable: one statistics file per extractor)",
    )
    score.add_argument(
        "--metrics",
        default="fdd,fid,is",
        help="comma-separated: fid, fdd, fvd, is, pr, swd, sigma, accuracy, clip, temporal, seams[:<patch px>], "
        "fd:<extractor>, is:<extractor>, pr:<extractor> (default fdd,fid,is)",
    )
    score.add_argument("--num-ref", type=_positive_int, default=None, help="use only the first N reference images")
    score.add_argument("--out", default=None, help="JSON output (default: scores.json next to the samples)")
    score.add_argument("--pr-k", type=_positive_int, default=3, help="neighbours for precision/recall (default 3)")
    score.add_argument(
        "--is-splits", type=_positive_int, default=10, help="splits for the Inception Score (default 10)"
    )
    score.add_argument("--swd-max-images", type=_positive_int, default=8192, help="images per set for the SWD")
    score.add_argument(
        "--swd-min-resolution",
        type=_positive_int,
        default=16,
        help="coarsest SWD (and sigma) level (default 16 as in progressive GANs; 8 gives 28 and 14 px levels on 28 px "
        "images)",
    )
    score.add_argument("--seed", type=int, default=0, help="seed of the SWD patch and direction draws")
    score.add_argument("--prompts", default=None, help="text file, one prompt per sample, for the clip metric")
    _add_common(score)

    ref = commands.add_parser("ref", help="build reference statistics (.npz with mu, sigma, count, protocol)")
    ref.add_argument("source", help="fashion-mnist[:train|:test|:val], a folder of images, or an image .npz")
    ref.add_argument("--extractor", required=True, help="feature extractor name (see `dfm eval list`)")
    ref.add_argument("--out", required=True, help="output .npz")
    ref.add_argument("--save-features", action="store_true", help="also store the features (for precision/recall)")
    _add_common(ref)

    train = commands.add_parser("train-classifier", help="train the Fashion-MNIST domain classifier (deterministic)")
    train.add_argument("--out", required=True, help="output .safetensors")
    train.add_argument("--root", default=None, help="folder with the Fashion-MNIST idx files")
    train.add_argument("--epochs", type=_positive_int, default=2, help="epochs (default 2)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--threads", type=_positive_int, default=2, help="CPU threads, fixed for determinism (default 2)"
    )

    commands.add_parser("list", help="list the feature extractors")
    parser.set_defaults(handler=run_eval, func=run_eval)  # `func` is what dfm.cli dispatches on
    return parser


def _score(args: argparse.Namespace) -> dict:
    config = EvalConfig(
        metrics=[m.strip() for m in args.metrics.split(",") if m.strip()],
        num_samples=args.num_samples,
        num_reference=args.num_ref,
        batch_size=args.batch_size,
        device=args.device,
        weights=dict(args.weights),
        download=not args.no_download,
        pr_k=args.pr_k,
        is_splits=args.is_splits,
        swd=replace(SWDConfig(), seed=args.seed, min_resolution=args.swd_min_resolution),
        swd_max_images=args.swd_max_images,
        prompts_file=args.prompts,
        progress=not args.no_progress,
    )
    samples = Path(args.samples)
    out = Path(args.out) if args.out else (samples if samples.is_dir() else samples.parent) / "scores.json"
    ensure_writable(out.parent)  # before the long part, not after it
    result = evaluate(args.samples, args.ref, config)
    atomic_write_text(out, json.dumps(result, indent=2, sort_keys=True))
    for name, value in result["scores"].items():
        print(f"{name:>24s}  {value:.6g}")
    print(f"scores and protocol written to {out}")
    return result


def _ref(args: argparse.Namespace) -> None:
    weights = dict(args.weights).get(args.extractor)
    reference = build_reference(
        args.source,
        args.extractor,
        args.num_samples,
        args.batch_size,
        args.device,
        weights,
        args.save_features,
        not args.no_download,
        not args.no_progress,
    )
    path = save_reference(args.out, reference)
    print(f"{args.extractor} statistics of {reference.stats.count} images written to {path}")


def _train_classifier(args: argparse.Namespace) -> None:
    images, labels = load_fashion_mnist(args.root, "train")
    test_images, test_labels = load_fashion_mnist(args.root, "test")
    summary = train_fashion_classifier(
        args.out,
        images[:, None],
        labels,
        test_images[:, None],
        test_labels,
        epochs=args.epochs,
        seed=args.seed,
        threads=args.threads,
    )
    print(json.dumps(summary, indent=2))
    print(f"test accuracy {summary['test_accuracy']:.4f}; classifier written to {args.out}")


def _list() -> None:
    for name, entry in sorted(EXTRACTORS.items()):
        env = f"  (weights: ${entry.env_var})" if entry.env_var else ""
        print(f"{name:>20s}  {entry.description}{env}")


def run_eval(args: argparse.Namespace) -> int:
    """Handler of `dfm eval`: run the chosen sub-command; user errors become one line on stderr, exit 2."""
    try:
        if args.eval_command == "score":
            _score(args)
        elif args.eval_command == "ref":
            _ref(args)
        elif args.eval_command == "train-classifier":
            _train_classifier(args)
        else:
            _list()
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"dfm eval: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a read-only folder, a full disk...
        print(f"dfm eval: error: {describe_os_error(error)}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dfm.eval ...`: the same sub-commands as `dfm eval ...`."""
    parser = argparse.ArgumentParser(prog="python -m dfm.eval")
    subparsers = parser.add_subparsers(dest="command")
    add_eval_parser(subparsers)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in _COMMANDS:
        argv.insert(0, "score")  # `python -m dfm.eval SAMPLES ...` is short for `... score SAMPLES ...`
    args = parser.parse_args(["eval", *argv])
    return args.handler(args)
