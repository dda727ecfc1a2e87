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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dfm.bench.measure import hardware_info, hardware_line
from dfm.bench.report import headline_metric, markdown, plot, summarize
from dfm.bench.variants import (
    ABLATIONS,
    BENCH_PRESETS,
    METRICS,
    SAMPLER_KEYS,
    VIDEO_METRICS,
    QualitySettings,
    Variant,
    add_quality_arguments,
    comparison_variants,
    settings_from_args,
)
from dfm.checkpoint import atomic_write_text, find_latest, list_checkpoints, load_checkpoint
from dfm.config import RunConfig
from dfm.data import build_dataset, is_latent_dir, read_latent_info
from dfm.eval import EvalConfig, SWDConfig, build_reference, evaluate, save_reference
from dfm.eval.extractors.classifier import train_fashion_classifier
from dfm.eval.images import ImageSet, load_fashion_mnist
from dfm.eval.weights import sha256_file
from dfm.generate import Generator
from dfm.methods import get_method
from dfm.presets import get_preset, with_method
from dfm.resolve import apply_overrides
from dfm.run import CONFIG_FILE, Run, resume_conflicts
from dfm.training import Dist, Trainer, TrainingError

__all__ = ["ABLATIONS", "BENCH_PRESETS", "METRICS", "VIDEO_METRICS", "QualitySettings", "Variant",
           "add_quality_parser", "comparison_variants", "run_quality", "settings_from_args"]  # fmt: skip


# ------------------------------------------------------------------------------------------------ pieces
def run_config(settings: QualitySettings, variant: Variant, seed: int) -> RunConfig:
    # Shared settings first, then the method switch (so that e.g. DFM's steps become FM's total at equal NFE).
    cfg = with_method(apply_overrides(get_preset(settings.preset), _data_overrides(settings)), variant.method)
    asked = [o for o in settings.overrides if o.startswith("method.loss_weighting=")]
    if variant.method == "fm" and asked:  # the switch gives Flow Matching its own loss; one asked for with -o wins
        cfg = apply_overrides(cfg, asked[-1:])
    # A baseline's twin predicts the velocity; a prediction target asked for with -o wins where the method has it.
    asked = [o for o in settings.overrides if o.startswith("method.prediction=")]
    if asked and asked[-1].split("=", 1)[1] in get_method(variant.method).predictions:
        cfg = apply_overrides(cfg, asked[-1:])
    cfg = apply_overrides(cfg, _own_options(settings.overrides, variant.method))
    cfg = apply_overrides(cfg, settings.method_overrides.get(variant.method, ()))  # that method's own settings
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


def split_folder(dataset: str) -> Path | None:
    """The folder of a data set built with splits (``dfm data``: ``<R>/fit`` beside ``<R>/val`` and ``<R>/test``)
    when ``dataset`` is its ``fit`` split, else None."""
    path = Path(dataset).expanduser()
    if path.name == "fit" and all((path.parent / s).is_dir() for s in ("val", "test")):
        return path.parent
    return None


OPTIONS = "method.options."


def _own_options(overrides: Sequence[str], method: str) -> list[str]:
    """The ``method.options.KEY=VALUE`` overrides whose KEY is a setting of ``method``: a method's own settings apply
    to its runs only (after the switch from the DFM config), so one bench can tune a baseline's option."""
    names = {f.name for f in dataclasses.fields(get_method(method).Options)}
    return [o for o in overrides if o.startswith(OPTIONS) and o[len(OPTIONS) :].split("=", 1)[0] in names]


def checked_run_config(settings: QualitySettings, variant: Variant, seed: int) -> RunConfig:
    """:func:`run_config`, checked before anything is trained; a sampler override that the DFM config cannot take
    says how to give it (the bench's overrides apply to the DFM config every method is derived from), and a method
    option that none of the bench's methods has is refused."""
    methods = sorted({v.method for v in settings.variants})
    for o in settings.overrides:
        if o.startswith(OPTIONS) and not any(o in _own_options([o], m) for m in methods):
            raise ValueError(f"-o {o}: not a setting of any method of this bench ({', '.join(methods)})")
    try:
        return run_config(settings, variant, seed)
    except ValueError as e:
        if not str(e).startswith("sampler."):
            raise
        raise ValueError(
            f"{e} (bench overrides apply to the DFM config every method is derived from: give the "
            f"sampler's steps as DFM's, e.g. -o sampler.steps=30,10 gives Flow Matching 40, or one method's own: "
            f"-o fm:sampler.steps=40)"
        ) from None


