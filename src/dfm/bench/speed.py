"""`dfm bench speed`: the cost of DFM against plain Flow Matching at the same token count (paper, Table 2).

Both methods use the same backbone (:class:`dfm.models.DFMDiT`) and the same token grid: Flow Matching is the
one-stage model (``stage_factors=(1,)``), DFM the two-stage model on a Laplacian pyramid (``(2, 1)``; its coarse
level is patchified with half the patch size, so both give ``input_size / patch_size`` tokens). Measured:

* parameters (meta device) and forward FLOPs per sample (flop counter on the meta device);
* the **full training step**: decompose the batch, draw stages/times/noise, forward, loss, backward, gradient
  clipping and the AdamW step, as in :meth:`dfm.training.Trainer.train_step` (without data loading and EMA);
* sampling at equal NFE: DFM with its stage schedule (paper: 30 + 10 Euler steps, τ = 0.7) against Flow
  Matching with the same total number of Euler steps, same batch;
* peak memory of a training step and of sampling (see :class:`dfm.bench.measure.PeakMemory`);
* on CUDA: images/s and model FLOP utilisation against the card's dense bf16 peak.

The two methods run round by round (interleaved), so that a load change of a shared machine hits both; the
report gives the medians and the median of the per-round ratios.

Example:
    >>> from dfm.bench.speed import SpeedSettings, build_setups
    >>> setups = build_setups(SpeedSettings(model="DiT-Tiny", input_shape=(16, 16, 1)))
    >>> [(s.config.stage_factors, s.config.num_tokens, sum(s.settings.steps)) for s in setups.values()]
    [((1,), 16, 40), ((2, 1), 16, 40)]
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dfm.bench.measure import (
    PeakMemory,
    forward_flops,
    hardware_info,
    mfu,
    paired_ratio,
    peak_tflops_for,
    summarize,
    time_interleaved,
)
from dfm.config import MethodConfig, OptimConfig, SamplerConfig
from dfm.decomposition import Decomposition
from dfm.methods import get_method, stage_factors
from dfm.models import DFMDiT, DiTConfig, count_parameters, create_config
from dfm.objective import DFMObjective
from dfm.sampling import StageSampler

METHODS = ("fm", "dfm")
PRECISIONS = ("fp32", "bf16")

#: The paper's Table 2 (DiT-XL/2, 512 px, 8xH100): (DFM, FM).
PAPER_TABLE2: dict[str, tuple[float, float]] = {
    "params_m": (716.5, 712.1),
    "gflops": (524.64, 524.61),
    "train_step_ms": (301.0, 297.0),
    "sample_s": (2.43, 2.43),
}

MEMORY_HOW = {
    "cuda": "torch.cuda.max_memory_allocated during the step minus the memory allocated before the model was "
    "built: weights, and for training also gradients, AdamW state and activations",
    "cpu": "peak anonymous resident memory (/proc/self/statm resident minus file-backed pages, sampled every 0.5 ms) "
    "above the level before the model was built, one fresh subprocess per method: weights, and for training also "
    "gradients, AdamW state and activations, plus allocator slack; coarse, and a spike shorter than 0.5 ms can be "
    "missed",
}


# ---------------------------------------------------------------------------------------------------------------
# Settings and the two methods
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SpeedSettings:
    """What `dfm bench speed` measures; every field is a command-line option."""

    model: str = "DiT-Mini"  #: registry name of the backbone; its stage factors are set per method
    input_shape: tuple[int, ...] | None = None  #: (H, W, C) or (T, H, W, C) of the finest level; None = registry's
    batch: int = 8
    warmup: int = 2  #: un-timed training rounds (sampling uses min(warmup, 1))
    repeats: int = 10  #: timed training rounds
    sample_repeats: int = 3  #: timed sampling rounds
    steps: tuple[int, ...] = SamplerConfig.steps  #: DFM Euler steps per stage; FM gets their sum (equal NFE)
    thresholds: tuple[float, ...] = SamplerConfig.thresholds
    precision: str = "fp32"  #: fp32 | bf16 (autocast)
    compile: bool = False  #: torch.compile the model (compilation falls in the warm-up rounds)
    device: str | None = None  #: None = cuda if available, else cpu
    threads: int | None = None  #: torch.set_num_threads; None = torch's default
    memory: bool = True  #: also measure peak memory
    peak_tflops: float | None = None  #: MFU denominator; None = looked up from the GPU name (CUDA only)
    seed: int = 0

    def __post_init__(self) -> None:
        # JSON (the memory subprocess) gives lists: keep tuples.
        self.steps = tuple(int(n) for n in self.steps)
        self.thresholds = tuple(float(t) for t in self.thresholds)
        if self.input_shape is not None:
            self.input_shape = tuple(int(v) for v in self.input_shape)
            if len(self.input_shape) not in (3, 4) or min(self.input_shape) < 1:
                raise ValueError(f"input shape {self.input_shape} must be HxWxC or TxHxWxC with positive sizes")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: choose one of {PRECISIONS}")
        for name in ("batch", "repeats", "sample_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup} must be >= 0")
        if len(self.steps) < 2:
            raise ValueError(f"DFM needs one step count per stage (at least 2 stages), got steps={self.steps}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"peak TFLOPS must be > 0, got {self.peak_tflops}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1")


@dataclass
class MethodSetup:
    """One side of the comparison: its method and sampler settings, model config, decomposition, objective and
    sampler."""

    key: str
    method: MethodConfig
    settings: SamplerConfig
    config: DiTConfig
    decomposition: Decomposition
    objective: DFMObjective
    sampler: StageSampler

    @property
    def label(self) -> str:
        """``Flow Matching (1 stage)`` or ``DFM (2 stages)``."""
        n = self.config.num_stages
        return "Flow Matching (1 stage)" if self.key == "fm" else f"DFM ({n} stages)"


def build_setups(settings: SpeedSettings) -> dict[str, MethodSetup]:
    """Flow Matching and DFM on the same backbone and token grid, with equal sampling NFE."""
    methods = {
        "fm": (MethodConfig(name="fm", stages=1), SamplerConfig(steps=(sum(settings.steps),), thresholds=())),
        "dfm": (MethodConfig(name="dfm", stages=len(settings.steps)),
                SamplerConfig(steps=settings.steps, thresholds=settings.thresholds)),
    }  # fmt: skip
    overrides: dict[str, object] = {}
    if settings.input_shape is not None:
        overrides.update(input_size=settings.input_shape[:-1], in_channels=settings.input_shape[-1])
    setups = {}
    for key, (method, sampler) in methods.items():
        sampler.validate(method.stages)
        config = create_config(settings.model, **overrides, stage_factors=stage_factors(method))
        entry = get_method(key)
        decomposition = entry.decomposition(method, standardized=False)
        setups[key] = MethodSetup(key, method, sampler, config, decomposition, entry.objective(method, decomposition),
                                  StageSampler(decomposition))  # fmt: skip
    return setups


def resolve_device(name: str | None) -> torch.device:
    """``name`` as a device, defaulting to CUDA when there is one; a clear error for an absent GPU."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return device


