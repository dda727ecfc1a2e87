"""What the three tools of a decomposed model are worth (issue 26): pick then refine, upscale, vary the detail.

    python benchmarks/decomposed_tools.py --lap2 runs/tools/lap2 --haar2 runs/tools/haar2 --lap3 runs/tools/lap3 \
        --out runs/tools/report

The runs are quick-start DFM models trained on Fashion-MNIST without its 5,000 held-aside images (train them with
benchmarks/train_tools.sh); the upscaling is scored on those held-aside images. Writes ``report.json`` and the
pictures (``refine.png``, ``upscale_2x.png``, ``upscale_4x.png``, ``vary.png``) to ``--out`` and prints a summary.

1. Pick then refine: the network evaluations and the wall time to finish k of n candidates (stopped after stage 1)
   against sampling all n in full; and whether the stage-1 preview predicts its final image: the distance between a
   preview and its own final image's coarse level, against the distance to the other finals' (and how often the own
   final is the nearest).
2. Upscale: the held-aside images reduced 2x (4x with three stages) to the coarse stage's resolution, enlarged by
   the model's finer stages, by bicubic and by bilinear interpolation: PSNR against the originals, the Fréchet
   distance of EfficientNet-Lite0 features to the originals, and how far the result's coarse level is from the input.
3. Vary: the spread of eight variations per image at every level, against the spread of independent samples.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dfm.bench.measure import hardware_info, hardware_line
from dfm.data import build_dataset
from dfm.eval import FeatureStats, build_extractor
from dfm.generate import Generator
from dfm.visual import image_grid, save_png, upsample_to


class Counter:
    """Counts the samples a network was evaluated on (one sample in a batch of 64 counts once)."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.samples = 0
        network.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.samples += int(args[0][0].shape[0])


def refine_cost(gen: Generator, counter: Counter, n: int, k: int, seed0: int = 1000) -> dict:
    seeds = list(range(seed0, seed0 + n))
    labels = gen.labels(seeds)
    guided = 2 if any(g != 1 for g in gen.config.sampler.guidance) else 1
    counter.samples, tic = 0, time.perf_counter()
    full = gen.generate(seeds, labels, batch_size=n)
    full_time, full_evals = time.perf_counter() - tic, counter.samples // guided
    counter.samples, tic = 0, time.perf_counter()
    stopped = gen.generate(seeds, labels, batch_size=n, until_stage=0)
    stop_time, stop_evals = time.perf_counter() - tic, counter.samples // guided
    picks = list(range(0, n, n // k))[:k]
    counter.samples, tic = 0, time.perf_counter()
    done = gen.refine(stopped.state.select(picks), [labels[i] for i in picks], batch_size=k)
    refine_time, refine_evals = time.perf_counter() - tic, counter.samples // guided
    exact = bool(torch.equal(done.images, gen.generate([seeds[i] for i in picks], [labels[i] for i in picks],
                                                       batch_size=k).images))  # fmt: skip
    close = float((done.images - full.images[picks]).abs().max())
    return {"n": n, "k": k, "full": {"network_evaluations": full_evals, "seconds": full_time},
            "stop_and_refine": {"network_evaluations": stop_evals + refine_evals, "seconds": stop_time + refine_time,
                                "stage1_evaluations": stop_evals, "refine_evaluations": refine_evals},
            "refined_equal_to_uninterrupted_same_batches": exact, "max_difference_to_the_full_batch": close,
            "stopped": stopped, "full_images": full.images, "picks": picks}  # fmt: skip


def preview_prediction(gen: Generator, n: int, seed0: int = 2000) -> dict:
    """Distance of each stage-1 preview to its own final image's coarse level against the other finals'."""
    seeds = list(range(seed0, seed0 + n))
    out = gen.generate(seeds, gen.labels(seeds), batch_size=128)
    coarse = gen.sampler.decomposition.decompose(out.images)[0].flatten(1)
    preview = out.previews[0].flatten(1)
    dist = torch.cdist(preview, coarse) / math.sqrt(coarse.shape[1])  # RMSE
    own = dist.diag()
    others = dist[~torch.eye(n, dtype=torch.bool)].view(n, n - 1)
    return {"n": n, "rmse_to_own_final": float(own.mean()), "rmse_to_other_finals": float(others.mean()),
            "own_final_is_nearest": float((dist.argmin(1) == torch.arange(n)).float().mean())}  # fmt: skip


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp(min=1e-12))).mean())


def _fd(extractor, a: torch.Tensor, b: torch.Tensor) -> float:
    stats = []
    for x in (a, b):
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        feats = torch.cat([extractor(u8[i : i + 250]).features for i in range(0, len(u8), 250)])
        stats.append(FeatureStats(feats.shape[1]).update(feats))
    return stats[0].frechet_distance(stats[1])


