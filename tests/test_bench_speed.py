"""`dfm bench speed` on a tiny model: report structure, ratios from the raw numbers, MFU arithmetic, the CLI.

Timings are never asserted: only that they exist and that every derived number follows from the raw ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import pytest
import torch

from dfm.bench import measure
from dfm.bench.cli import add_bench_parser, main
from dfm.bench.speed import SpeedSettings, build_setups, run_speed
from dfm.bench.speed_report import markdown_report
from dfm.models import count_parameters

TINY = ["--model", "DiT-Tiny", "--input", "8x8x1", "--batch", "2", "--steps", "2,1", "--threads", "1"]


def tiny_settings(**changes: object) -> SpeedSettings:
    base = dict(
        model="DiT-Tiny", input_shape=(8, 8, 1), batch=2, warmup=1, repeats=2, sample_repeats=2, steps=(2, 1),
        device="cpu", memory=False, threads=1,
    )  # fmt: skip
    base.update(changes)
    return SpeedSettings(**base)


@pytest.fixture(scope="module")
def result() -> dict:
    # A fake peak makes the MFU path run on the CPU.
    return run_speed(tiny_settings(peak_tflops=0.5), command="test")


# ---------------------------------------------------------------------------------------------------------------
# The two methods
# ---------------------------------------------------------------------------------------------------------------


def test_setups_share_backbone_and_tokens_with_equal_nfe() -> None:
    setups = build_setups(tiny_settings(steps=(3, 2), thresholds=(0.6,)))
    fm, dfm = setups["fm"], setups["dfm"]
    assert fm.config.stage_factors == (1,) and dfm.config.stage_factors == (2, 1)
    assert fm.config.num_tokens == dfm.config.num_tokens == 4
    assert (fm.config.hidden_size, fm.config.depth) == (dfm.config.hidden_size, dfm.config.depth)
    assert fm.settings.steps == (5,) and dfm.settings.steps == (3, 2) and dfm.settings.thresholds == (0.6,)
    assert fm.decomposition.num_stages == 1 and dfm.decomposition.num_stages == 2


def test_bad_settings_name_the_problem() -> None:
    with pytest.raises(ValueError, match="precision"):
        tiny_settings(precision="fp16")
    with pytest.raises(ValueError, match="at least 2 stages"):
        tiny_settings(steps=(40,))
    with pytest.raises(ValueError, match="HxWxC"):
        tiny_settings(input_shape=(8, 8))
    with pytest.raises(ValueError, match="unknown model"):
        build_setups(tiny_settings(model="DiT-Huge/2"))
    with pytest.raises(ValueError, match="not divisible by the resolution factor"):
        build_setups(tiny_settings(model="DiT-S/2", input_shape=(8, 8, 4), steps=(1, 1, 1), thresholds=(0.5, 0.7)))


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------


def test_report_has_every_quantity(result: dict) -> None:
    assert set(result["methods"]) == {"fm", "dfm"}
    for m in result["methods"].values():
        keys = {"params", "forward_flops", "forward_gflops", "forward_gmacs", "train_step_s", "sample_s",
                "train_images_per_s", "sample_images_per_s", "train_mfu", "sample_mfu", "nfe", "tokens"}  # fmt: skip
        assert keys <= set(m), keys - set(m)
        assert len(m["train_step_s"]["times"]) == 2 and len(m["sample_s"]["times"]) == 2
        assert m["nfe"] == 3 and m["peak_memory_mib"] is None
    assert set(result["ratios"]) >= {"params", "forward_flops", "train_step_median", "train_step_per_round",
                                     "sample_median", "sample_per_round"}  # fmt: skip
    assert result["hardware"]["device"] == "cpu" and result["hardware"]["torch"] == torch.__version__
    json.dumps(result)  # JSON-ready


def test_params_and_flops_match_the_model_functions(result: dict) -> None:
    for key, setup in build_setups(tiny_settings()).items():
        m = result["methods"][key]
        assert m["params"] == count_parameters(setup.config)
        assert m["forward_flops"] == measure.forward_flops(setup.config)
        assert m["forward_gmacs"] == pytest.approx(m["forward_flops"] / 2e9)
    # the extra stage costs parameters and a little compute
    assert result["ratios"]["params"] > 1 and result["ratios"]["forward_flops"] > 1


def test_ratios_follow_from_the_raw_numbers(result: dict) -> None:
    fm, dfm, r = result["methods"]["fm"], result["methods"]["dfm"], result["ratios"]
    assert r["params"] == pytest.approx(dfm["params"] / fm["params"])
    assert r["forward_flops"] == pytest.approx(dfm["forward_flops"] / fm["forward_flops"])
    for key, field in (("train_step", "train_step_s"), ("sample", "sample_s")):
        a, b = dfm[field]["times"], fm[field]["times"]
        assert dfm[field]["median"] == statistics.median(a)
        assert r[f"{key}_median"] == pytest.approx(statistics.median(a) / statistics.median(b))
        assert r[f"{key}_per_round"] == pytest.approx(statistics.median(x / y for x, y in zip(a, b)))
    assert fm["train_images_per_s"] == pytest.approx(2 / fm["train_step_s"]["median"])


def test_mfu_in_the_report_is_flops_over_peak(result: dict) -> None:
    for m in result["methods"].values():
        achieved = 3 * m["forward_flops"] * 2 / m["train_step_s"]["median"]  # batch 2
        assert m["train_mfu"] == pytest.approx(achieved / 0.5e12)
        assert m["sample_mfu"] == pytest.approx(m["nfe"] * m["forward_flops"] * 2 / m["sample_s"]["median"] / 0.5e12)


def test_markdown_table_lists_both_methods_and_ratios(result: dict) -> None:
    text = markdown_report(result)
    assert "Command: `test`" in text and "Hardware: CPU" in text
    assert "| Flow Matching (1 stage) | DFM (2 stages) | DFM / FM |" in text
    assert f"{result['ratios']['train_step_per_round']:.4f}" in text
    assert "MFU" in text and "images/s" not in text  # images/s rows are for CUDA only
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert all(line.count("|") == 6 for line in rows)


# ---------------------------------------------------------------------------------------------------------------
# Measuring tools
# ---------------------------------------------------------------------------------------------------------------


def test_mfu_arithmetic_on_a_fake_peak() -> None:
    # 1 TFLOP per image at 100 images/s is 100 TFLOP/s: a quarter of a 400 TFLOPS card.
    assert measure.mfu(1e12, 100.0, 400.0) == pytest.approx(0.25)
    assert measure.mfu(3 * 2e9, 50.0, 1.0) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="peak_tflops"):
        measure.mfu(1.0, 1.0, 0.0)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA GeForce RTX 4090", 165.0),
        ("Some Future GPU", None),
    ],
)
def test_peak_lookup_by_device_name(name: str, peak: float | None) -> None:
    assert measure.peak_tflops_for(name) == peak


def test_time_interleaved_alternates_and_skips_warmup() -> None:
    calls: list[tuple[str, int]] = []
    steps = {name: (lambda i, name=name: calls.append((name, i))) for name in ("a", "b")}
    times = measure.time_interleaved(steps, warmup=1, repeats=3)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert measure.paired_ratio([2.0, 6.0, 3.0], [1.0, 2.0, 2.0]) == 2.0
    with pytest.raises(ValueError):
        measure.time_interleaved(steps, warmup=0, repeats=0)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def test_cli_writes_json_and_markdown(tmp_path, capsys) -> None:
    """Also measures peak memory (one subprocess per method on the CPU)."""
    out = tmp_path / "speed"
    argv = [*TINY, "--warmup", "0", "--repeats", "1", "--sample-repeats", "1", "--out", str(out)]
    assert main(["speed", *argv]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "speed.json").read_text())
    assert (out / "speed.md").read_text() in printed
    assert data["command"].startswith("python -m dfm.bench speed --model DiT-Tiny")
    for m in data["methods"].values():
        assert m["peak_memory_mib"]["train"] > 0 and m["peak_memory_mib"]["sample"] >= 0
    assert data["ratios"]["peak_memory_train"] == pytest.approx(
        data["methods"]["dfm"]["peak_memory_mib"]["train"] / data["methods"]["fm"]["peak_memory_mib"]["train"]
    )
    assert "peak memory, training step (MiB)" in printed


def test_cli_rejects_bad_input_and_registers_on_a_parent_parser(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["speed", "--input", "32x32"])
    assert "HxWxC" in capsys.readouterr().err
    assert main(["speed", "--model", "DiT-Nope", "--no-memory"]) == 2
    assert "unknown model" in capsys.readouterr().err

    parser = argparse.ArgumentParser(prog="dfm")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "speed", "--input", "16x16x4", "--precision", "bf16", "--compile"])
    assert args.input == (16, 16, 4) and args.precision == "bf16" and args.compile and callable(args.func)


def test_python_m_dfm_bench_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "dfm.bench", "speed", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--peak-tflops" in proc.stdout