# ---------------------------------------------------------------------------------------------------------------
# What is timed
# ---------------------------------------------------------------------------------------------------------------


class MethodRunner:
    """A model with its AdamW optimiser and one fixed data batch; :meth:`train_step` and :meth:`sample` are what
    the benchmark times. The random draws of round ``r`` come from seed ``r``, the same for both methods."""

    def __init__(self, setup: MethodSetup, settings: SpeedSettings, device: torch.device) -> None:
        self.setup = setup
        self.device = device
        self.precision = settings.precision
        cfg = setup.config
        torch.manual_seed(settings.seed)
        self.model = DFMDiT(cfg).to(device)
        self.net: Callable[..., Any] = torch.compile(self.model) if settings.compile else self.model
        optim = OptimConfig()  # the trainer's defaults
        self.grad_clip = optim.grad_clip
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
        )
        gen = torch.Generator().manual_seed(settings.seed)
        self.shape = (settings.batch, cfg.in_channels, *cfg.input_size)
        self.x = torch.randn(self.shape, generator=gen).to(device)
        self.y: Tensor | None = None
        if cfg.num_classes > 0:
            self.y = torch.randint(0, cfg.num_classes, (settings.batch,), generator=gen).to(device)
        self.level_shapes = setup.decomposition.level_shapes(self.shape)

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, round_index: int) -> None:
        """Draw, decompose, forward, loss, backward, clip, AdamW: one step of the trainer on a fixed batch."""
        self.model.train()
        gen = torch.Generator().manual_seed(round_index)
        self.optimizer.zero_grad(set_to_none=True)
        draw = self.setup.objective.draw(self.level_shapes, generator=gen, device=self.device)
        with self._autocast():
            out = self.setup.objective.loss(self.net, self.x, self.y, draw=draw)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()

    def sample(self, round_index: int, settings: SamplerConfig | None = None) -> Tensor:
        """Generate one batch with Euler with the method's sampler settings (or ``settings``), no guidance."""
        self.model.eval()
        gen = torch.Generator().manual_seed(round_index)
        with torch.inference_mode(), self._autocast():
            out = self.setup.sampler.sample(self.net, self.shape, self.y, settings=settings or self.setup.settings,
                                            generator=gen, device=self.device)  # fmt: skip
        return out.images


