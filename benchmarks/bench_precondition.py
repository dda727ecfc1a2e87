"""What per-stage preconditioning costs: the full DFM training step with ``precondition`` on and off.

The preconditioning is a per-element scaling of each stage's input and output (``c_in``, ``c_skip``, ``c_out``),
so its FLOPs are negligible next to the DiT's matrix products; this measures the wall time of the whole step
(decompose, draw, forward, loss, backward, AdamW), the two variants interleaved round by round so that a load
change on a shared machine hits both. Same weights, same batch, same draws.

Run: ``python benchmarks/bench_precondition.py --threads 1`` (about a minute); ``--help`` for sizes.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from dfm.bench.measure import cpu_name, time_interleaved
from dfm.decomposition import LaplacianPyramid, estimate_level_std
from dfm.models import create_model
from dfm.objective import DFMObjective


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="DFM-DiT-Tiny", help="registry name (default: the quick start's)")
    parser.add_argument("--size", type=int, default=32, help="image side (default 32, 1 channel)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    pyramid = LaplacianPyramid(2)
    x = torch.randn(args.batch, 1, args.size, args.size).clamp(-1, 1)
    y = torch.randint(0, 10, (args.batch,))
    std = estimate_level_std(pyramid, x)
    objective = DFMObjective(pyramid, stage_probs=(0.5, 0.5))
    common = dict(input_size=(args.size, args.size), in_channels=1, num_classes=10)
    models, optims = {}, {}
    for name, extra in (("off", dict(precondition=False)), ("on", dict(precondition=True, data_std=std))):
        torch.manual_seed(0)
        models[name] = create_model(args.model, **common, **extra)
        optims[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)

    def step(name: str):
        def run(i: int) -> None:
            out = objective.loss(models[name], x, y, generator=torch.Generator().manual_seed(i))
            out.loss.backward()
            optims[name].step()
            optims[name].zero_grad(set_to_none=True)

        return run

    times = time_interleaved({name: step(name) for name in models}, args.warmup, args.repeats)
    med = {name: statistics.median(t) for name, t in times.items()}
    ratios = [a / b for a, b in zip(times["on"], times["off"])]
    print(f"# {args.model}, {args.size}x{args.size}x1, batch {args.batch}, torch {torch.__version__}, "
          f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, {args.repeats} interleaved rounds")  # fmt: skip
    print("| precondition | median ms | min ms | max ms |")
    print("|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1e3 * med[name]:.1f} | {1e3 * min(t):.1f} | {1e3 * max(t):.1f} |")
    print(f"ratio of medians (on / off): {med['on'] / med['off']:.4f}; "
          f"median of per-round ratios: {statistics.median(ratios):.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
