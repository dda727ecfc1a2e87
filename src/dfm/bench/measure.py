"""Measuring tools shared by the benchmarks: hardware description, FLOPs, interleaved timing, peak memory, MFU.

Nothing here knows about DFM; :mod:`dfm.bench.speed` puts the pieces together for the DFM-vs-Flow-Matching
comparison and ``benchmarks/bench_model.py`` uses them for its network-only table.

Units: FLOPs count a multiply-accumulate as 2 (what :class:`torch.utils.flop_counter.FlopCounterMode` reports);
the DiT and DFM papers' "Gflops" are GMACs, i.e. FLOPs / 2. Model FLOP utilisation::

    MFU = FLOPs per image × images per second / (peak TFLOPS × 1e12)

with training FLOPs per image = 3 × forward FLOPs (backward ≈ 2 × forward), as in nanoGPT and the PaLM paper.

Example:
    >>> calls = []
    >>> times = time_interleaved({"a": calls.append, "b": calls.append}, warmup=1, repeats=2)
    >>> len(times["a"]), len(calls)
    (2, 6)
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from dfm.models import DFMDiT, DiTConfig

#: Dense bf16 tensor-core peaks in TFLOPS (vendor data sheets, no sparsity), matched in order against
#: ``torch.cuda.get_device_name``: more specific names first ("H100 PCIe" before "H100", "L40S" before "L40").
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),  # also GH200
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 6000 Ada", 364.0),
    ("RTX A6000", 155.0),
    ("RTX 4090", 165.0),
)


# ---------------------------------------------------------------------------------------------------------------
# Hardware
# ---------------------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: the GPU (CUDA) or the CPU, torch version and thread count."""
    info: dict[str, Any] = {
        "device": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            capability=f"{props.major}.{props.minor}",
        )
    return info


def hardware_line(info: Mapping[str, Any]) -> str:
    """One line for a report, e.g. ``NVIDIA H100 80GB HBM3 (79.1 GiB), CUDA 12.8, torch 2.13.0``."""
    torch_part = f"torch {info['torch']}"
    if info.get("gpu"):
        return f"{info['gpu']} ({info['gpu_memory_gib']} GiB), CUDA {info['cuda']}, {torch_part}, CPU {info['cpu']}"
    return (
        f"CPU {info['cpu']}, {info['logical_cpus']} logical CPUs, {info['torch_threads']} torch thread(s), {torch_part}"
    )


def peak_tflops_for(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU named like ``torch.cuda.get_device_name`` returns it; None when unknown."""
    for pattern, tflops in GPU_PEAK_TFLOPS:
        if pattern.lower() in device_name.lower():
            return tflops
    return None


def mfu(flops_per_image: float, images_per_s: float, peak_tflops: float) -> float:
    """Model FLOP utilisation: achieved FLOP/s over the card's peak (see the module docstring)."""
    if peak_tflops <= 0:
        raise ValueError(f"peak_tflops must be > 0, got {peak_tflops}")
    return flops_per_image * images_per_s / (peak_tflops * 1e12)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------------


def random_inputs(
    config: DiTConfig, batch: int, device: str | torch.device = "cpu", seed: int = 0
) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """Random ``(levels, t, y, main_stage)`` for :class:`DFMDiT` (drawn on the CPU, then moved: works for meta)."""
    gen = torch.Generator().manual_seed(seed)
    levels = [
        torch.randn(batch, config.in_channels, *config.stage_input_size(s), generator=gen).to(device)
        for s in range(config.num_stages)
    ]
    t = torch.rand(batch, config.num_stages, generator=gen).to(device)
    y = torch.randint(0, max(config.num_classes, 1), (batch,), generator=gen).to(device)
    main_stage = torch.randint(0, config.num_stages, (batch,), generator=gen).to(device)
    return levels, t, y, main_stage


def forward_flops(config: DiTConfig) -> int:
    """FLOPs of one forward pass for one sample, counted on the meta device (nothing is allocated or run)."""
    with torch.device("meta"):
        model = DFMDiT(config)
        inputs = random_inputs(config, 1, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    return int(counter.get_total_flops())


def forward_gmacs(config: DiTConfig) -> float:
    """Multiply-accumulates of one forward pass for one sample, in G (the DiT paper's "Gflops")."""
    return forward_flops(config) / 2e9


# ---------------------------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------------------------


def time_interleaved(
    steps: Mapping[str, Callable[[int], object]],
    warmup: int,
    repeats: int,
    synchronize: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every ``steps[name](round)``, the callables run round by round.

    Interleaving makes a load change of a shared machine hit all of them; the order is reversed every other
    round so that none always runs right after another. The first ``warmup`` rounds are not recorded.
    ``synchronize`` (e.g. ``torch.cuda.synchronize``) runs before the clock starts and before it stops.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    sync = synchronize or (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        order = list(steps) if i % 2 == 0 else list(reversed(steps))
        for name in order:
            sync()
            start = time.perf_counter()
            steps[name](i)
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def summarize(seconds: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of a list of timings, with the raw values."""
    return {
        "median": statistics.median(seconds),
        "min": min(seconds),
        "max": max(seconds),
        "times": list(seconds),
    }


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of the per-round ratios ``numerator[i] / denominator[i]``.

    It cancels slow drifts of a shared machine better than the ratio of the medians does.
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"need two equally long, non-empty lists, got {len(numerator)} and {len(denominator)}")
    return statistics.median(a / b for a, b in zip(numerator, denominator))


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------


def max_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def anon_rss_mib() -> float | None:
    """Anonymous resident memory of this process in MiB (resident minus file-backed pages, from Linux
    ``/proc/self/statm``): the heap, without the pages of torch's shared libraries. None where there is no /proc."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
        pages = int(fields[1]) - int(fields[2])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak memory of a block above the memory in use when the tracker started, in MiB; a context manager.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, exact). CPU (Linux): the process's anonymous
    resident memory (:func:`anon_rss_mib`), sampled by a background thread every ``interval_s``; it leaves out
    the code pages that the first call of a kernel faults in, includes allocator slack, and can miss a spike
    shorter than the interval. Elsewhere on the CPU: the growth of ``getrusage`` ``ru_maxrss``. Measure in a
    fresh process.

    Example:
        >>> with PeakMemory(torch.device("cpu")) as tracker:
        ...     x = torch.ones(1024, 1024)  # 4 MiB
        >>> tracker.peak_mib() >= 0
        True
    """

    def __init__(self, device: torch.device, interval_s: float = 0.0005) -> None:
        self.device = device
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen = 0.0
        self._polling = False
        self.base = 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self._polling = anon_rss_mib() is not None
            self.base = anon_rss_mib() if self._polling else max_rss_mib()
            if self._polling:
                self._thread = threading.Thread(target=self._poll, name="PeakMemory", daemon=True)
                self._thread.start()
        self.reset_peak()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._seen = max(self._seen, anon_rss_mib() or 0.0)

    def reset_peak(self) -> None:
        """Start a new peak from the memory in use now; the baseline stays."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._seen = anon_rss_mib() or 0.0

    def peak_mib(self) -> float:
        """Peak since the last reset, minus what was in use when the tracker started."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        if not self._polling:
            return max_rss_mib() - self.base
        self._seen = max(self._seen, anon_rss_mib() or 0.0)
        return self._seen - self.base
