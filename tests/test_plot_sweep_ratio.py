"""benchmarks/plot_sweep_ratio.py: DFM / Flow Matching ratios along training from sampler-sweep directories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "plot_sweep_ratio.py"


def _setting(sweep: Path, name: str, step: int, effnet: float, domain: float, ref: str = "fashion-mnist-test") -> None:
    folder = sweep / name
    folder.mkdir(parents=True)
    (folder / "sampling.json").write_text(json.dumps({"checkpoint": f"runs/x/checkpoints/step_{step:08d}"}))
    (folder / f"fd_{ref}.json").write_text(json.dumps({"scores": {"fd_efficientnet-lite0": effnet,
                                                                   "fd_fashion-cnn": domain}}))  # fmt: skip


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_ratios_per_step_table_and_plot(tmp_path: Path) -> None:
    for step, (d, f) in {800: ((80.0, 300.0), (100.0, 400.0)), 3200: ((45.0, 180.0), (50.0, 200.0))}.items():
        _setting(tmp_path / f"s{step}", "dfm-heun", step, *d)
        _setting(tmp_path / f"s{step}", "fm-heun", step, *f)
    _setting(tmp_path / "s800", "dfm-euler", 800, 99.0, 1.0)  # no Flow Matching partner there: skipped
    out = tmp_path / "plot.png"
    res = _run(str(tmp_path / "s3200"), str(tmp_path / "s800"), "--pair", "Heun=dfm-heun/fm-heun",
               "--pair", "Euler=dfm-euler/fm-euler", "--out", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "| Heun | 800 | 0.800 | 0.750 |" in res.stdout and "| Heun | 3200 | 0.900 | 0.900 |" in res.stdout
    assert res.stdout.index("| Heun | 800 |") < res.stdout.index("| Heun | 3200 |")  # sorted by step
    assert "Euler" not in res.stdout.split("\n", 2)[2] and out.stat().st_size > 1000


def test_bad_pairs_and_mismatched_steps_are_refused(tmp_path: Path) -> None:
    _setting(tmp_path / "s", "a", 800, 1.0, 1.0)
    _setting(tmp_path / "s", "b", 1600, 1.0, 1.0)
    res = _run(str(tmp_path / "s"), "--pair", "x=a")
    assert res.returncode == 2 and "give LABEL=DFM_SETTING/FM_SETTING" in res.stderr
    res = _run(str(tmp_path / "s"), "--pair", "x=a/b")
    assert res.returncode != 0 and "a and b sampled different steps [800, 1600]" in res.stderr
    res = _run(str(tmp_path / "s"), "--pair", "x=a/b", "--reference", "fashion-mnist-val")
    assert res.returncode == 2 and "no sweep holds both settings" in res.stderr
