"""``dfm bench quality``: DFM against Flow Matching, the cascade and Pyramidal Flow at equal training compute.

Every variant starts from the same training preset (backbone size, batch, optimiser, number of optimiser steps,
data) and samples with the same number of network evaluations; only the method (or, for ablations, one setting)
changes. Each variant is trained with several seeds, evaluated at evenly spaced checkpoints at guidance 1.0
(convergence) and at the final checkpoint at every guidance scale, with metrics that run offline:

- ``fd_efficientnet-lite0``: Fréchet distance in ImageNet-pretrained EfficientNet-Lite0 features (not comparable
  with published FIDs),
- ``fd_fashion-cnn``: Fréchet distance in the features of a classifier trained on the data set (domain FD),
- ``swd_*``: sliced Wasserstein distance per Laplacian level (x1e3), fine to coarse,
- ``class_accuracy``: how often the domain classifier recognises the requested class.

Everything is cached on disk (runs resume with ``--resume auto``, scores are JSON files): an interrupted bench
continues where it stopped. The report (``report.md``, ``results.json``, plots) is rewritten at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dfm.bench.measure import hardware_info, hardware_line
from dfm.checkpoint import find_latest, list_checkpoints, load_checkpoint
from dfm.config import RunConfig, apply_overrides, get_preset, with_method
from dfm.data import build_dataset, is_latent_dir, read_latent_info
from dfm.eval import EvalConfig, SWDConfig, build_reference, evaluate, save_reference
from dfm.eval.cli import _weights_arg
from dfm.eval.extractors.classifier import train_fashion_classifier
from dfm.eval.images import ImageSet, load_fashion_mnist
from dfm.eval.weights import sha256_file
from dfm.factory import make_decomposition, make_model, make_objective
from dfm.generate import data_padding, default_labels, generate, load_run, make_decoder
from dfm.methods import get_method
from dfm.outputs import crop_border
from dfm.train import CONFIG_FILE, Dist, Trainer, TrainingError, resume_conflicts

METRICS = ("fd:efficientnet-lite0", "fd:fashion-cnn", "swd", "accuracy")
#: Videos: the image metrics frame by frame, plus temporal consistency (FVD needs I3D weights: see docs).
VIDEO_METRICS = (*METRICS, "temporal")
HEADLINE = "fd_efficientnet-lite0"
#: the method settings that change sampling only: taken from the bench's command, not from a finished run's config
SAMPLER_KEYS = ("steps", "thresholds", "solver", "time_shift")


@dataclass
class Variant:
    """One line of the comparison: a method plus settings changed for training and/or sampling."""

    name: str
    method: str = "dfm"
    train: tuple[str, ...] = ()  #: ``section.key=value`` overrides of the training config
    sample: dict[str, Any] = field(default_factory=dict)  #: sampling settings: steps, thresholds, solver
    label: str = ""  #: the ablation value this variant stands for (what ``--only`` selects)

    def run_key(self) -> str:
        """Variants that train the same thing share one run (sampling-only ablations)."""
        text = json.dumps([self.method, sorted(self.train)])
        return f"{self.method}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


@dataclass
class QualitySettings:
    preset: str = "quickstart"  #: training preset every variant starts from
    variants: list[Variant] = field(default_factory=list)
    methods: tuple[str, ...] = ("dfm", "fm", "cascade", "pyramidal")  #: the comparison's methods
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 1200
    eval_points: int = 3  #: evenly spaced checkpoints evaluated at guidance 1.0 (the last is the final one)
    num_samples: int = 1000
    guidance: tuple[float, ...] = (1.0, 1.25, 1.5)
    sample_batch: int = 250
    overrides: tuple[str, ...] = ()  #: applied to every variant (e.g. a model size)
    metrics: tuple[str, ...] = METRICS
    num_reference: int | None = None  #: test images behind the reference statistics (None = all 10,000)
    device: str = "cpu"
    threads: int = 0
    #: ``test``: score against the test split (the reported numbers); ``val``: train on ``fashion-mnist:fit`` and
    #: score against the 5,000 held-aside training images, for choosing settings without looking at the test split
    reference: str = "test"

    @property
    def eval_steps(self) -> list[int]:
        n = max(1, self.eval_points)
        return sorted({max(1, round(self.steps * (i + 1) / n)) for i in range(n)})


def comparison_variants() -> list[Variant]:
    return [Variant("DFM", "dfm"), Variant("Flow Matching", "fm"), Variant("Cascaded", "cascade"),
            Variant("Pyramidal Flow", "pyramidal")]  # fmt: skip


def _ablation(name: str, values: Sequence[tuple[str, Sequence[str], dict]]) -> list[Variant]:
    return [Variant(f"{name}={label}", "dfm", tuple(train), dict(sample), label) for label, train, sample in values]


#: The paper's ablations (Tables 3-6 and the sampling study), each against the preset's DFM.
ABLATIONS: dict[str, Callable[[], list[Variant]]] = {
    "stage-probs": lambda: _ablation("p(Q=1)", [
        (str(p), [f"method.stage_probs={p},{round(1 - p, 4)}"], {}) for p in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)]),
    "prev-loc": lambda: _ablation("prev_loc", [
        *[(str(v), [f"method.prev_loc={v}"], {}) for v in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)],
        ("tied", ["method.tied=true"], {})]),
    "decomposition": lambda: _ablation("decomposition", [
        (d, [f"method.decomposition={d}"], {}) for d in ("laplacian", "haar", "dct")]),
    "standardize": lambda: _ablation("standardize", [("off", ["method.standardize=false"], {}),
                                                     ("on", ["method.standardize=true"], {})]),
    "precondition": lambda: _ablation("precondition", [("off", ["method.precondition=false"], {}),
                                                       ("on", ["method.precondition=true"], {})]),
    "loss-weighting": lambda: _ablation("loss_weighting", [(w, [f"method.loss_weighting={w}"], {})
                                                           for w in ("velocity", "edm")]),
    # the paper's sampling study (Euler, 40 steps split three ways, three thresholds), then the presets' Heun 15 + 5
    "sampling": lambda: _ablation("sampling", [
        *[(f"{a}+{b}_tau{tau}", [], {"steps": (a, b), "thresholds": (tau,), "solver": "euler"})
          for a, b in ((30, 10), (20, 20), (10, 30)) for tau in (0.5, 0.7, 0.9)],
        ("heun15+5_tau0.7", [], {"steps": (15, 5), "thresholds": (0.7,), "solver": "heun"})]),
}  # fmt: skip

#: Bench presets: ``cpu`` finishes within an hour on 2 cores; ``gpu`` is a larger run for a lent GPU;
#: ``smoke`` is the tiny version the tests run.
BENCH_PRESETS: dict[str, dict[str, Any]] = {
    # ~57 min on 2 CPU cores, plus ~9.5 min once for the classifier and reference statistics (docs/RESULTS.md).
    "cpu": dict(preset="quickstart", seeds=(0, 1), steps=800, eval_points=2, num_samples=300, sample_batch=300,
                num_reference=5000),
    # The resolution study: the cpu preset at 64x64 (Fashion-MNIST upsampled from the padded 32x32, so the finest
    # level holds little), patch 8 so that the model still sees 64 tokens and costs the same per step.
    "cpu64": dict(preset="quickstart", seeds=(0, 1), steps=800, eval_points=2, num_samples=300, sample_batch=300,
                  num_reference=5000, overrides=("data.resolution=64", "model.overrides.patch_size=8")),
    "gpu": dict(preset="quickstart", seeds=(0, 1, 2), steps=20000, eval_points=5, num_samples=10000,
                sample_batch=1000, overrides=("model.name=DFM-DiT-Mini", "optim.lr=5e-4", "train.precision=bf16",
                                              "train.batch_size=256", "optim.warmup_steps=1000"), device="cuda"),
    "video-cpu": dict(preset="video-quickstart", methods=("dfm", "fm"), seeds=(0, 1), steps=600, eval_points=3,
                      num_samples=100, guidance=(1.0, 1.5), sample_batch=100, num_reference=500,
                      metrics=VIDEO_METRICS),
    "video-smoke": dict(preset="video-quickstart", methods=("dfm", "fm"), seeds=(0,), steps=2, eval_points=1,
                        num_samples=4, guidance=(1.0, 1.5), sample_batch=4, num_reference=8, metrics=VIDEO_METRICS,
                        overrides=("model.overrides.depth=1", "model.overrides.hidden_size=32",
                                   "model.overrides.num_heads=2", "method.steps=2,2", "train.batch_size=4",
                                   "data.frames=4", "data.num_clips=16", "train.num_sample_images=2")),
    "smoke": dict(preset="quickstart", seeds=(0,), steps=2, eval_points=1, num_samples=16, guidance=(1.0, 1.5),
                  num_reference=64,
                  sample_batch=16, overrides=("model.overrides.depth=1", "model.overrides.hidden_size=32",
                                              "model.overrides.num_heads=2", "method.steps=2,2",
                                              "train.batch_size=8", "train.num_sample_images=4")),
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ pieces
def run_config(settings: QualitySettings, variant: Variant, seed: int) -> RunConfig:
    # Shared settings first, then the method switch (so that e.g. DFM's steps become FM's total at equal NFE).
    cfg = with_method(apply_overrides(get_preset(settings.preset), _data_overrides(settings)), variant.method)
    asked = [o for o in settings.overrides if o.startswith("method.loss_weighting=")]
    if variant.method == "fm" and asked:  # the switch gives Flow Matching its own loss; one asked for with -o wins
        cfg = apply_overrides(cfg, asked[-1:])
    every = settings.eval_steps[0] if settings.eval_steps else settings.steps
    extra = [f"train.steps={settings.steps}", f"train.seed={seed}", f"train.ckpt_every={every}",
             f"train.keep_last={len(settings.eval_steps) + 1}", "train.sample_every=0"]  # fmt: skip
    if settings.threads:
        extra.append(f"train.threads={settings.threads}")
    return apply_overrides(cfg, [*variant.train, *extra])


def default_cache() -> Path:
    """Where the once-only work (domain classifier, reference statistics) is kept: ``$DFM_CACHE/bench``."""
    return Path(os.environ.get("DFM_CACHE", "~/.cache/dfm")).expanduser() / "bench"


def ensure_classifier(cache: Path, log: Callable[[str], None]) -> Path:
    """The domain classifier (trained once, deterministically, on the data set's labels; shared by all benches)."""
    path = cache / "fashion_cnn.safetensors"
    if not path.is_file():
        log(f"training the domain classifier (once) -> {path}")
        x, y = load_fashion_mnist(split="train")
        xt, yt = load_fashion_mnist(split="test")
        train_fashion_classifier(path, x[:, None], y, xt[:, None], yt, log=log)
    return path


def _data_overrides(settings: QualitySettings) -> list[str]:
    """The bench's overrides; with ``reference="val"`` training also leaves the held-aside images out."""
    overrides = list(settings.overrides)
    if settings.reference == "val":
        if is_latent_dir(Path(apply_overrides(get_preset(settings.preset), overrides).data.dataset)):
            raise ValueError(
                "--reference val needs pixel Fashion-MNIST; latents (dfm prepare) are scored on --reference test"
            )
        if get_preset(settings.preset).data.dataset != "fashion-mnist":
            raise ValueError("--reference val needs a Fashion-MNIST preset (its training split has a held-aside part)")
        overrides.append("data.dataset=fashion-mnist:fit")
    return overrides


def reference_images(cache: Path, settings: QualitySettings) -> str:
    """The real images the samples are compared with: the test split of the preset's data set (or, with
    ``reference="val"``, the 5,000 held-aside Fashion-MNIST training images)."""
    cfg = apply_overrides(get_preset(settings.preset), _data_overrides(settings))
    d = cfg.data
    if is_latent_dir(Path(d.dataset)):  # latents: samples are decoded, so compare with the images they encode
        info = read_latent_info(Path(d.dataset))
        if info.get("source_data") is None:
            raise ValueError(f"{d.dataset} does not record its images: run `dfm prepare` again to bench on it")
        d = dataclasses.replace(d, dataset=str(info["source_data"]), resolution=int(info["image_resolution"]))
    if d.dataset.startswith("fashion-mnist"):
        return f"fashion-mnist:{settings.reference}"
    count = settings.num_reference or 1000
    name = d.dataset
    if "/" in name:  # a folder: its name and a hash of its path
        name = f"{Path(name).name}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    path = cache / f"ref_data_{name}_{d.resolution}px_{d.frames}f_n{count}.npz"
    if not path.is_file():  # e.g. moving Fashion-MNIST: write the test clips once, as uint8 (N, T, H, W, C)
        ds = build_dataset(d.dataset, d.resolution, train=False, data_dir=d.data_dir, frames=d.frames,
                           num_clips=count)  # fmt: skip
        x, y = ds.get_batch(torch.arange(min(count, len(ds))), augment=False)
        arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        arr = arr.movedim(1, -1).numpy()  # channels last
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, arr_0=arr, labels=y.numpy())
        tmp.replace(path)
    return str(path)


