"""What ``dfm bench quality`` compares: its variants (the methods, or one setting of an ablation), its presets and
its command line. The driver is :mod:`dfm.bench.quality`, the report :mod:`dfm.bench.report`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dfm.eval.cli import _weights_arg

METRICS = ("fd:efficientnet-lite0", "fd:fashion-cnn", "swd", "accuracy")
#: Videos: the image metrics frame by frame, plus temporal consistency (FVD needs I3D weights: see docs).
VIDEO_METRICS = (*METRICS, "temporal")
HEADLINE = "fd_efficientnet-lite0"
#: the sampler settings a variant may set (guidance is set per evaluation point)
SAMPLER_KEYS = ("steps", "thresholds", "solver", "time_shift", "shift", "shift_from")


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
    #: per method, applied to that method's runs only, after the switch from the DFM config (a baseline's own best
    #: setting, e.g. ``{"fm": ("method.main_loc=-1.0",)}``); on the command line ``-o fm:method.main_loc=-1.0``
    method_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    metrics: tuple[str, ...] = METRICS
    num_reference: int | None = None  #: test images behind the reference statistics (None = all 10,000)
    device: str = "cpu"
    threads: int = 0
    #: ``test``: score against the test split (the reported numbers); ``val``: train on ``fashion-mnist:fit`` and
    #: score against the 5,000 held-aside training images (a ``dfm data`` set: against its ``val`` split), for
    #: choosing settings without looking at the test split; ``fit``: a fixed draw of a ``dfm data`` set's training
    #: crops (for sets with too few source photographs in their held-out splits)
    reference: str = "test"
    data_hint: str = ""  #: what to run when the preset's data is missing

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
    "precondition": lambda: _ablation("precondition", [("off", ["method.precondition=false",
                                                                "method.prediction=velocity"], {}),
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
    # Photographs with real fine detail (dfm data photos): 64x64 RGB crops, split by photograph; patch 8 keeps 64
    # tokens. Unconditional, so the metrics are the ImageNet-feature FD, the per-level SWD and how much detail each
    # level holds (sigma: too much or too little, which a level's SWD cannot say). Every method at the settings the
    # photograph study found best for all three (docs/RESULTS.md): a model as wide as its token (8x8x3 = 192 values),
    # predicting the data (baselines included) and the overlapping output head; Flow Matching with its training
    # times drawn nearer the noise (main_loc -1.0: better on both metrics at 64 and 128 px on photographs only, so
    # not in its preset), and Pyramidal Flow with the same law in each of its time windows (LogitNormal(-1.0, 1):
    # better on both metrics wherever it was compared with the uniform law, at 64 and 128 px; "Pyramidal Flow's own
    # time law at 128 px"). Six runs of 6,400 steps: about 9 hours on two CPU cores.
    "cpu-photo": dict(preset="quickstart", methods=("dfm", "fm", "pyramidal"), seeds=(0, 1), steps=6400,
                      eval_points=4, num_samples=1000, guidance=(1.0,), sample_batch=250, num_reference=None,
                      metrics=("fd:efficientnet-lite0", "swd", "sigma"),
                      overrides=("data.dataset=data/photos/64/fit", "data.resolution=64",
                                 "model.overrides.patch_size=8", "data.random_flip=true",
                                 "model.overrides.hidden_size=192", "model.overrides.head_overlap=true",
                                 "method.prediction=data"),
                      method_overrides={"fm": ("method.main_loc=-1.0",),
                                        "pyramidal": ("method.options.time=logit_normal", "method.main_loc=-1.0")},
                      data_hint="build it with `dfm data photos --source debian-photos --crops-per-photo 256 --out "
                                "data/photos`, or give -o data.dataset=<out>/64/fit"),
    # A third kind of data: glyphs of the installed fonts (dfm data glyphs), 36 classes, thin strokes and sharp edges.
    "cpu-glyph": dict(preset="quickstart", methods=("dfm", "fm"), seeds=(0, 1), steps=1600, eval_points=2,
                      num_samples=1000, guidance=(1.0,), sample_batch=250, num_reference=None,
                      metrics=("fd:efficientnet-lite0", "swd", "sigma"),
                      overrides=("data.dataset=data/glyphs/32/fit",),
                      data_hint="build it with `dfm data glyphs --out data/glyphs`, or give "
                                "-o data.dataset=<out>/32/fit"),
    "gpu": dict(preset="quickstart", seeds=(0, 1, 2), steps=20000, eval_points=5, num_samples=10000,
                sample_batch=1000, overrides=("model.name=DFM-DiT-Mini", "optim.lr=5e-4", "train.precision=bf16",
                                              "train.batch_size=256", "optim.warmup_steps=1000"), device="cuda"),
    "video-cpu": dict(preset="video-quickstart", methods=("dfm", "fm"), seeds=(0, 1), steps=600, eval_points=3,
                      num_samples=100, guidance=(1.0, 1.5), sample_batch=100, num_reference=500,
                      metrics=VIDEO_METRICS),
    "video-smoke": dict(preset="video-quickstart", methods=("dfm", "fm"), seeds=(0,), steps=2, eval_points=1,
                        num_samples=4, guidance=(1.0, 1.5), sample_batch=4, num_reference=8, metrics=VIDEO_METRICS,
                        overrides=("model.overrides.depth=1", "model.overrides.hidden_size=32",
                                   "model.overrides.num_heads=2", "sampler.steps=2,2", "train.batch_size=4",
                                   "data.frames=4", "data.num_clips=16", "train.num_sample_images=2")),
    "smoke": dict(preset="quickstart", seeds=(0,), steps=2, eval_points=1, num_samples=16, guidance=(1.0, 1.5),
                  num_reference=64,
                  sample_batch=16, overrides=("model.overrides.depth=1", "model.overrides.hidden_size=32",
                                              "model.overrides.num_heads=2", "sampler.steps=2,2",
                                              "train.batch_size=8", "train.num_sample_images=4")),
}  # fmt: skip


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
    shared, scoped = split_overrides(args.override, wanted)
    base["overrides"] = tuple(base.get("overrides", ())) + tuple(shared)
    # the preset's per-method settings yield to a setting of the same key given with -o for every variant
    given = {o.split("=", 1)[0] for o in shared}
    preset_scoped = {m: tuple(o for o in os if o.split("=", 1)[0] not in given)
                     for m, os in base.get("method_overrides", {}).items()}  # fmt: skip
    base["method_overrides"] = {m: (*preset_scoped.get(m, ()), *scoped.get(m, ())) for m in wanted
                                if preset_scoped.get(m) or scoped.get(m)}  # fmt: skip
    base["reference"] = args.reference
    settings = QualitySettings(variants=variants, **base)
    if 1.0 not in settings.guidance:
        raise ValueError("--guidance must include 1.0 (the convergence curve is measured at guidance 1.0)")
    if settings.steps < 1 or settings.num_samples < 2:
        raise ValueError("--steps must be >= 1 and --num-samples >= 2")
    return settings


def split_overrides(overrides: Sequence[str], methods: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``-o`` values: those for every variant (``section.key=value``) and those for one method's runs only
    (``method:section.key=value``, e.g. ``fm:method.main_loc=-1.0``), by method."""
    shared: list[str] = []
    scoped: dict[str, list[str]] = {}
    for o in overrides:
        key = o.split("=", 1)[0]
        if ":" not in key:
            shared.append(o)
            continue
        method, setting = o.split(":", 1)
        if method not in methods:
            raise ValueError(f"-o {o}: {method!r} is not a method of this bench; choose from {', '.join(methods)} "
                             "(METHOD:SECTION.KEY=VALUE sets one method's runs only)")  # fmt: skip
        if "=" not in setting or not setting.split("=", 1)[0]:
            raise ValueError(f"-o {o}: expected METHOD:SECTION.KEY=VALUE, e.g. fm:method.main_loc=-1.0")
        scoped.setdefault(method, []).append(setting)
    return shared, scoped


def add_quality_arguments(commands):
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
    p.add_argument("--reference", choices=["test", "val", "fit"], default="test",
                   help="score against the test split (default), or train without and score against 5,000 "
                        "held-aside training images (val) to choose settings without the test split; fit: a draw "
                        "of the training split of a dfm data set (see docs/RESULTS.md on the photographs)")  # fmt: skip
    p.add_argument("-o", "--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="training setting applied to every variant (repeatable); METHOD:SECTION.KEY=VALUE "
                        "applies to one method's runs only, e.g. fm:method.main_loc=-1.0")  # fmt: skip
    p.add_argument("--out", help="output directory (default: runs/bench-quality-<preset>[-<ablation>])")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the progress bars of training, sampling and scoring (the log lines stay)",
    )
    p.add_argument("--weights", type=_weights_arg, action="append", default=[], metavar="NAME=PATH",
                   help="use this extractor weights file, e.g. fashion-cnn=cnn.safetensors instead of training "
                        "the domain classifier (repeatable)")  # fmt: skip
    p.add_argument(
        "--cache",
        help="where the domain classifier and reference statistics are kept and shared "
        "between benches (default: $DFM_CACHE/bench, $DFM_CACHE=~/.cache/dfm)",
    )
    return p
