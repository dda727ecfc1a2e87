"""The evaluation protocol: which metrics, which extractors, which references, recorded together.

Metric names (`metrics` argument):

- `fid` (= `fd:inception-v3`), `fdd` (= `fd:dinov2-vitl14`), `fvd` (= `fd:i3d`, videos),
  `fd:<extractor>`: Fréchet distance.
- `is` (= `is:inception-v3`), `is:<extractor>`: Inception Score over 10 splits.
- `pr` (= `pr:inception-v3`), `pr:<extractor>`: precision and recall, k = 3.
- `swd`: multi-scale sliced Wasserstein distance (no network).
- `sigma`: how much detail each scale holds: the standard deviation of each level of the SWD's Laplacian pyramid,
  for the samples and the reference (:func:`dfm.eval.swd.level_sigma`; no network).
- `accuracy`: class accuracy of labelled samples under the `fashion-cnn` classifier.
- `clip`: CLIP score of text-conditioned samples (prompts from the npz key `prompts` or a file).
- `temporal`: temporal consistency of videos: the mean absolute change between consecutive frames of the
  samples and of the reference, and their relative gap (no network).
- `seams:<P>` (`seams` = `seams:8`): token seams, how much stronger the edges on a P-pixel grid are than the
  others (:func:`dfm.eval.seams.seam_ratio`; 1 for pictures without a grid; the reference's value, if one is given,
  goes beside it). P is the model's patch size in pixels of the final image.

Videos with an image extractor (or `swd`, `sigma`, `seams`, `accuracy`) are scored **per frame**: every frame is an
image, labels repeat over the frames, and the score names carry `frames` (`fd_frames_<extractor>`, `swd_frames_<res>`,
`sigma_frames_<res>`, `class_accuracy_frames`).
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .clip_score import clip_score, load_clip
from .extractors import EXTRACTORS, FeatureExtractor, build_extractor
from .frechet import FeatureStats
from .images import ImageSet, load_images, read_sampling_settings
from .inception_score import inception_score
from .pixel_scores import as_frames, seam_scores, sigma_scores, swd_scores, temporal_scores
from .precision_recall import precision_recall
from .reference import ReferenceStats, is_reference_file, load_reference
from .seams import seam_period
from .swd import SWDConfig

__all__ = ["EvalConfig", "parse_metric", "extract", "evaluate", "build_reference"]

_ALIASES = {
    "fid": "fd:inception-v3",
    "fdd": "fd:dinov2-vitl14",
    "fvd": "fd:i3d",
    "is": "is:inception-v3",
    "pr": "pr:inception-v3",
}
_SCORE_NAMES = {"fd:inception-v3": "fid", "fd:dinov2-vitl14": "fdd", "fd:i3d": "fvd"}


def parse_metric(metric: str) -> tuple[str, str | None]:
    """'fid' -> ('fd', 'inception-v3'); 'swd' -> ('swd', None); 'accuracy' -> ('accuracy', 'fashion-cnn')."""
    name = _ALIASES.get(metric, metric)
    if name in ("swd", "sigma", "clip", "temporal"):
        return name, None
    if name == "seams" or name.startswith("seams:"):
        seam_period(name)  # checked here, used by the scoring step
        return "seams", None
    if name == "accuracy":
        return "accuracy", "fashion-cnn"
    kind, _, extractor = name.partition(":")
    if kind not in ("fd", "is", "pr") or extractor not in EXTRACTORS:
        raise ValueError(
            f"unknown metric {metric!r}; use fid, fdd, fvd, is, pr, swd, sigma, accuracy, clip, temporal, seams[:<P>], "
            "or fd:/is:/pr:<extractor> "
            f"with an extractor from {', '.join(sorted(EXTRACTORS))}"
        )
    return kind, extractor


@dataclass
class EvalConfig:
    """Every setting that changes a score. Defaults are the paper's headline metrics."""

    metrics: Sequence[str] = ("fdd", "fid", "is")
    num_samples: int | None = None  # first N samples (None: all)
    num_reference: int | None = None  # first N reference images (None: all)
    batch_size: int = 64
    device: str = "cpu"
    weights: dict[str, str] = field(default_factory=dict)  # extractor name -> weights file
    download: bool = True
    pr_k: int = 3
    is_splits: int = 10
    swd: SWDConfig = field(default_factory=SWDConfig)
    swd_max_images: int = 8192
    prompts_file: str | None = None  # one prompt per line, for `clip` (else the npz key `prompts`)
    progress: bool = True