def ensure_references(cache: Path, settings: QualitySettings, weights: dict[str, str]) -> list[str]:
    """Reference statistics of the test split for every Fréchet extractor (computed once), plus the images.

    The file name holds everything the statistics depend on (images, count, extractor weights), so presets
    and ablations with the same reference share one file and a changed setting never reuses a stale one.
    """

    images = reference_images(cache, settings)
    source = Path(images).stem if images.endswith(".npz") else images.replace(":", "-")
    count = settings.num_reference or "all"
    refs = []
    for metric in settings.metrics:
        kind, _, extractor = metric.partition(":")
        if kind != "fd":
            continue
        tag = sha256_file(weights[extractor])[:8] if extractor in weights else "default"
        path = cache / f"ref_{extractor}-{tag}_{source}_n{count}.npz"
        if not path.is_file():
            stats = build_reference(images, extractor, settings.num_reference, device=settings.device,
                                    weights=weights.get(extractor), download=False, progress=False)  # fmt: skip
            save_reference(path, stats)
        refs.append(str(path))
    return [*refs, images]


def train_run(cfg: RunConfig, run_dir: Path, log: Callable[[str], None], device: str = "cpu") -> float:
    """Train (or finish) one run on ``device``; returns the wall time spent training it, summed over resumes."""

    timing = run_dir / "bench_time.json"
    spent = json.loads(timing.read_text())["train_seconds"] if timing.is_file() else 0.0
    latest = find_latest(run_dir / "checkpoints")
    if latest is not None and (run_dir / CONFIG_FILE).is_file():
        # Run directories are named by method and variant, not by every -o / --reference: a run trained with
        # other settings must not be scored (or resumed) as if it were this one.
        diffs = resume_conflicts(RunConfig.load(run_dir / CONFIG_FILE), cfg)
        if diffs:
            raise TrainingError(f"{run_dir} was trained with other settings ({'; '.join(diffs[:3])}): give this "
                                f"bench another --out, or the same settings as that run")  # fmt: skip
    if latest is not None and load_checkpoint(latest)["state"]["step"] >= cfg.train.steps:
        return spent
    log(f"training {run_dir.name} ({cfg.method.method}, seed {cfg.train.seed}, {cfg.train.steps} steps)")
    # keep_last covers this call's evaluation points; checkpoints of an earlier, shorter call are kept as well
    cfg = copy.deepcopy(cfg)
    cfg.train.keep_last += len(list_checkpoints(run_dir / "checkpoints"))
    tic = time.perf_counter()
    # The bench's device, not the Trainer's default (the CPU): --device cuda trains on the GPU, not only scores there.
    Trainer(cfg, run_dir, resume="auto", dist_info=Dist(device=torch.device(device)), progress=False).fit()
    spent += time.perf_counter() - tic
    timing.write_text(json.dumps({"train_seconds": spent}) + "\n")
    return spent