def _data_overrides(settings: QualitySettings) -> list[str]:
    """The bench's overrides of the DFM config every method is derived from (a method's own options apply after the
    switch, :func:`run_config`); with ``reference="val"`` training also leaves the held-aside images out."""
    overrides = [o for o in settings.overrides if not o.startswith(OPTIONS)]
    dataset = apply_overrides(get_preset(settings.preset), overrides).data.dataset
    missing = settings.data_hint and not Path(dataset).expanduser().exists()
    if missing:
        raise ValueError(f"{dataset} does not exist: {settings.data_hint}")
    if settings.reference == "val":
        if is_latent_dir(Path(dataset)):
            raise ValueError("--reference val needs pixel images; latents (dfm prepare) are scored on --reference test")
        if split_folder(dataset) is not None:  # trains on fit already; val and test are held aside
            return overrides
        if dataset != "fashion-mnist":
            raise ValueError("--reference val needs Fashion-MNIST or a data set built with splits (dfm data): "
                             "its training images have a held-aside part")  # fmt: skip
        overrides.append("data.dataset=fashion-mnist:fit")
    if settings.reference == "fit" and split_folder(dataset) is None:
        raise ValueError("--reference fit needs a data set built with splits (dfm data), trained on its fit split; "
                         "for Fashion-MNIST score against --reference val or test")  # fmt: skip
    return overrides


