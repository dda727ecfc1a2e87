"""The paper's Table 5 in miniature: does a scale-equivariant (SE) autoencoder help latent DFM and latent Flow
Matching?

For each of two autoencoders, trained from scratch on Fashion-MNIST at 32 px with the same seed, steps and data,
one **without** the SE term (``--se-weight 0``) and one **with** it (``--se-weight 1``):

1. ``dfm autoencoder finetune --init scratch`` (the small 2x AutoencoderKL: 32 px -> 16x16x4 latents);
2. ``dfm autoencoder measure`` (reconstruction and SE PSNR, latent vs image pyramid energy) on 256 test images;
3. ``dfm prepare`` (the training split encoded once);
4. ``dfm bench quality --preset cpu --methods dfm,fm`` on those latents (patch 2, so both see 64 tokens as the pixel
   bench does; equal steps, batch and optimiser), its samples decoded and scored against the test images.

Each ``--part`` resumes; two parts can run side by side with one thread each. ``--part report`` prints the table
(the paper's layout: FD of Flow Matching and DFM, without and with SE) and writes ``OUT/table5.{json,md}``::

    python benchmarks/se_table5.py --part plain --out runs/se-table5 &   # one thread each
    python benchmarks/se_table5.py --part se --out runs/se-table5 &
    wait; python benchmarks/se_table5.py --part report --out runs/se-table5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from dfm.bench.measure import hardware_info, hardware_line
from dfm.cli import main as cli
from dfm.data import is_latent_dir

PARTS = {"plain": 0.0, "se": 1.0}
METRICS = ("fd_efficientnet-lite0", "fd_fashion-cnn")


def run(argv: list[str]) -> None:
    print("$ dfm " + " ".join(argv), flush=True)
    if cli(argv) != 0:
        sys.exit(f"dfm {argv[0]} failed")


def part(name: str, args: argparse.Namespace) -> None:
    out = Path(args.out)
    ae, latents = out / f"ae-{name}", out / f"latents-{name}"
    threads = ["--threads", str(args.threads)]
    run(["autoencoder", "finetune", "--init", "scratch", "--se-weight", str(PARTS[name]), "--out", str(ae),
         "--steps", str(args.ae_steps), "--batch-size", "16", "--lr", str(args.ae_lr), "--num-images", "10000",
         "--no-progress"])  # fmt: skip
    run(["autoencoder", "measure", "--vae", str(ae), "--out", str(out / f"measure-{name}.json")])
    if not is_latent_dir(latents):
        run(["prepare", "--data", "fashion-mnist", "--vae", str(ae), "--out", str(latents), "--resolution", "32",
             "--batch-size", "256", "--device", "cpu"])  # fmt: skip
    run(["bench", "quality", "--preset", "cpu", "--methods", "dfm,fm", "--seeds", "0", "--guidance", "1.0",
         "--steps", str(args.steps), "-o", f"data.dataset={latents}", "-o", "model.overrides.patch_size=2",
         "-o", f"method.loss_weighting={args.loss_weighting}",
         *threads, "--out", str(out / f"bench-{name}")])  # fmt: skip


def report(out: Path) -> dict:
    table: dict = {"hardware": hardware_line(hardware_info(torch.device("cpu"))), "rows": {}}
    for name in PARTS:
        measured = json.loads((out / f"measure-{name}.json").read_text())
        rows = json.loads((out / f"bench-{name}" / "results.json").read_text())["rows"]
        last = max(r["step"] for r in rows)
        fd = {r["method"]: {m: r[m] for m in METRICS} for r in rows if r["step"] == last and r["guidance"] == 1.0}
        table["rows"][name] = {"measure": measured, "fd": fd, "step": last}
    lines = ["| autoencoder | recon PSNR | SE PSNR 2x / 4x | coarse latent energy (image) | "
             "FM FD ImageNet / domain | DFM FD ImageNet / domain |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in table["rows"].items():
        m, fd = row["measure"], row["fd"]
        energy = f"{m['latent_energy'][0]:.2f} ({m['pixel_energy'][0]:.2f})"
        cells = [f"{fd[k]['fd_efficientnet-lite0']:.1f} / {fd[k]['fd_fashion-cnn']:.1f}" for k in ("fm", "dfm")]
        se = f"{m['se_psnr_2x']:.1f} / {m['se_psnr_4x']:.1f}"
        label = "with SE" if PARTS[name] else "without SE"
        lines.append(f"| {label} | {m['recon_psnr']:.1f} | {se} | {energy} | {cells[0]} | {cells[1]} |")
    text = "\n".join(lines) + f"\n\n{table['hardware']}\n"
    (out / "table5.json").write_text(json.dumps(table, indent=1) + "\n")
    (out / "table5.md").write_text(text)
    print(text, end="")
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--part", choices=[*PARTS, "report"], required=True)
    p.add_argument("--out", default="runs/se-table5")
    p.add_argument("--ae-steps", type=int, default=1200, help="autoencoder training steps (default 1200)")
    p.add_argument("--ae-lr", type=float, default=5e-4)
    p.add_argument("--steps", type=int, default=800, help="latent DFM / FM training steps (default 800)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--loss-weighting", choices=["edm", "velocity"], default="edm",
                   help="loss of the latent runs (default edm, the presets'; RESULTS: velocity)")  # fmt: skip
    args = p.parse_args()
    if args.part == "report":
        report(Path(args.out))
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    part(args.part, args)


if __name__ == "__main__":
    main()
