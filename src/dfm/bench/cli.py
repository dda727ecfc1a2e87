"""Command line of the benchmarks: `dfm bench speed` and `dfm bench quality` (also `python -m dfm.bench ...`).

Register it on the main parser with ``add_bench_parser(subparsers)``; `dfm bench quality` comes from
:mod:`dfm.bench.quality`. torch is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from dfm.bench.quality import add_quality_parser
from dfm.bench.speed import SpeedSettings, run_speed
from dfm.bench.speed_report import markdown_report, write_report

__all__ = ["add_bench_parser", "add_speed_parser", "main", "run_speed_command"]


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected HxWxC or TxHxWxC with positive sizes, e.g. 32x32x4, got {text!r}")
    return shape


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 30,10, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.7, got {text!r}") from None


def add_speed_parser(commands) -> argparse.ArgumentParser:
    """Register `speed` on the sub-parsers of `bench`."""
    p = commands.add_parser(
        "speed",
        help="cost of DFM vs Flow Matching: params, FLOPs, training step, sampling, memory, MFU",
        description="DFM (2 stages, Laplacian pyramid) against Flow Matching (1 stage) on the same backbone and "
        "token count, side by side with their ratios (the paper's Table 2). The two methods run interleaved, "
        "round by round; medians and the median of per-round ratios are reported.",
    )
    p.add_argument("--model", default="DiT-Mini", help="registry name of the backbone, e.g. DiT-S/2 (default "
                   "DiT-Mini, ~2 minutes on 2 CPU cores); stage factors are set per method")  # fmt: skip
    p.add_argument("--input", type=_shape, default=None, metavar="HxWxC",
                   help="finest-level input, e.g. 32x32x4 (a 256 px latent); default: the model's own")  # fmt: skip
    p.add_argument("--batch", type=int, default=8, help="samples per step (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="un-timed training rounds (sampling: 1) (default 2)")
    p.add_argument("--repeats", type=int, default=10, help="timed training rounds (default 10)")
    p.add_argument("--sample-repeats", type=int, default=3, help="timed sampling rounds (default 3)")
    p.add_argument("--steps", type=_ints, default=(30, 10),
                   help="DFM Euler steps per stage; FM gets their sum (default 30,10)")  # fmt: skip
    p.add_argument("--thresholds", type=_floats, default=(0.7,), help="DFM stage thresholds (default 0.7)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast (default fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (compiled in the warm-up)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="MFU denominator; default: the GPU's dense bf16 peak from its name")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for speed.json and speed.md")
    p.set_defaults(func=run_speed_command, handler=run_speed_command)
    return p


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` and its sub-commands on an argparse subparsers object; returns the bench parser."""
    parser = subparsers.add_parser(
        "bench",
        help="benchmark the method (speed: cost of DFM vs Flow Matching; quality: the four methods at equal compute)",
        description="Benchmarks of DFM against Flow Matching. See docs/RESULTS.md.",
    )
    commands = parser.add_subparsers(dest="bench_command", metavar="{speed,quality}")
    commands.required = True
    add_speed_parser(commands)
    add_quality_parser(commands)
    return parser


def _command_line() -> str:
    """How this process was started, for the report: `dfm bench ...` or `python -m dfm.bench ...`."""
    argv0 = Path(sys.argv[0]).name
    prog = "python -m dfm.bench" if argv0 == "__main__.py" else argv0
    return " ".join([prog, *(shlex.quote(a) for a in sys.argv[1:])])


def run_speed_command(args: argparse.Namespace) -> int:
    """Run `bench speed` from parsed arguments: print the Markdown table, write JSON + Markdown with --out."""
    settings = SpeedSettings(
        model=args.model,
        input_shape=args.input,
        batch=args.batch,
        warmup=args.warmup,
        repeats=args.repeats,
        sample_repeats=args.sample_repeats,
        steps=args.steps,
        thresholds=args.thresholds,
        precision=args.precision,
        compile=args.compile,
        device=args.device,
        threads=args.threads,
        memory=not args.no_memory,
        peak_tflops=args.peak_tflops,
        seed=args.seed,
    )
    command = getattr(args, "command_line", None) or _command_line()
    result = run_speed(settings, command, log=lambda message: print(message, file=sys.stderr, flush=True))
    print(markdown_report(result), end="")
    if args.out:
        json_path, md_path = write_report(result, args.out)
        print(f"\nwrote {json_path} and {md_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dfm.bench ...`: the same sub-commands as `dfm bench ...`."""
    parser = argparse.ArgumentParser(prog="python -m dfm.bench")
    subparsers = parser.add_subparsers(dest="command")
    add_bench_parser(subparsers)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(["bench", *argv])
    args.command_line = " ".join(["python -m dfm.bench", *(shlex.quote(a) for a in argv)])
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"dfm bench {args.bench_command}: error: {err}", file=sys.stderr)
        return 2