def _to_uint8_native(images: torch.Tensor, cfg: RunConfig, run_dir: Path) -> torch.Tensor:
    """Samples to uint8 NCHW without the data set's padding, to compare with the real images at their size."""

    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return crop_border(x, data_padding(cfg, run_dir))


def sampler_settings(variant: Variant, cfg: RunConfig) -> dict[str, Any]:
    """The sampler of a variant's points: its own settings over the bench command's config (not over a finished
    run's config.json, which keeps the sampler of the run's last training call)."""
    return {key: variant.sample.get(key) or getattr(cfg.method, key) for key in SAMPLER_KEYS}


def evaluate_checkpoint(
    settings: QualitySettings,
    variant: Variant,
    cfg: RunConfig,
    run_dir: Path,
    step: int,
    guidance: float,
    refs: list[str],
    weights: dict[str, str],
    out_file: Path,
) -> dict:
    """Sample ``num_samples`` images from checkpoint ``step`` (EMA) and score them; cached in ``out_file``."""
    if out_file.is_file():
        return json.loads(out_file.read_text())

    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    model, run_cfg = load_run(run_dir, checkpoint=str(ckpt), device=settings.device)
    m = run_cfg.method
    for key, value in sampler_settings(variant, cfg).items():
        setattr(m, key, value)
    seeds = list(range(settings.num_samples))
    labels = default_labels(seeds, model.num_classes)
    tic = time.perf_counter()
    images, _ = generate(model, make_decomposition(m), run_cfg, (model.config.in_channels, *model.config.input_size),
                         labels, seeds, guidance=guidance, batch_size=settings.sample_batch, device=settings.device,
                         decoder=make_decoder(run_cfg, settings.device))  # fmt: skip
    sample_seconds = time.perf_counter() - tic
    image_set = ImageSet(
        _to_uint8_native(images, run_cfg, run_dir), torch.tensor(labels), {"kind": "bench", "count": len(seeds)}
    )
    config = EvalConfig(metrics=settings.metrics, num_reference=settings.num_samples, device=settings.device,
                        weights=weights, download=False, progress=False, swd=SWDConfig(min_resolution=8))  # fmt: skip
    result = evaluate(image_set, refs, config)
    row = {"variant": variant.name, "method": variant.method, "seed": run_cfg.train.seed, "step": step,
           "guidance": guidance,
           "nfe": get_method(m.method).network_evaluations(m.steps, m.solver) * (1 if guidance == 1 else 2),
           "sample_seconds": sample_seconds, **result["scores"]}  # fmt: skip
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    tmp.replace(out_file)
    return row