def draw_order(count: int) -> torch.Tensor:
    """The fixed order in which the bench draws the images of a ``dfm data`` split (its first N: the reference)."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(0))


def reference_images(cache: Path, settings: QualitySettings) -> str:
    """The real images the samples are compared with: the test split of the preset's data set (with
    ``reference="val"``, its held-aside images: Fashion-MNIST's 5,000, or the ``val`` split of a ``dfm data`` set;
    with ``reference="fit"``, a draw of the training split of a ``dfm data`` set, the convention of FID on
    unconditional benchmarks, for sets whose held-out splits hold too few sources to stand for the distribution)."""
    cfg = apply_overrides(get_preset(settings.preset), _data_overrides(settings))
    d = cfg.data
    if is_latent_dir(Path(d.dataset)):  # latents: samples are decoded, so compare with the images they encode
        info = read_latent_info(Path(d.dataset))
        if info.get("source_data") is None:
            raise ValueError(f"{d.dataset} does not record its images: run `dfm prepare` again to bench on it")
        d = dataclasses.replace(d, dataset=str(info["source_data"]), resolution=int(info["image_resolution"]))
    if d.dataset.startswith("fashion-mnist"):
        return f"fashion-mnist:{settings.reference}"
    splits = split_folder(d.dataset)
    if splits is not None:
        d = dataclasses.replace(d, dataset=str(splits / settings.reference))
    count = settings.num_reference or 1000
    name = d.dataset
    if "/" in name:  # a folder: its name and a hash of its path
        name = f"{Path(name).name}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    # A split of a `dfm data` set lists its crops photograph by photograph: the reference is a fixed random draw of
    # them ("mixed"), so that its first N images (the SWD's reference) come from every source, not the first few.
    mixed = "_mixed" if splits is not None else ""
    path = cache / f"ref_data_{name}_{d.resolution}px_{d.frames}f_n{count}{mixed}.npz"
    if not path.is_file():  # e.g. moving Fashion-MNIST: write the test clips once, as uint8 (N, T, H, W, C)
        ds = build_dataset(d.dataset, d.resolution, train=False, data_dir=d.data_dir, frames=d.frames,
                           num_clips=count)  # fmt: skip
        order = draw_order(len(ds)) if mixed else torch.arange(len(ds))
        x, y = ds.get_batch(order[:count], augment=False)
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


def train_run(
    cfg: RunConfig, run_dir: Path, log: Callable[[str], None], device: str = "cpu", progress: bool = False
) -> float:
    """Train (or finish) one run on ``device`` (``progress``: the trainer's progress bar); returns the wall time
    spent training it, summed over resumes."""

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
    log(f"training {run_dir.name} ({cfg.method.name}, seed {cfg.train.seed}, {cfg.train.steps} steps)")
    # keep_last covers this call's evaluation points; checkpoints of an earlier, shorter call are kept as well
    cfg = copy.deepcopy(cfg)
    cfg.train.keep_last += len(list_checkpoints(run_dir / "checkpoints"))
    tic = time.perf_counter()
    # The bench's device, not the Trainer's default (the CPU): --device cuda trains on the GPU, not only scores there.
    Trainer(cfg, run_dir, resume="auto", dist_info=Dist(device=torch.device(device)), progress=progress).fit()
    spent += time.perf_counter() - tic
    timing.write_text(json.dumps({"train_seconds": spent}) + "\n")
    return spent


def sampler_settings(variant: Variant, cfg: RunConfig) -> dict[str, Any]:
    """The sampler of a variant's points: its own settings over the bench command's config (not over a finished
    run's config.json, which keeps the sampler of the run's last training call)."""
    return {key: variant.sample.get(key) or getattr(cfg.sampler, key) for key in SAMPLER_KEYS}


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
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> dict:
    """Sample ``num_samples`` images from checkpoint ``step`` (EMA) and score them; cached in ``out_file``."""
    if out_file.is_file():
        return json.loads(out_file.read_text())

    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    gen = Generator.from_run(run_dir, checkpoint=ckpt, device=settings.device)
    sampler = gen.settings(**sampler_settings(variant, cfg), guidance=guidance)
    seeds = list(range(settings.num_samples))
    labels = gen.labels(seeds)
    log(f"scoring {run_dir.name} at step {step}, guidance {guidance}: sampling {len(seeds)} images")
    tic = time.perf_counter()
    images = gen.generate(seeds, labels, sampler, batch_size=settings.sample_batch, progress=progress).images
    sample_seconds = time.perf_counter() - tic
    log(f"sampled in {sample_seconds:.0f}s; scoring {', '.join(settings.metrics)}")
    native = gen.crop(((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    image_set = ImageSet(native, torch.tensor(labels), {"kind": "bench", "count": len(seeds)})
    config = EvalConfig(metrics=settings.metrics, num_reference=settings.num_samples, device=settings.device,
                        weights=weights, download=False, progress=progress,
                        swd=SWDConfig(min_resolution=8))  # fmt: skip
    result = evaluate(image_set, refs, config)
    row = {"variant": variant.name, "method": variant.method, "seed": gen.config.train.seed, "step": step,
           "guidance": guidance, "nfe": gen.network_evaluations(sampler) * (1 if guidance == 1 else 2),
           "sample_seconds": sample_seconds, **result["scores"]}  # fmt: skip
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    tmp.replace(out_file)
    return row


def training_flops(cfg: RunConfig, sample_shape: Sequence[int], num_classes: int) -> float:
    """3 x forward FLOPs x images seen, counted on the training objective's own forward pass (one sample);
    the cascade's two phases are counted separately and weighted by their share of the steps."""
    method = get_method(cfg.method.name)
    m = dataclasses.replace(cfg.method, level_std=cfg.method.level_std or None)
    model = method.network(cfg, sample_shape, num_classes)
    objective = method.objective(m, method.decomposition(m, standardized=False), cfg.train.steps)
    x, y = torch.zeros(1, *sample_shape), torch.zeros(1, dtype=torch.long)
    switch = getattr(objective, "switch_step", None)
    phases = [0] if switch is None else [0, switch]
    flops = []
    for step in phases:
        for callback in method.callbacks(m, objective):
            callback.on_step_begin(step, model, None)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            objective.loss(model, x, y, generator=torch.Generator().manual_seed(0), step=step)
        flops.append(counter.get_total_flops())
    if switch is None:
        forward = flops[0]
    else:
        first = min(switch, cfg.train.steps) / cfg.train.steps
        forward = first * flops[0] + (1 - first) * flops[1]
    return 3.0 * forward * cfg.train.batch_size * cfg.train.steps


# ------------------------------------------------------------------------------------------------ driver
def run_quality(
    settings: QualitySettings,
    out: str | Path,
    command: str = "",
    log: Callable[[str], None] = print,
    weights: dict[str, str] | None = None,
    cache: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train every variant and seed, score the checkpoints, write ``report.md``, ``results.json`` and plots
    (``progress``: progress bars on stderr while a run trains, samples and is scored; the CLI's default).

    Everything is cached: finished runs and scores under ``out``, the domain classifier and the reference
    statistics under ``cache`` (default :func:`default_cache`), so an interrupted bench resumes where it stopped.
    """

    if not settings.variants:
        raise ValueError("no variants to compare")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    configs = {(s, v.name): checked_run_config(settings, v, s) for s in settings.seeds for v in settings.variants}
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
            cfg = configs[(seed, variant.name)]
            run_dir = out / "runs" / f"{variant.run_key()}-s{seed}"
            seconds = train_run(cfg, run_dir, log, settings.device, progress=progress)

            run = Run.open(run_dir)  # the run's own config holds what it measured (data_std)
            runs[run_dir.name] = {"method": variant.method, "train_seconds": seconds,
                                  "train_flops": training_flops(run.config, run.spec.sample_shape,
                                                                run.spec.num_classes)}  # fmt: skip
            points = [(s, 1.0) for s in settings.eval_steps] + [(settings.steps, g) for g in settings.guidance]
            # Score files carry a hash of what the score depends on besides the run (sample count, metrics,
            # references, the sampler as used: the variant's settings over the run's), so a changed setting is
            # scored again instead of read stale.
            # (a sampler setting at its default that older versions did not have is left out: their files stay valid)
            sampler = {k: v for k, v in sampler_settings(variant, cfg).items()
                       if not (k == "shift" and v == 1 or k == "shift_from" and v == 0)}  # fmt: skip
            protocol = json.dumps([settings.num_samples, list(settings.metrics), [Path(r).name for r in refs],
                                   sampler], sort_keys=True, default=str)  # fmt: skip
            tag = hashlib.sha1(protocol.encode()).hexdigest()[:8]
            for step, g in dict.fromkeys(points):
                name = f"{variant.name}-s{seed}-step{step}-g{g}-{tag}".replace(" ", "_").replace("/", "_")
                row = evaluate_checkpoint(settings, variant, cfg, run_dir, step, g, refs, weights,
                                          out / "scores" / f"{name}.json", log, progress)  # fmt: skip
                rows.append(row)
            done += 1
            headline = headline_metric(rows)
            last = [r for r in rows if r["variant"] == variant.name and r["seed"] == seed and r["guidance"] == 1.0]
            log(f"[{done}/{total}] {variant.name} seed {seed}: {headline} = {last[-1][headline]:.1f} at guidance 1.0 "
                f"({time.perf_counter() - tic:.0f}s so far)")  # fmt: skip
    summary = summarize(rows, settings, runs)
    hardware = hardware_line(hardware_info(torch.device(settings.device)))
    report = markdown(
        summary,
        settings,
        command,
        hardware,
        [
            *_data_overrides(settings),
            *(o for o in settings.overrides if o.startswith(OPTIONS)),
            *(f"{m}:{o}" for m, scoped in settings.method_overrides.items() for o in scoped),
        ],
    )
    atomic_write_text(out / "report.md", report)
    payload = {"settings": _settings_dict(settings), "rows": rows, "summary": summary, "hardware": hardware}
    atomic_write_text(out / "results.json", json.dumps(payload, indent=1) + "\n")
    plots = [str(p) for p in plot(rows, settings, out, headline_metric(rows))]
    domain = [k for k in summary["metric_keys"] if k.startswith("fd_") and k.endswith("fashion-cnn")]
    plots += [str(p) for p in plot(rows, settings, out, domain[0])] if domain else []
    return {"report": report, "rows": rows, "summary": summary, "plots": plots, "out": str(out)}


def _settings_dict(settings: QualitySettings) -> dict[str, Any]:
    d = dataclasses.asdict(settings)
    d["eval_steps"] = settings.eval_steps
    return d


def add_quality_parser(commands) -> None:
    add_quality_arguments(commands).set_defaults(func=_run_quality_cli)


def _run_quality_cli(args) -> int:
    settings = settings_from_args(args)
    out = args.out or (f"runs/bench-quality-{args.preset}{'-' + args.ablation if args.ablation else ''}"
                       f"{'' if args.reference == 'test' else '-' + args.reference}")  # fmt: skip
    command = getattr(args, "command_line", None) or "dfm bench quality"
    result = run_quality(
        settings, out, command=command, cache=args.cache, weights=dict(args.weights), progress=not args.no_progress
    )
    print(result["report"])
    print(f"report: {Path(out) / 'report.md'}; plots: {', '.join(result['plots'])}")
    return 0
