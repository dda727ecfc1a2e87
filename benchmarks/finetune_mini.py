"""The paper's Table 4 in miniature: fine-tune a pretrained Flow Matching model on new classes as a DFM and as
plain Flow Matching, from the same checkpoint, at equal compute, and score both along the way.

1. Pretrain Flow Matching (the quick-start FM preset) on Fashion-MNIST classes 0-4.
2. `dfm finetune --method dfm` and `--method fm` on classes 5-9 (same steps, batch and learning rate).
3. Every `--eval-every` steps (and at step 0), sample `--num-samples` images of classes 5-9 and compute the Fréchet
   distances (ImageNet EfficientNet-Lite0 features and the domain classifier's) against the test images of
   classes 5-9.

Everything resumes (runs with --resume auto, scores cached as JSON). Prints a table, writes results.json and a
plot of FD against fine-tuning steps:

    python benchmarks/finetune_mini.py --out runs/finetune-mini
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from dfm.factory import make_decomposition
from dfm.train import Trainer

from dfm.bench.measure import hardware_info, hardware_line
from dfm.bench.quality import default_cache, ensure_classifier
from dfm.cli import main as cli
from dfm.config import RunConfig, apply_overrides
from dfm.eval import EvalConfig, build_reference, evaluate, save_reference
from dfm.eval.images import ImageSet, load_fashion_mnist
from dfm.finetune import finetune_config
from dfm.generate import data_padding, generate, load_run
from dfm.outputs import crop_border

OLD, NEW = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
METRICS = ("fd:efficientnet-lite0", "fd:fashion-cnn")


def references(cache: Path, weights: dict) -> list[str]:
    """Reference statistics (one file per extractor) of the test images of the new classes, computed once and
    kept in the bench cache (``$DFM_CACHE/bench``) for every later run."""
    cache.mkdir(parents=True, exist_ok=True)
    images_path = cache / "ref_test_classes5-9.npz"
    if not images_path.is_file():
        images, labels = load_fashion_mnist(split="test")
        keep = torch.isin(labels, torch.tensor(NEW))
        np.savez(images_path, arr_0=images[keep].numpy()[..., None], labels=labels[keep].numpy())
    refs = []
    for metric in METRICS:
        extractor = metric.split(":")[1]
        path = cache / f"ref_stats_{extractor}_classes5-9.npz"
        if not path.is_file():
            stats = build_reference(str(images_path), extractor, None, weights=weights.get(extractor),
                                    download=False, progress=False)  # fmt: skip
            save_reference(path, stats)
        refs.append(str(path))
    return refs


def score(run: Path, checkpoint: Path | None, out_file: Path, ref: list[str], weights: dict, n: int) -> dict:
    if out_file.is_file():
        return json.loads(out_file.read_text())
    model, cfg = load_run(run, checkpoint=None if checkpoint is None else str(checkpoint))
    seeds = list(range(n))
    labels = [NEW[s % len(NEW)] for s in seeds]
    shape = (model.config.in_channels, *model.config.input_size)
    images, _ = generate(model, make_decomposition(cfg.method), cfg, shape, labels, seeds, batch_size=250)
    x = crop_border(((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), data_padding(cfg, run))
    result = evaluate(ImageSet(x, torch.tensor(labels), {"kind": "finetune-mini"}), ref,
                      EvalConfig(metrics=list(METRICS), weights=weights, download=False, progress=False))  # fmt: skip
    row = {k: round(v, 3) for k, v in result["scores"].items()}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(row) + "\n")
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/finetune-mini"))
    p.add_argument("--pretrain-steps", type=int, default=1200)
    p.add_argument("--finetune-steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default: dfm finetune's, a tenth)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--loss-weighting",
        choices=["edm", "velocity"],
        default="edm",
        help="method.loss_weighting of every run (default edm, the presets'; RESULTS' runs: velocity)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    common = ["--no-progress", "-o", f"train.threads={args.threads}", "-o", "train.sample_every=0",
              "-o", f"method.loss_weighting={args.loss_weighting}", "--resume", "auto"]  # fmt: skip
    pre = out / "pretrain-fm"
    assert cli(["train", "--preset", "quickstart-fm", "--out", str(pre), "--steps", str(args.pretrain_steps),
                "-o", f"data.classes={','.join(map(str, OLD))}", "-o", f"train.ckpt_every={args.pretrain_steps}",
                *common]) == 0  # fmt: skip
    runs = {}
    for method in ("dfm", "fm"):
        runs[method] = out / f"finetune-{method}"
        lr = ["--lr", str(args.lr)] if args.lr else []
        every = ["-o", f"train.ckpt_every={args.eval_every}", "-o", "train.keep_last=1000"]
        assert cli(["finetune", "--from", str(pre), "--method", method, "--out", str(runs[method]),
                    "--steps", str(args.finetune_steps), "--classes", ",".join(map(str, NEW)), *lr, *every,
                    *common]) == 0  # fmt: skip
    weights = {"fashion-cnn": str(ensure_classifier(default_cache(), print))}
    ref = references(default_cache(), weights)
    rows = [{"method": "pretrained (FM, classes 0-4)", "step": 0,
             **score(pre, None, out / "scores" / "pretrained.json", ref, weights, args.num_samples)}]  # fmt: skip
    for method, run in runs.items():
        name = "DFM" if method == "dfm" else "Flow Matching"
        for step in range(0, args.finetune_steps + 1, args.eval_every):
            if step == 0:  # the fine-tuning run before its first step: the pretrained weights (converted for DFM)
                row = _step0(pre, method, out, ref, weights, args.num_samples, args.loss_weighting)
            else:
                ckpt = run / "checkpoints" / f"step_{step:08d}"
                row = score(run, ckpt, out / "scores" / f"{method}-{step}.json", ref, weights, args.num_samples)
            rows.append({"method": name, "step": step, **row})
    hardware = hardware_line(hardware_info(torch.device("cpu")))
    (out / "results.json").write_text(json.dumps({"hardware": hardware, "rows": rows}, indent=1) + "\n")
    print(f"hardware: {hardware}")
    print("| method | fine-tuning step | FD EfficientNet-Lite0 | FD domain classifier |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['step']} | {r['fd_efficientnet-lite0']:.1f} | {r['fd_fashion-cnn']:.1f} |")
    _plot(rows, out / "fd_vs_finetune_steps.png")
    return 0


def _step0(pre: Path, method: str, out: Path, ref: list[str], weights: dict, n: int, weighting: str) -> dict:
    """Score the model a fine-tuning run starts from (its weights before the first step are not saved): for DFM,
    the trainer's conversion written as a step-0 checkpoint in a throw-away run directory."""
    cache = out / "scores" / f"{method}-0.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    if method == "fm":  # plain fine-tuning starts from the pretrained weights as they are
        return score(pre, None, cache, ref, weights, n)
    cfg = finetune_config(RunConfig.load(pre / "config.json"), "dfm", steps=1)
    cfg = apply_overrides(cfg, [f"train.init_from={pre}", "data.classes=5,6,7,8,9", "train.sample_every=0",
                                f"method.loss_weighting={weighting}"])  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, progress=False)
        trainer.step = 0
        trainer.save()  # the converted model, before any optimiser step
        row = score(Path(tmp), Path(tmp) / "checkpoints" / "step_00000000", cache, ref, weights, n)
    return row


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in zip(axes, ("fd_efficientnet-lite0", "fd_fashion-cnn"), ("EfficientNet-Lite0", "domain")):
        for name, style in (("DFM", "o-"), ("Flow Matching", "s--")):
            pts = [(r["step"], r[key]) for r in rows if r["method"] == name]
            ax.plot(*zip(*pts), style, label=name)
        ax.set_xlabel("fine-tuning steps (classes 5-9)")
        ax.set_ylabel(f"FD ({title})")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Fine-tuning a Flow Matching model (pretrained on classes 0-4) on classes 5-9")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