def training_flops(cfg: RunConfig, sample_shape: Sequence[int], num_classes: int) -> float:
    """3 x forward FLOPs x images seen, counted on the training objective's own forward pass (one sample);
    the cascade's two phases are counted separately and weighted by their share of the steps."""
    method = dataclasses.replace(cfg.method, level_std=cfg.method.level_std or None)
    decomposition = make_decomposition(method, standardized=False)
    model = make_model(cfg, sample_shape, num_classes)
    objective = make_objective(method, decomposition, cfg.train.steps)
    x, y = torch.zeros(1, *sample_shape), torch.zeros(1, dtype=torch.long)
    switch = getattr(objective, "switch_step", None)
    phases = [0] if switch is None else [0, switch]
    flops = []
    for step in phases:
        objective.begin_step(step, model)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            objective.loss(model, x, y, generator=torch.Generator().manual_seed(0))
        flops.append(counter.get_total_flops())
    if switch is None:
        forward = flops[0]
    else:
        first = min(switch, cfg.train.steps) / cfg.train.steps
        forward = first * flops[0] + (1 - first) * flops[1]
    return 3.0 * forward * cfg.train.batch_size * cfg.train.steps


# ------------------------------------------------------------------------------------------------ report
def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _fmt(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    m, s = _mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def summarize(rows: list[dict], settings: QualitySettings, runs: dict[str, dict]) -> dict[str, Any]:
    final = settings.steps
    prefixes = ("fd_", "swd_", "class_accuracy", "temporal_change_gap")
    metric_keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith(prefixes)))
    table = []
    for variant in settings.variants:
        for g in settings.guidance:
            sel = [r for r in rows if r["variant"] == variant.name and r["step"] == final and r["guidance"] == g]
            table.append({"variant": variant.name, "guidance": g, "n": len(sel),
                          **{k: [r[k] for r in sel if k in r] for k in metric_keys}})  # fmt: skip
    return {"table": table, "metric_keys": metric_keys, "runs": runs}