# ---------------------------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------------------------


def measure_memory(settings: SpeedSettings, key: str, device: torch.device) -> dict[str, float]:
    """Peak memory (MiB) of sampling and of a training step of one method, in this process.

    Sampling runs one step per stage: the sampler keeps only the current state, so its peak does not grow with
    the number of steps. Training runs two steps so that the AdamW state exists. On the CPU call this in a fresh
    process (:func:`measure_memory_isolated`), where nothing else holds memory.
    """
    setup = build_setups(settings)[key]
    short = dataclasses.replace(setup.settings, steps=(1,) * setup.method.stages)
    with PeakMemory(device) as tracker:
        runner = MethodRunner(setup, settings, device)
        runner.sample(0, short)
        sample_peak = tracker.peak_mib()
        tracker.reset_peak()
        runner.train_step(0)
        runner.train_step(1)
        train_peak = tracker.peak_mib()
    return {"train": train_peak, "sample": sample_peak}


def measure_memory_isolated(settings: SpeedSettings, key: str, device: torch.device) -> dict[str, float] | None:
    """:func:`measure_memory` in a subprocess on the CPU (in this process on CUDA); None if the subprocess fails."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        result = measure_memory(settings, key, device)
        gc.collect()
        torch.cuda.empty_cache()
        return result
    spec = {"settings": dataclasses.asdict(settings), "method": key, "threads": torch.get_num_threads()}
    src = str(Path(__file__).resolve().parents[2])  # so that the child imports this very dfm
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    code = "import sys; from dfm.bench.speed import _memory_child; sys.exit(_memory_child())"
    proc = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(spec), capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"dfm bench speed: memory measurement of {key} failed: {tail}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_child() -> int:
    """Entry point of the memory subprocess: a JSON spec on stdin, a JSON result on the last line of stdout."""
    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(int(spec["threads"]))
    settings = SpeedSettings(**spec["settings"])
    print(json.dumps(measure_memory(settings, spec["method"], torch.device("cpu"))))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def run_speed(settings: SpeedSettings, command: str = "", log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure both methods and return the report as a JSON-ready dict (``methods``, ``ratios``, ...).

    Ratios are DFM / FM. ``command`` is recorded as given; ``log`` receives progress lines. ``settings.threads``
    applies during the run only.
    """
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _measure(settings, command, log or (lambda message: None))
    finally:
        torch.set_num_threads(threads)


