"""benchmarks/plot_ratio.py: the DFM / Flow Matching ratio table and plot from bench score files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "plot_ratio.py"


def _bench_dir(root: Path, variant: str, scores: dict[int, tuple[float, float]], seed_offset: float = 0.0) -> Path:
    (root / "scores").mkdir(parents=True)
    for step, (effnet, domain) in scores.items():
        for seed, shift in ((0, -seed_offset), (1, seed_offset)):  # two seeds: the script averages them
            row = {"variant": variant, "guidance": 1.0, "step": step, "seed": seed,
                   "fd_efficientnet-lite0": effnet + shift, "fd_fashion-cnn": domain + shift}  # fmt: skip
            (root / "scores" / f"{variant}-s{seed}-step{step}.json").write_text(json.dumps(row))
        other = {"variant": variant, "guidance": 1.5, "step": step, "fd_efficientnet-lite0": 1e6}  # ignored
        (root / "scores" / f"{variant}-step{step}-g1.5.json").write_text(json.dumps(other))
    return root


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_pairs_print_ratios_per_step_and_plot(tmp_path: Path) -> None:
    dfm = _bench_dir(tmp_path / "dfm", "DFM", {800: (90.0, 300.0), 1600: (60.0, 200.0)}, seed_offset=5.0)
    fm = _bench_dir(tmp_path / "fm", "Flow Matching", {800: (100.0, 250.0), 1600: (80.0, 250.0), 3200: (1.0, 1.0)})
    out = tmp_path / "ratio.png"
    res = _run("--pair", f"small={dfm},{fm}", "--pair", f"again={dfm},{fm}", "--out", str(out))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "| small | fd_efficientnet-lite0 | 800 | 90.0 | 100.0 | 0.900 |" in lines
    assert "| small | fd_fashion-cnn | 1600 | 200.0 | 250.0 | 0.800 |" in lines
    assert "| again | fd_efficientnet-lite0 | 1600 | 60.0 | 80.0 | 0.750 |" in lines
    assert not any("| 3200 |" in line for line in lines)  # only steps both runs scored
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # positional form: one directory holding both methods' scores
    both = tmp_path / "both"
    _bench_dir(both, "DFM", {800: (90.0, 300.0)})
    _bench_dir(tmp_path / "tmp", "Flow Matching", {800: (100.0, 250.0)})
    for f in (tmp_path / "tmp" / "scores").iterdir():
        f.rename(both / "scores" / f.name)
    res = _run(str(both))
    assert res.returncode == 0 and "| fd_fashion-cnn | 800 | 300.0 | 250.0 | 1.200 |" in res.stdout.splitlines()


def test_bad_arguments_fail_with_a_message(tmp_path: Path) -> None:
    res = _run("--pair", "nolabel")
    assert res.returncode == 2 and "expected LABEL=DFM_DIR,FM_DIR" in res.stderr
    res = _run()
    assert res.returncode == 2 and "give either" in res.stderr
    empty = _bench_dir(tmp_path / "e", "DFM", {800: (1.0, 1.0)})
    res = _run("--pair", f"x={empty},{empty}")
    assert res.returncode == 1 and "no step scored for both" in res.stderr


def test_a_side_joins_folders_of_other_budgets_and_the_swd_gets_its_ratio(tmp_path: Path) -> None:
    def scores(root: Path, variant: str, step: int, fd: float, swd: float) -> Path:
        (root / "scores").mkdir(parents=True)
        row = {
            "variant": variant,
            "guidance": 1.0,
            "step": step,
            "seed": 0,
            "fd_efficientnet-lite0": fd,
            "swd_mean": swd,
        }
        (root / "scores" / f"{variant}-s0-step{step}.json").write_text(json.dumps(row))
        return root

    d800, d1600 = scores(tmp_path / "d800", "DFM", 800, 90.0, 30.0), scores(tmp_path / "d1600", "DFM", 1600, 70.0, 20.0)
    f800, f1600 = (scores(tmp_path / "f800", "Flow Matching", 800, 100.0, 60.0),
                   scores(tmp_path / "f1600", "Flow Matching", 1600, 80.0, 50.0))  # fmt: skip
    out = tmp_path / "r.png"
    res = _run("--pair", f"x={d800}+{d1600},{f800}+{f1600}", "--target", "0.8", "--out", str(out))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "| x | fd_efficientnet-lite0 | 800 | 90.0 | 100.0 | 0.900 |" in lines
    assert "| x | fd_efficientnet-lite0 | 1600 | 70.0 | 80.0 | 0.875 |" in lines
    assert "| x | swd_mean | 800 | 30.0 | 60.0 | 0.500 |" in lines
    assert "| x | swd_mean | 1600 | 20.0 | 50.0 | 0.400 |" in lines
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = _run("--pair", f"x={d800}+{tmp_path / 'nope'},{f800}")
    assert res.returncode == 1 and "nope is not a bench output folder" in res.stderr
