"""Cost of the DFM-DiT against the one-stage DiT: parameters, forward FLOPs, and CPU training-step time.

Paper (Table 2, DiT-XL/2, 512 px): 716.5M vs 712.1M parameters, 524.64 vs 524.61 GFLOPs, 301 vs 297 ms per
training step (8xH100). Here:

* parameters: counted on the meta device (nothing allocated) for every DiT size;
* FLOPs: forward pass on the meta device through ``torch.utils.flop_counter`` (reported as GMACs, the unit of
  the DiT paper's "Gflops");
* time: forward + backward of a mid-size model on this CPU, the one-stage and two-stage models interleaved
  step by step (so that load changes hit both), after warm-up; median and ratio.

The measuring functions live in :mod:`dfm.bench.measure`; ``dfm bench speed`` times the full training step and
sampling of DFM against Flow Matching.

Run: ``python benchmarks/bench_model.py`` (about 2 minutes on 2 cores); ``--help`` for sizes and repeats.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from dfm.bench.measure import cpu_name, forward_gmacs, random_inputs, time_interleaved
from dfm.models import DFMDiT, count_parameters, create_config


def train_step(model: DFMDiT, inputs: tuple) -> None:
    """Network only: forward, a dummy loss, backward (``dfm bench speed`` times the full training step)."""
    out = model(*inputs)
    loss = sum((o.float() ** 2).mean() for o in out)
    loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--time-model", default="S/2", help="DiT size/patch for the timing (default S/2)")
    parser.add_argument("--input-size", type=int, default=32, help="latent side of the finest stage (32 = 256 px)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"# torch {torch.__version__}, CPU: {cpu_name()}, {torch.get_num_threads()} threads")
    print("\n## Parameters (32x32x4 latent input = 256 px through an 8x VAE; velocity output, no sigma)\n")
    print("| size | DiT (1 stage) | DFM-DiT (2 stages) | ratio |")
    print("|---|---|---|---|")
    for size in ("S/2", "B/2", "L/2", "XL/2"):
        one, two = count_parameters(f"DiT-{size}"), count_parameters(f"DFM-DiT-{size}")
        print(f"| {size} | {one / 1e6:.2f}M | {two / 1e6:.2f}M | {two / one:.4f} (+{100 * (two / one - 1):.2f}%) |")

    print("\n## Forward GMACs per sample, XL/2 (paper: 524.61 vs 524.64 at 512 px)\n")
    print("| input | DiT-XL/2 | DFM-DiT-XL/2 | ratio |")
    print("|---|---|---|---|")
    for side, label in ((32, "32x32x4 (256 px)"), (64, "64x64x4 (512 px)")):
        one = forward_gmacs(create_config("DiT-XL/2", input_size=(side, side)))
        two = forward_gmacs(create_config("DFM-DiT-XL/2", input_size=(side, side)))
        print(f"| {label} | {one:.2f} | {two:.2f} | {two / one:.5f} |")

    size = args.time_model
    side = args.input_size
    torch.manual_seed(0)
    models = {
        f"DiT-{size}": DFMDiT(create_config(f"DiT-{size}", input_size=(side, side))).train(),
        f"DFM-DiT-{size}": DFMDiT(create_config(f"DFM-DiT-{size}", input_size=(side, side))).train(),
    }
    tokens = next(iter(models.values())).config.num_tokens
    print(
        f"\n## Forward + backward time, {size} at {side}x{side}x4 ({tokens} tokens), batch {args.batch}, "
        f"{args.warmup} warm-up + {args.repeats} interleaved repeats, float32\n"
    )
    inputs = {name: random_inputs(m.config, args.batch) for name, m in models.items()}
    steps = {name: (lambda _, m=m, x=inputs[name]: train_step(m, x)) for name, m in models.items()}
    times = time_interleaved(steps, args.warmup, args.repeats)
    print("| model | median ms | min ms | max ms |")
    print("|---|---|---|---|")
    for name, values in times.items():
        ms = [1000 * v for v in values]
        print(f"| {name} | {statistics.median(ms):.1f} | {min(ms):.1f} | {max(ms):.1f} |")
    one, two = (statistics.median(v) for v in times.values())
    # The per-round ratio cancels slow drifts of the shared machine better than the ratio of medians.
    paired = statistics.median(b / a for a, b in zip(*times.values()))
    print(f"\nratio of medians (2 stages / 1 stage): {two / one:.4f}; median of per-round ratios: {paired:.4f}")


if __name__ == "__main__":
    main()