def markdown(summary: dict[str, Any], settings: QualitySettings, command: str, hardware: str) -> str:
    keys = summary["metric_keys"]
    lines = [f"Command: `{command}`", f"Hardware: {hardware}", "",
             f"Training: preset `{settings.preset}` + {_data_overrides(settings) or 'no overrides'}, "
             f"{settings.steps} optimiser steps per run, seeds {list(settings.seeds)}; "
             f"{settings.num_samples} samples per evaluation (classes = seed mod 10), reference: "
             + ("the test split of the preset's data" if settings.reference == "test" else
                "the 5,000 held-aside training images (fashion-mnist:val), which training left out")
             + f" ({settings.num_reference or 'all'} images or clips).",
             "", "| variant | guidance | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]  # fmt: skip
    for row in summary["table"]:
        cells = [_fmt(row[k], 3 if k.startswith(("class_accuracy", "temporal")) else 1) for k in keys]
        lines.append(f"| {row['variant']} | {row['guidance']} | " + " | ".join(cells) + " |")
    lines += ["", "| run | method | train wall time (s) | training FLOPs |", "|---|---|---|---|"]
    for name, info in summary["runs"].items():
        lines.append(f"| {name} | {info['method']} | {info['train_seconds']:.0f} | {info['train_flops']:.3g} |")
    lines.append("")
    lines.append("Mean ± sample standard deviation over seeds. Lower is better except class_accuracy.")
    return "\n".join(lines) + "\n"


def headline_metric(rows: list[dict]) -> str:
    """The first Fréchet distance of the rows (``fd_efficientnet-lite0``, or its per-frame twin for videos)."""
    keys = [k for k in rows[0] if k.startswith("fd_")] if rows else []
    return HEADLINE if HEADLINE in keys or not keys else keys[0]


def plot(rows: list[dict], settings: QualitySettings, out: Path, metric: str = HEADLINE) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for kind in ("steps", "guidance"):
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
        for variant in settings.variants:
            xs, ms, ss = [], [], []
            points = settings.eval_steps if kind == "steps" else settings.guidance
            for p in points:
                sel = [r[metric] for r in rows if r["variant"] == variant.name and metric in r and (
                    (r["step"] == p and r["guidance"] == 1.0) if kind == "steps"
                    else (r["step"] == settings.steps and r["guidance"] == p))]  # fmt: skip
                if sel:
                    m, s = _mean_std(sel)
                    xs.append(p)
                    ms.append(m)
                    ss.append(s)
            if xs:
                ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=variant.name)
        ax.set_xlabel("training steps" if kind == "steps" else "classifier-free guidance")
        ax.set_ylabel(metric)
        ax.set_title("quality vs training steps (guidance 1.0)" if kind == "steps" else "quality vs guidance (final)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{metric.replace(':', '_')}_vs_{kind}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------ driver
def run_quality(
    settings: QualitySettings,
    out: str | Path,
    command: str = "",
    log: Callable[[str], None] = print,
    weights: dict[str, str] | None = None,
    cache: str | Path | None = None,
) -> dict[str, Any]:
    """Train every variant and seed, score the checkpoints, write ``report.md``, ``results.json`` and plots.

    Everything is cached: finished runs and scores under ``out``, the domain classifier and the reference
    statistics under ``cache`` (default :func:`default_cache`), so an interrupted bench resumes where it stopped.
    """

    if not settings.variants:
        raise ValueError("no variants to compare")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache is not None else default_cache()
    weights = dict(weights or {})
    if any(m.endswith("fashion-cnn") or m == "accuracy" for m in settings.metrics) and "fashion-cnn" not in weights:
        weights["fashion-cnn"] = str(ensure_classifier(cache, log))
    refs = ensure_references(cache, settings, weights)
    rows, runs = [], {}
    total = len(settings.variants) * len(settings.seeds)
    done = 0
    tic = time.perf_counter()
    for seed in settings.seeds:
        for variant in settings.variants:
            cfg = run_config(settings, variant, seed)
            run_dir = out / "runs" / f"{variant.run_key()}-s{seed}"
            seconds = train_run(cfg, run_dir, log, settings.device)

            model, run_cfg = load_run(run_dir)  # the run's own config holds what it measured (data_std)
            shape = (model.config.in_channels, *model.config.input_size)
            runs[run_dir.name] = {"method": variant.method, "train_seconds": seconds,
                                  "train_flops": training_flops(run_cfg, shape, model.num_classes)}  # fmt: skip
            points = [(s, 1.0) for s in settings.eval_steps] + [(settings.steps, g) for g in settings.guidance]
            # Score files carry a hash of what the score depends on besides the run (sample count, metrics,
            # references, the sampler as used: the variant's settings over the run's), so a changed setting is
            # scored again instead of read stale.
            protocol = json.dumps([settings.num_samples, list(settings.metrics), [Path(r).name for r in refs],
                                   sampler_settings(variant, cfg)], sort_keys=True, default=str)  # fmt: skip
            tag = hashlib.sha1(protocol.encode()).hexdigest()[:8]
            for step, g in dict.fromkeys(points):
                name = f"{variant.name}-s{seed}-step{step}-g{g}-{tag}".replace(" ", "_").replace("/", "_")
                row = evaluate_checkpoint(settings, variant, cfg, run_dir, step, g, refs, weights,
                                          out / "scores" / f"{name}.json")  # fmt: skip
                rows.append(row)
            done += 1
            headline = headline_metric(rows)
            last = [r for r in rows if r["variant"] == variant.name and r["seed"] == seed and r["guidance"] == 1.0]
            log(f"[{done}/{total}] {variant.name} seed {seed}: {headline} = {last[-1][headline]:.1f} at guidance 1.0 "
                f"({time.perf_counter() - tic:.0f}s so far)")  # fmt: skip
    summary = summarize(rows, settings, runs)
    hardware = hardware_line(hardware_info(torch.device(settings.device)))
    report = markdown(summary, settings, command, hardware)
    (out / "report.md").write_text(report)
    payload = {"settings": _settings_dict(settings), "rows": rows, "summary": summary, "hardware": hardware}
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    plots = [str(p) for p in plot(rows, settings, out, headline_metric(rows))]
    domain = [k for k in summary["metric_keys"] if k.startswith("fd_") and k.endswith("fashion-cnn")]
    plots += [str(p) for p in plot(rows, settings, out, domain[0])] if domain else []
    return {"report": report, "rows": rows, "summary": summary, "plots": plots, "out": str(out)}


def _settings_dict(settings: QualitySettings) -> dict[str, Any]:
    d = dataclasses.asdict(settings)
    d["eval_steps"] = settings.eval_steps
    return d


def settings_from_args(args) -> QualitySettings:
    base = dict(BENCH_PRESETS[args.preset])
    variants = ABLATIONS[args.ablation]() if args.ablation else comparison_variants()
    wanted = list(base.get("methods", QualitySettings.methods))
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",")]
        unknown = set(wanted) - {"dfm", "fm", "cascade", "pyramidal"}
        if unknown:
            raise ValueError(f"--methods: unknown {sorted(unknown)}; choose from dfm, fm, cascade, pyramidal")
    variants = [v for v in variants if v.method in wanted]
    if args.only:
        if not args.ablation:
            raise ValueError("--only picks values of an ablation: use it with --ablation")
        labels = [o.strip() for o in args.only.split(",")]
        known = [v.label for v in variants]
        unknown = [o for o in labels if o not in known]
        if unknown:
            raise ValueError(f"--only: {unknown} not in the {args.ablation} ablation; choose from {', '.join(known)}")
        variants = [v for v in variants if v.label in labels]
    if args.ablation and args.methods:  # baselines asked for by name join the ablation as reference lines
        variants += [v for v in comparison_variants() if v.method != "dfm" and v.method in wanted]
    base["methods"] = tuple(wanted)
    for key in ("steps", "eval_points", "num_samples", "sample_batch", "threads"):
        value = getattr(args, key.replace("-", "_"), None)
        if value is not None:
            base[key] = value
    if args.seeds:
        base["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.guidance:
        base["guidance"] = tuple(float(g) for g in args.guidance.split(","))
    if args.device:
        base["device"] = args.device
    base["overrides"] = tuple(base.get("overrides", ())) + tuple(args.override)
    base["reference"] = args.reference
    settings = QualitySettings(variants=variants, **base)
    if 1.0 not in settings.guidance:
        raise ValueError("--guidance must include 1.0 (the convergence curve is measured at guidance 1.0)")
    if settings.steps < 1 or settings.num_samples < 2:
        raise ValueError("--steps must be >= 1 and --num-samples >= 2")
    return settings


def add_quality_parser(commands) -> None:
    p = commands.add_parser("quality", help="DFM vs Flow Matching, cascade and Pyramidal Flow at equal compute",
                            description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("--preset", default="cpu", choices=sorted(BENCH_PRESETS), help="bench size (default: cpu)")
    p.add_argument("--ablation", choices=sorted(ABLATIONS), help="run one of the paper's ablations instead")
    p.add_argument("--only", help="with --ablation: run only these values, e.g. --only 0.5,0.9 for stage-probs")
    p.add_argument(
        "--methods",
        help="subset of dfm,fm,cascade,pyramidal; with --ablation, e.g. dfm,fm adds Flow Matching as a reference line",
    )
    p.add_argument("--seeds", help="training seeds, e.g. 0,1,2")
    p.add_argument("--steps", type=int, help="optimiser steps per run")
    p.add_argument("--eval-points", type=int, help="checkpoints evaluated for the convergence curve")
    p.add_argument("--num-samples", type=int, help="samples per evaluation")
    p.add_argument("--sample-batch", type=int)
    p.add_argument("--guidance", help="guidance scales for the final checkpoint, e.g. 1.0,1.25,1.5")
    p.add_argument("--device")
    p.add_argument("--threads", type=int)
    p.add_argument("--reference", choices=["test", "val"], default="test",
                   help="score against the test split (default), or train without and score against 5,000 "
                        "held-aside training images (val) to choose settings without the test split")  # fmt: skip
    p.add_argument("-o", "--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="training setting applied to every variant (repeatable)")  # fmt: skip
    p.add_argument("--out", help="output directory (default: runs/bench-quality-<preset>[-<ablation>])")
    p.add_argument("--weights", type=_weights_arg, action="append", default=[], metavar="NAME=PATH",
                   help="use this extractor weights file, e.g. fashion-cnn=cnn.safetensors instead of training "
                        "the domain classifier (repeatable)")  # fmt: skip
    p.add_argument(
        "--cache",
        help="where the domain classifier and reference statistics are kept and shared "
        "between benches (default: $DFM_CACHE/bench, $DFM_CACHE=~/.cache/dfm)",
    )
    p.set_defaults(func=_run_quality_cli)


def _run_quality_cli(args) -> int:
    settings = settings_from_args(args)
    out = args.out or (f"runs/bench-quality-{args.preset}{'-' + args.ablation if args.ablation else ''}"
                       f"{'-val' if args.reference == 'val' else ''}")  # fmt: skip
    command = getattr(args, "command_line", None) or "dfm bench quality"
    result = run_quality(settings, out, command=command, cache=args.cache, weights=dict(args.weights))
    print(result["report"])
    print(f"report: {Path(out) / 'report.md'}; plots: {', '.join(result['plots'])}")
    return 0