@dataclass
class Extracted:
    stats: FeatureStats
    features: torch.Tensor | None
    logits: torch.Tensor | None


def extract(
    extractor: FeatureExtractor,
    images: torch.Tensor,
    batch_size: int = 64,
    keep_features: bool = False,
    keep_logits: bool = False,
    progress: bool = True,
    desc: str = "",
) -> Extracted:
    """Stream images (uint8 (N, C, H, W)) through `extractor` in batches into float64 statistics.

    Under torch.distributed each rank takes every world_size-th image and the statistics are merged
    across ranks; kept features and logits then hold this rank's share only.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        images = images[dist.get_rank() :: dist.get_world_size()]
    stats = FeatureStats(extractor.feature_dim)
    features, logits = [], []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc or extractor.name, disable=not progress, unit="batch"):
        out = extractor(images[start : start + batch_size])
        stats.update(out.features)
        if keep_features:
            features.append(out.features.float().cpu())
        if keep_logits:
            if out.logits is None:
                raise ValueError(f"extractor {extractor.name} has no classifier head; it cannot give IS or accuracy")
            logits.append(out.logits.float().cpu())
    stats.all_reduce()
    return Extracted(stats, torch.cat(features) if features else None, torch.cat(logits) if logits else None)


def _check_input_kind(extractor: FeatureExtractor, image_set: ImageSet, what: str) -> None:
    is_video = image_set.images.ndim == 5
    if is_video != extractor.takes_video:
        kind, wanted = ("videos", "images") if is_video else ("images", "videos")
        raise ValueError(f"the {what} are {kind} but extractor {extractor.name} takes {wanted}")


def _environment(device: str) -> dict:
    try:
        dfm_version = version("dfm")
    except Exception:
        dfm_version = None
    return {
        "dfm": dfm_version,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device": device,
    }


def evaluate(
    samples: str | Path | ImageSet, references: Sequence[str | Path], config: EvalConfig | None = None
) -> dict:
    """Score `samples` against `references`; returns {"scores": {...}, "protocol": {...}}.

    A reference is an image source (see `load_images`) or a reference-statistics `.npz`; a statistics
    file serves only its own extractor.
    """
    config = config or EvalConfig()
    parsed = [parse_metric(m) for m in config.metrics]
    sample_set = samples if isinstance(samples, ImageSet) else load_images(samples)
    sample_set = sample_set.subset(config.num_samples)
    ref_images, ref_stats = _load_references(references, config.num_reference)
    _require_reference(parsed, references)
    protocol = _protocol(samples, sample_set, ref_images, ref_stats, config)

    scores: dict[str, float] = {}
    for extractor_name in dict.fromkeys(e for _, e in parsed if e is not None):
        kinds = {kind for kind, e in parsed if e == extractor_name}
        scores.update(_extractor_scores(extractor_name, kinds, sample_set, ref_images, ref_stats, config, protocol))
    all_kinds = {kind for kind, _ in parsed}
    if "swd" in all_kinds:
        scores.update(swd_scores(sample_set, ref_images, config.swd, config.swd_max_images, protocol))
    if "sigma" in all_kinds:
        scores.update(sigma_scores(sample_set, ref_images, config.swd.min_resolution, protocol))
    if "temporal" in all_kinds:
        scores.update(temporal_scores(sample_set, ref_images))
    if "clip" in all_kinds:
        scores["clip_score"] = _clip_score(sample_set, config, protocol)
    periods = sorted({seam_period(m) for m, (kind, _) in zip(config.metrics, parsed) if kind == "seams"})
    if periods:
        scores.update(seam_scores(sample_set, ref_images, periods, protocol))
    return {"scores": scores, "protocol": protocol}


def _load_references(
    references: Sequence[str | Path], num_reference: int | None
) -> tuple[ImageSet | None, dict[str, ReferenceStats]]:
    """At most one image reference (its first `num_reference` images) and the statistics files by extractor."""
    ref_images: ImageSet | None = None
    ref_stats: dict[str, ReferenceStats] = {}
    for ref in references:
        if is_reference_file(ref):
            loaded = load_reference(ref)
            ref_stats[loaded.extractor] = loaded
        elif ref_images is None:
            ref_images = load_images(ref)
            ref_images = ref_images.subset(min(len(ref_images), num_reference or len(ref_images)))
        else:
            raise ValueError(f"only one image reference can be given, got a second one: {ref}")
    return ref_images, ref_stats


def _require_reference(parsed: Sequence[tuple[str, str | None]], references: Sequence[str | Path]) -> None:
    """Fail early when a metric that compares with a reference has none."""
    needs_reference = {kind for kind, _ in parsed if kind in ("fd", "pr", "swd", "temporal")}
    if needs_reference and not references:
        raise ValueError(f"metrics {sorted(needs_reference)} need a reference: pass --ref DATASET|FOLDER|NPZ|STATS.npz")


def _protocol(
    samples: str | Path | ImageSet,
    sample_set: ImageSet,
    ref_images: ImageSet | None,
    ref_stats: dict[str, ReferenceStats],
    config: EvalConfig,
) -> dict:
    """The record of what was scored and how; the metric steps add their extractors and settings."""
    protocol: dict = {
        "metrics": list(config.metrics),
        "samples": {**sample_set.source, "count": len(sample_set)},
        "references": [],
        "extractors": {},
        "settings": {"batch_size": config.batch_size, "pr_k": config.pr_k, "is_splits": config.is_splits},
        "sampling": None if isinstance(samples, ImageSet) else read_sampling_settings(samples),
        "environment": _environment(config.device),
    }
    if ref_images is not None:
        protocol["references"].append(ref_images.source)
    for name, ref in ref_stats.items():
        protocol["references"].append(
            {"kind": "statistics", "extractor": name, "count": ref.stats.count, **ref.protocol}
        )
    return protocol


def _extractor_scores(
    extractor_name: str,
    kinds: set[str],
    sample_set: ImageSet,
    ref_images: ImageSet | None,
    ref_stats: dict[str, ReferenceStats],
    config: EvalConfig,
    protocol: dict,
) -> dict[str, float]:
    """The scores of the metric `kinds` (fd, pr, is, accuracy) that share the extractor `extractor_name`."""
    extractor = build_extractor(extractor_name, config.weights.get(extractor_name), config.device, config.download)
    protocol["extractors"][extractor_name] = extractor.describe()
    per_frame, samples_in, refs_in = _extractor_inputs(extractor, sample_set, ref_images, protocol)
    fake = extract(
        extractor,
        samples_in.images,
        config.batch_size,
        keep_features="pr" in kinds,
        keep_logits=bool(kinds & {"is", "accuracy"}),
        progress=config.progress,
        desc=f"{extractor_name} samples",
    )
    real: Extracted | None = None
    if kinds & {"fd", "pr"}:
        real = _reference_features(extractor, extractor_name, kinds, ref_stats.get(extractor_name), refs_in, config)
    scores = _feature_scores(extractor_name, kinds, fake, real, per_frame, config)
    if "accuracy" in kinds:
        scores.update(_class_accuracy(extractor, extractor_name, fake, samples_in, refs_in, per_frame, config))
    return scores


def _extractor_inputs(
    extractor: FeatureExtractor, sample_set: ImageSet, ref_images: ImageSet | None, protocol: dict
) -> tuple[bool, ImageSet, ImageSet | None]:
    """(per_frame, samples, reference) as `extractor` takes them: video frames for an image extractor."""
    per_frame = sample_set.images.ndim == 5 and not extractor.takes_video
    samples_in = as_frames(sample_set) if per_frame else sample_set
    refs_in = as_frames(ref_images) if per_frame and ref_images is not None else ref_images
    if per_frame:
        protocol["settings"]["per_frame"] = True
    _check_input_kind(extractor, samples_in, "samples")
    if refs_in is not None:
        _check_input_kind(extractor, refs_in, "reference")
    return per_frame, samples_in, refs_in


def _reference_features(
    extractor: FeatureExtractor,
    extractor_name: str,
    kinds: set[str],
    stats_file: ReferenceStats | None,
    refs_in: ImageSet | None,
    config: EvalConfig,
) -> Extracted:
    """The reference side of FD and PR: a statistics file that serves, else the reference images."""
    if stats_file is not None and ("pr" not in kinds or stats_file.features is not None):
        features = None if stats_file.features is None else torch.from_numpy(stats_file.features)
        return Extracted(stats_file.stats, features, None)
    if refs_in is not None:
        return extract(
            extractor,
            refs_in.images,
            config.batch_size,
            keep_features="pr" in kinds,
            progress=config.progress,
            desc=f"{extractor_name} reference",
        )
    raise ValueError(
        f"no reference for extractor {extractor_name}: pass reference images, or statistics built with "
        f"`dfm eval ref --extractor {extractor_name}`" + (" --save-features" if "pr" in kinds else "")
    )


def _feature_scores(
    extractor_name: str,
    kinds: set[str],
    fake: Extracted,
    real: Extracted | None,
    per_frame: bool,
    config: EvalConfig,
) -> dict[str, float]:
    """Fréchet distance, precision and recall, and Inception Score, as `kinds` ask."""
    scores: dict[str, float] = {}
    suffix = "" if extractor_name == "inception-v3" else f"_{extractor_name}"
    if per_frame:
        suffix = f"_frames{suffix}"
    if "fd" in kinds:
        fd_name = f"fd_frames_{extractor_name}" if per_frame else f"fd:{extractor_name}"
        scores[_SCORE_NAMES.get(fd_name, fd_name.replace(":", "_"))] = fake.stats.frechet_distance(real.stats)
    if "pr" in kinds:
        precision, recall = precision_recall(real.features, fake.features, config.pr_k)
        scores[f"precision{suffix}"], scores[f"recall{suffix}"] = precision, recall
    if "is" in kinds:
        mean, std = inception_score(fake.logits, min(config.is_splits, len(fake.logits)))
        scores[f"is{suffix}_mean"], scores[f"is{suffix}_std"] = mean, std
    return scores


def _class_accuracy(
    extractor: FeatureExtractor,
    extractor_name: str,
    fake: Extracted,
    samples_in: ImageSet,
    refs_in: ImageSet | None,
    per_frame: bool,
    config: EvalConfig,
) -> dict[str, float]:
    """Class accuracy of the labelled samples, and of labelled reference images as the ceiling."""
    if samples_in.labels is None:
        raise ValueError(
            "metric 'accuracy' needs labelled samples: an npz key 'labels' or file names containing class<K>"
        )
    predictions = fake.logits.argmax(1)
    num_classes = fake.logits.shape[1]
    wrong = samples_in.labels[(samples_in.labels < 0) | (samples_in.labels >= num_classes)]
    if len(wrong):
        raise ValueError(
            f"sample label {int(wrong[0])} is not a class of the {extractor_name} classifier "
            f"(0..{num_classes - 1}): give labels of its classes, or leave out the accuracy metric"
        )
    key = "class_accuracy_frames" if per_frame else "class_accuracy"
    scores = {key: (predictions == samples_in.labels[: len(predictions)]).double().mean().item()}
    if refs_in is not None and refs_in.labels is not None:  # the ceiling: the same classifier on real data
        count = min(len(refs_in.images), len(predictions))
        real_logits = extract(extractor, refs_in.images[:count], config.batch_size, keep_logits=True,
                              progress=False, desc=f"{extractor_name} reference").logits  # fmt: skip
        hits = real_logits.argmax(1) == refs_in.labels[:count]
        scores[f"{key}_ref"] = hits.double().mean().item()
    return scores


def _clip_score(sample_set: ImageSet, config: EvalConfig, protocol: dict) -> float:
    if sample_set.images.ndim != 4:
        raise ValueError("metric 'clip' takes images; these samples are videos")
    prompts = sample_set.prompts
    if config.prompts_file is not None:
        prompts = Path(config.prompts_file).read_text().splitlines()[: len(sample_set)]
        protocol["settings"]["prompts_file"] = config.prompts_file
    if prompts is None:
        raise ValueError("metric 'clip' needs prompts: an npz key 'prompts' or --prompts FILE (one per line)")
    model, tokenizer, entry = load_clip(config.weights.get("clip"), config.weights.get("clip-vocab"))
    protocol["extractors"]["clip"] = entry
    return clip_score(model.to(config.device), tokenizer, sample_set.images, prompts, config.batch_size)


def build_reference(
    source: str | Path | ImageSet,
    extractor_name: str,
    num_samples: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    weights: str | None = None,
    save_features: bool = False,
    download: bool = True,
    progress: bool = True,
) -> ReferenceStats:
    """Fit the reference Gaussian of `extractor_name` features over an image source."""
    image_set = (source if isinstance(source, ImageSet) else load_images(source)).subset(num_samples)
    extractor = build_extractor(extractor_name, weights, device, download)
    if image_set.images.ndim == 5 and not extractor.takes_video:
        image_set = as_frames(image_set)  # per-frame statistics of clips for an image extractor
    _check_input_kind(extractor, image_set, "reference")
    out = extract(extractor, image_set.images, batch_size, keep_features=save_features, progress=progress)
    protocol = {"source": {**image_set.source, "count": len(image_set)}, "extractor": extractor.describe()}
    features = None if out.features is None else out.features.numpy()
    return ReferenceStats(extractor_name, out.stats, protocol, features)