def upscale_scores(gen: Generator, images: torch.Tensor, labels: list[int], extractor, stage: int = 0) -> dict:
    """The held-aside ``images`` reduced to stage ``stage``'s resolution, enlarged three ways and scored."""
    dec = gen.sampler.decomposition
    low = dec.first(stage + 1).recompose(dec.decompose(images)[: stage + 1])  # the stage's preview of each image
    size = images.shape[-2:]
    results = {
        "dfm": gen.upscale(low, list(range(len(low))), labels, batch_size=250).images,
        "bicubic": F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(-1, 1),
        "bilinear": F.interpolate(low, size=size, mode="bilinear", align_corners=False),
    }
    pad = gen.spec.padding
    crop = (lambda x: x[..., pad:-pad, pad:-pad]) if pad else (lambda x: x)  # noqa: E731
    scores = {}
    for name, up in results.items():
        back = dec.first(stage + 1).recompose(dec.decompose(up)[: stage + 1])
        scores[name] = {"psnr": _psnr(crop(up), crop(images)),
                        "fd_efficientnet": _fd(extractor, crop(up), crop(images)),
                        "coarse_rmse_to_input": float((back - low).pow(2).mean().sqrt())}  # fmt: skip
    scores["factor"] = size[-1] // low.shape[-1]
    return {"scores": scores, "pictures": (low, results, images)}


def vary_spread(gen: Generator, bases: list[int], count: int = 8) -> dict:
    """Per level: the spread (RMS over pixels of the std across variations) of the variations of each base image,
    against the spread of independent samples of the same class."""
    dec = gen.sampler.decomposition
    within, between, rows = [], [], []
    for seed in bases:
        label = gen.labels([seed])[0] if gen.num_classes else None
        var = gen.vary(seed, list(range(100, 100 + count)), label).images
        ind = gen.generate(list(range(500 + seed * count, 500 + (seed + 1) * count)),
                           None if label is None else [label] * count).images  # fmt: skip
        within.append([float(lv.std(0).pow(2).mean().sqrt()) for lv in dec.decompose(var)])
        between.append([float(lv.std(0).pow(2).mean().sqrt()) for lv in dec.decompose(ind)])
        rows.append(torch.cat([gen.generate([seed], None if label is None else [label]).images, var]))
    return {"within_variations": np.mean(within, 0).tolist(), "between_samples": np.mean(between, 0).tolist(),
            "rows": rows}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lap2", required=True)
    p.add_argument("--haar2")
    p.add_argument("--lap3")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"hardware": hardware_line(hardware_info(torch.device("cpu"))), "command": " ".join(sys.argv)}
    val = build_dataset("fashion-mnist:val", 32, train=False)
    idx = torch.arange(args.num_images)
    images, labels = val.get_batch(idx, augment=False)
    labels = labels.tolist()
    extractor = build_extractor("efficientnet-lite0", download=False)
    runs = {"lap2": args.lap2, "haar2": args.haar2, "lap3": args.lap3}
    for name, path in runs.items():
        if not path:
            continue
        gen = Generator.from_run(path)
        counter = Counter(gen.network)
        entry: dict = {"run": path, "sampler": {k: v for k, v in vars(gen.config.sampler).items()}}
        cost = refine_cost(gen, counter, args.n, args.k)
        entry["refine"] = {k: v for k, v in cost.items() if k not in ("stopped", "full_images", "picks")}
        entry["preview_prediction"] = preview_prediction(gen, 256)
        if name == "lap2":
            stopped, picks = cost["stopped"].images, cost["picks"]
            grid = image_grid(upsample_to(stopped, cost["full_images"].shape[-2:]), nrow=16)
            save_png(grid, out / "refine_candidates.png")
            save_png(image_grid(cost["full_images"][picks], nrow=len(picks)), out / "refine_picked.png")
        stages = gen.stages
        entry["upscale"] = {}
        for stage in range(stages - 1):
            up = upscale_scores(gen, images, labels, extractor, stage)
            entry["upscale"][f"{up['scores']['factor']}x"] = up["scores"]
            low, results, originals = up["pictures"]
            rows = [upsample_to(low[:10], originals.shape[-2:]), results["bilinear"][:10], results["bicubic"][:10],
                    results["dfm"][:10], originals[:10]]  # fmt: skip
            save_png(image_grid(torch.cat(rows), nrow=10), out / f"upscale_{name}_{up['scores']['factor']}x.png")
        vary = vary_spread(gen, list(range(10)))
        entry["vary"] = {k: v for k, v in vary.items() if k != "rows"}
        save_png(image_grid(torch.cat(vary["rows"]), nrow=9), out / f"vary_{name}.png")
        report[name] = entry
        print(json.dumps({name: entry}, indent=1), flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