def _measure(settings: SpeedSettings, command: str, say: Callable[[str], None]) -> dict[str, Any]:
    device = resolve_device(settings.device)
    setups = build_setups(settings)
    hardware = hardware_info(device)
    peak = settings.peak_tflops
    if peak is None and device.type == "cuda":
        peak = peak_tflops_for(hardware["gpu"])

    methods: dict[str, dict[str, Any]] = {}
    for key, setup in setups.items():
        flops = forward_flops(setup.config)
        methods[key] = {
            "label": setup.label,
            "model": setup.config.to_dict(),
            "stages": setup.config.num_stages,
            "tokens": setup.config.num_tokens,
            "decomposition": repr(setup.decomposition),
            "schedule": {"steps": list(setup.settings.steps), "thresholds": list(setup.settings.thresholds)},
            "nfe": setup.settings.network_evaluations(),
            "params": count_parameters(setup.config),
            "forward_flops": flops,
            "forward_gflops": flops / 1e9,
            "forward_gmacs": flops / 2e9,
        }

    # Memory first, so that on CUDA only the measured model is on the card.
    for key in setups:
        if settings.memory:
            say(f"peak memory of {key} ...")
            methods[key]["peak_memory_mib"] = measure_memory_isolated(settings, key, device)
        else:
            methods[key]["peak_memory_mib"] = None

    runners = {key: MethodRunner(setup, settings, device) for key, setup in setups.items()}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    say(f"training steps: {settings.warmup} warm-up + {settings.repeats} interleaved rounds ...")
    train = time_interleaved({k: r.train_step for k, r in runners.items()}, settings.warmup, settings.repeats, sync)
    say(f"sampling: {min(settings.warmup, 1)} warm-up + {settings.sample_repeats} interleaved rounds ...")
    samp = time_interleaved(
        {k: r.sample for k, r in runners.items()}, min(settings.warmup, 1), settings.sample_repeats, sync
    )

    for key, m in methods.items():
        m["train_step_s"] = summarize(train[key])
        m["sample_s"] = summarize(samp[key])
        m["train_images_per_s"] = settings.batch / m["train_step_s"]["median"]
        m["sample_images_per_s"] = settings.batch / m["sample_s"]["median"]
        m["train_mfu"] = m["sample_mfu"] = None
        if peak is not None:
            m["train_mfu"] = mfu(3 * m["forward_flops"], m["train_images_per_s"], peak)
            m["sample_mfu"] = mfu(m["nfe"] * m["forward_flops"], m["sample_images_per_s"], peak)

    fm, dfm = methods["fm"], methods["dfm"]
    mem_fm, mem_dfm = fm["peak_memory_mib"] or {}, dfm["peak_memory_mib"] or {}
    ratios = {
        "params": dfm["params"] / fm["params"],
        "forward_flops": dfm["forward_flops"] / fm["forward_flops"],
        "train_step_median": dfm["train_step_s"]["median"] / fm["train_step_s"]["median"],
        "train_step_per_round": paired_ratio(train["dfm"], train["fm"]),
        "sample_median": dfm["sample_s"]["median"] / fm["sample_s"]["median"],
        "sample_per_round": paired_ratio(samp["dfm"], samp["fm"]),
        "peak_memory_train": _ratio(mem_dfm.get("train"), mem_fm.get("train")),
        "peak_memory_sample": _ratio(mem_dfm.get("sample"), mem_fm.get("sample")),
    }
    hardware["load_average_1min_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return {
        "benchmark": "dfm bench speed",
        "command": command,
        "date": datetime.date.today().isoformat(),
        "hardware": hardware,
        "settings": dataclasses.asdict(settings),
        "device": str(device),
        "peak_tflops": peak,
        "memory_how": MEMORY_HOW[device.type] if settings.memory else None,
        "methods": methods,
        "ratios": ratios,
        "paper_table2": {k: {"dfm": v[0], "fm": v[1], "ratio": v[0] / v[1]} for k, v in PAPER_TABLE2.items()},
    }
