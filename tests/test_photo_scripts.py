"""The photograph study's scripts: photo_tuning_table.py, photo_pictures.py, metric_calibration.py, and the lanes of
photo_tuning.sh and glyph_check.sh."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from helpers import needs_data

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=120)


def _scores(root: Path, run: str, method: str, rows: list[tuple[int, int, float, float]]) -> None:
    (root / run / "scores").mkdir(parents=True)
    for seed, step, fd, swd in rows:
        row = {"variant": method, "method": method, "seed": seed, "step": step, "guidance": 1.0, "nfe": 39,
               "fd_efficientnet-lite0": fd, "swd_mean": swd, "swd_64": 2 * swd, "swd_8": swd / 2}  # fmt: skip
        (root / run / "scores" / f"{method}-s{seed}-step{step}.json").write_text(json.dumps(row))


def test_table_compare_gives_seed_means_spreads_and_ratios(tmp_path: Path) -> None:
    _scores(tmp_path, "dfm-x", "dfm", [(0, 100, 90.0, 40.0), (1, 100, 110.0, 60.0), (0, 200, 80.0, 30.0)])
    _scores(tmp_path, "fm-x", "fm", [(0, 100, 200.0, 100.0), (1, 100, 200.0, 100.0)])
    out = _run("photo_tuning_table.py", str(tmp_path), "--compare", "dfm-x", "fm-x", "--markdown")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("| step | run (seeds) | FD | SWD mean | SWD 64 | SWD 8 |")
    assert "| 100 | dfm-x (2) | 100.0 ± 10.0 | 50.0 ± 10.0 | 100.0 ± 20.0 | 25.0 ± 5.0 |" in lines
    assert "| 100 | fm-x (2) | 200.0 ± 0.0 | 100.0 ± 0.0 | 200.0 ± 0.0 | 50.0 ± 0.0 |" in lines
    assert "| 100 | ratio | **0.50** | **0.50** | **0.50** | **0.50** |" in lines
    assert not any(line.startswith("| 200") for line in lines)  # step 200 was scored for one run only
    plain = _run("photo_tuning_table.py", str(tmp_path))  # one line per score file, the seed column included
    assert plain.returncode == 0 and len(plain.stdout.splitlines()) == 1 + 5
    assert plain.stdout.splitlines()[0].split()[:4] == ["run", "method", "seed", "step"]
    assert "σ" not in plain.stdout  # no sigma scored: no spread columns
    score = tmp_path / "dfm-x" / "scores" / "dfm-s0-step200.json"
    score.write_text(json.dumps({**json.loads(score.read_text()), "sigma_64": 9.0, "sigma_64_ref": 15.0}))
    spread = _run("photo_tuning_table.py", str(tmp_path), "--markdown").stdout.splitlines()
    assert spread[0].endswith("| SWD 64 | SWD 8 | σ 64 % |")
    assert "| dfm-x | dfm | 0 | 200 | 39 | 80.0 | 30.0 | 60.0 | 15.0 | 60 |" in spread  # 9 of 15: 60 %
    assert sum(line.endswith("| - |") for line in spread) == 4  # the rows without it
    missing = _run("photo_tuning_table.py", str(tmp_path), "--compare", "dfm-x", "nope")
    assert missing.returncode != 0 and "no step scored in both dfm-x and nope" in missing.stderr
    empty = _run("photo_tuning_table.py", str(tmp_path / "none"))
    assert empty.returncode == 1 and "no scores under" in empty.stderr


def test_table_reads_a_lanes_seeds_from_separate_folders_and_refuses_a_seed_twice(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _scores(a, "dfm-x", "dfm", [(0, 100, 90.0, 40.0)])
    _scores(b, "dfm-x", "dfm", [(1, 100, 110.0, 60.0)])
    _scores(a, "fm-x", "fm", [(0, 100, 200.0, 100.0)])
    _scores(b, "fm-x", "fm", [(1, 100, 200.0, 100.0)])
    out = _run("photo_tuning_table.py", str(a), str(b), "--compare", "dfm-x", "fm-x", "--markdown")
    assert out.returncode == 0, out.stderr
    assert "| 100 | dfm-x (2) | 100.0 ± 10.0 | 50.0 ± 10.0 | 100.0 ± 20.0 | 25.0 ± 5.0 |" in out.stdout.splitlines()
    twice = _run("photo_tuning_table.py", str(a), str(a), "--compare", "dfm-x", "fm-x")
    assert twice.returncode != 0 and "score the same run, seed, step and guidance" in twice.stderr


def test_tradeoff_scores_each_point_against_the_same_seed_of_the_base(tmp_path: Path) -> None:
    _scores(tmp_path, "fm", "fm", [(0, 100, 200.0, 100.0), (1, 100, 100.0, 50.0), (0, 50, 400.0, 400.0)])
    _scores(tmp_path, "late", "dfm", [(0, 100, 150.0, 120.0), (1, 100, 80.0, 40.0)])
    _scores(tmp_path, "early", "dfm", [(0, 50, 100.0, 100.0), (2, 50, 1.0, 1.0)])  # seed 2: the base lacks it
    out = tmp_path / "t.png"
    done = _run("plot_tradeoff.py", "--base", str(tmp_path / "fm"), "--step", "100", "--out", str(out),
                f"late={tmp_path / 'late'}", f"early={tmp_path / 'early'}@50")  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "| late | 100 | 0,1 | 0.750 / 0.800 | 1.200 / 0.800 | no |" in lines  # seed 0 misses on the SWD
    assert "| early | 50 | 0 | 0.250 | 0.250 | yes |" in lines
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.tmp.png"))
    _scores(tmp_path, "fm2", "fm", [(2, 50, 2.0, 4.0)])  # the base's seed 2, in another folder
    joined = _run("plot_tradeoff.py", "--base", f"{tmp_path / 'fm'}+{tmp_path / 'fm2'}", "--step", "50",
                  f"x={tmp_path / 'early'}")  # fmt: skip
    assert "| x | 50 | 0,2 | 0.250 / 0.500 | 0.250 / 0.250 | yes |" in joined.stdout  # a + joins folders
    bad = _run("plot_tradeoff.py", "--base", str(tmp_path / "fm"), "--step", "100", f"x={tmp_path / 'early'}")
    assert bad.returncode == 1 and "x: no seed scored at step 100" in bad.stderr
    bad = _run("plot_tradeoff.py", "--base", str(tmp_path / "none"), "--step", "100", f"x={tmp_path / 'late'}")
    assert bad.returncode == 1 and "no scores in" in bad.stderr
    bad = _run("plot_tradeoff.py", "--base", str(tmp_path / "fm"), "--step", "100", "nolabel")
    assert bad.returncode == 1 and "expected LABEL=DIR" in bad.stderr


def _grid(path: Path, color: int, rows: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((rows * 66, 3 * 66, 3), color, np.uint8)).save(path)


def test_pictures_lay_out_labelled_panels_and_refuse_missing_runs(tmp_path: Path) -> None:
    _grid(tmp_path / "a" / "runs" / "dfm-abc-s0" / "samples" / "step_00000100.png", 50)  # a bench --out folder
    _grid(tmp_path / "b" / "samples" / "step_00000100.png", 200)  # a run folder
    out = tmp_path / "sheet.png"
    done = _run("photo_pictures.py", "--step", "100", "--rows", "2", "--out", str(out), f"A=x={tmp_path / 'a'}",
                f"B={tmp_path / 'b'}")  # fmt: skip
    assert done.returncode == 0, done.stderr
    image = np.asarray(Image.open(out))
    assert image.shape == (10 // 2 + 16 + 2 * 66 + 10 + 5, 2 * (3 * 66 + 10) + 10, 3)
    top = 10 // 2 + 16
    assert (image[top : top + 2 * 66, 10 : 10 + 3 * 66] == 50).all()  # the first panel: two rows of its grid
    x = 10 + 3 * 66 + 10
    assert (image[top : top + 2 * 66, x : x + 3 * 66] == 200).all()
    wrapped = _run("photo_pictures.py", "--step", "100", "--wrap", "1", "--out", str(out), f"A={tmp_path / 'a'}",
                   f"B={tmp_path / 'b'}")  # fmt: skip
    assert wrapped.returncode == 0 and Image.open(out).size == (3 * 66 + 20, 2 * (3 * 66 + 16 + 10) + 10)
    missing = _run("photo_pictures.py", "--step", "300", "--out", str(out), f"A={tmp_path / 'a'}")
    assert missing.returncode == 2 and "no samples/step_00000300.png of seed 0" in missing.stderr
    unlabelled = _run("photo_pictures.py", "--step", "100", "--out", str(out), str(tmp_path / "a"))
    assert unlabelled.returncode == 2 and "give LABEL=FOLDER" in unlabelled.stderr
    _grid(tmp_path / "b" / "samples" / "step_00000300.png", 120)  # a panel at its own step, beside --step's
    own = _run(
        "photo_pictures.py", "--step", "100", "--out", str(out), f"A={tmp_path / 'a'}", f"B={tmp_path / 'b'}@300"
    )
    assert own.returncode == 0, own.stderr
    image = np.asarray(Image.open(out))
    assert (image[top : top + 66, 10 : 10 + 3 * 66] == 50).all() and (
        image[top : top + 66, x : x + 3 * 66] == 120
    ).all()
    nostep = _run("photo_pictures.py", "--out", str(out), f"A={tmp_path / 'a'}@100", f"B={tmp_path / 'b'}")
    assert nostep.returncode == 2 and "give the panel's step (LABEL=FOLDER@STEP) or --step" in nostep.stderr


@needs_data
def test_pictures_draw_a_grid_the_run_did_not_save_as_the_trainer_would_have(tmp_path: Path) -> None:
    from dfm.cli import main as cli

    run = tmp_path / "run"
    tiny = ["-o", "model.overrides.depth=1", "-o", "model.overrides.hidden_size=32", "-o", "train.threads=1",
            "-o", "model.overrides.num_heads=2", "-o", "train.num_sample_images=4", "-o", "sampler.steps=2,2",
            "-o", "optim.warmup_steps=1", "-o", "train.ckpt_every=1", "-o", "train.sample_every=0"]  # fmt: skip
    assert cli(["train", "--out", str(run), "--steps", "2", "--batch-size", "8", "--no-progress", *tiny]) == 0
    saved = run / "samples" / "step_00000002.png"
    trainer = np.asarray(Image.open(saved))
    assert not (run / "samples" / "step_00000001.png").exists()  # a grid at the last step only
    out = tmp_path / "sheet.png"
    missing = _run("photo_pictures.py", "--step", "1", "--out", str(out), f"A={run}")
    assert missing.returncode == 2 and "(--draw draws it from checkpoints/step_00000001)" in missing.stderr
    saved.unlink()
    drawn = _run("photo_pictures.py", "--draw", "--out", str(out), f"A={run}@1", f"B={run}@2")
    assert drawn.returncode == 0, drawn.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(saved)), trainer)  # the trainer's picture, pixel for pixel
    assert (run / "samples" / "step_00000001.png").is_file()
    assert not np.array_equal(np.asarray(Image.open(run / "samples" / "step_00000001.png")), trainer)


def test_calibration_picture_has_one_labelled_column_per_set(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("metric_calibration", BENCH / "metric_calibration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module._short("noise σ=8/255") == "noise 8"
    assert module._short("down-up 2x (bicubic)") == "down-up 2x"
    assert module._short("fit, other crops (clean)") == "fit"
    assert module._short("blur σ=0.5 px") == "blur 0.5"
    base = torch.full((4, 3, 8, 8), 100, dtype=torch.uint8)
    sets = module.conditions(base, "clean", {"val (unseen photographs)": base + 50})
    assert list(sets)[0] == "clean" and list(sets)[-1] == "val (unseen photographs)" and len(sets) == 14
    assert torch.equal(sets["clean"], base) and torch.equal(sets["blur σ=1.0 px"], base)  # a flat image stays flat
    assert not torch.equal(sets["noise σ=4/255"], base)
    module.picture(sets, tmp_path / "c.png", rows=2)
    image = np.asarray(Image.open(tmp_path / "c.png"))
    assert image.shape == (14 + 12 * 2 + 4, 14 * 12 + 4, 3)
    assert (image[18:26, 4:12] == 100).all() and (image[18:26, 4 + 13 * 12 : 12 + 13 * 12] == 150).all()
    # The mosaic: one offset per 8x8 tile and channel, flat inside a tile of a flat image
    tiles = module.conditions(torch.full((2, 3, 16, 16), 100, dtype=torch.uint8), "clean", {})["tiles σ=16/255"]
    blocks = tiles.float().unfold(2, 8, 8).unfold(3, 8, 8)  # (2, 3, 2, 2, 8, 8)
    assert (blocks.amax((-1, -2)) == blocks.amin((-1, -2))).all() and tiles.float().std() > 5


def _lane(
    tmp_path: Path, script: str, lane: str, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run a lane of a bench shell script, copied into ``tmp_path``, against a stand-in ``dfm`` that records its
    arguments (one call per line): the script's plumbing without training anything."""
    (tmp_path / "benchmarks").mkdir(exist_ok=True)
    for name in (script, "bench_lib.sh"):  # the lane scripts source the shared helpers
        (tmp_path / "benchmarks" / name).write_text((BENCH / name).read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls.txt"
    stub = bin_dir / "dfm"
    stub.write_text(f'#!/bin/bash\nprintf "%s\\037" "$@" >> {calls}\necho >> {calls}\n')
    stub.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), **(env or {})}
    done = subprocess.run(["bash", str(tmp_path / "benchmarks" / script), lane, *args], capture_output=True, text=True,
                          env=env, timeout=60)  # fmt: skip
    lines = calls.read_text().splitlines() if calls.exists() else []
    return done, [line.rstrip("\037").split("\037") for line in lines]


def _overrides(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]


#: what every photo_tuning.sh lane gives first: the settings of the time the runs were made (the presets' threshold,
#: now 0.9; the cpu-photo preset's model, now hidden 192 with the overlapping head, Flow Matching's location 0, now
#: -1.0 there, and, where Pyramidal Flow runs, its uniform local time, now LogitNormal there: PYRAMIDAL_PINNED); a
#: lane's own come later and win
PINNED = [
    "sampler.thresholds=0.7",
    "model.overrides.hidden_size=128",
    "model.overrides.head_overlap=false",
    "method.main_loc=0",
]
PYRAMIDAL_PINNED = [*PINNED, "method.options.time=uniform"]
GLYPH_PINNED = ["sampler.thresholds=0.7", "model.overrides.head_overlap=false"]  # glyph_check.sh's (photo() widens)


def test_photo_tuning_128_lanes_pass_their_settings(tmp_path: Path) -> None:
    done, calls = _lane(tmp_path, "photo_tuning.sh", "128-dfm4")
    assert done.returncode == 0, done.stderr
    (argv,) = calls
    assert argv[:2] == ["bench", "quality"] and argv[argv.index("--methods") + 1] == "dfm"
    assert argv[argv.index("--out") + 1] == "runs/photo-tune/p128-dfm4"
    assert _overrides(argv) == [  # the pinned settings first; the lane's own win
        *PINNED, "data.dataset=data/photos/128/fit", "data.resolution=128",
        "model.overrides.patch_size=16", "model.overrides.hidden_size=192", "method.prediction=data",
        "model.overrides.head_overlap=false", "method.stages=4",
        "method.stage_probs=0.4,0.2,0.2,0.2", "sampler.steps=8,4,4,4", "sampler.thresholds=0.6,0.75,0.85",
    ]  # fmt: skip
    done, calls = _lane(tmp_path, "photo_tuning.sh", "128-fm")
    assert "method.stages=4" not in _overrides(calls[-1]) and calls[-1][calls[-1].index("--methods") + 1] == "fm"
    done, calls = _lane(tmp_path, "photo_tuning.sh", "128p8-dfm3")  # patch 8: the token fits the model's width
    assert calls[-1][calls[-1].index("--out") + 1] == "runs/photo-tune/p128p8-dfm3"
    assert "model.overrides.patch_size=8" in _overrides(calls[-1]) and "method.stages=3" in _overrides(calls[-1])
    assert _overrides(calls[-1]).count("model.overrides.head_overlap=false") == 2  # pinned, then the lane's own
    for method, m in (("fm", "fm"), ("dfm3", "dfm"), ("pyramidal", "pyramidal")):  # patch 8, the overlapping head
        done, calls = _lane(tmp_path, "photo_tuning.sh", f"128p8ov-{method}")
        argv = calls[-1]
        assert done.returncode == 0 and argv[argv.index("--out") + 1] == f"runs/photo-tune/p128p8-ov-{method}"
        assert argv[argv.index("--methods") + 1] == m and "model.overrides.patch_size=8" in _overrides(argv)
        assert _overrides(argv).index("model.overrides.head_overlap=true") > _overrides(argv).index(PINNED[-1])
    assert not [o for o in _overrides(argv) if o.startswith(("method.stages", "method.stage_probs"))]  # two stages
    done, calls = _lane(tmp_path, "photo_tuning.sh", "pyramidal-xpred")
    assert calls[-1][calls[-1].index("--methods") + 1] == "pyramidal"
    pyramidal = [*PYRAMIDAL_PINNED, "model.overrides.hidden_size=192", "method.prediction=data"]
    assert _overrides(calls[-1]) == pyramidal
    for lane, shares in (("fine", "0.3,0.7"), ("coarse", "0.7,0.3")):
        done, calls = _lane(tmp_path, "photo_tuning.sh", f"pyramidal-xpred-{lane}")
        assert calls[-1][calls[-1].index("--out") + 1] == f"runs/photo-tune/pyr-h192-xpred-{lane}"
        assert _overrides(calls[-1]) == [*pyramidal, f"method.options.shares={shares}"]
    overlap = [*PINNED, "model.overrides.hidden_size=192", "method.prediction=data",
               "model.overrides.head_overlap=true"]  # fmt: skip
    for lane, out, method in (("fm", "fm-h192-xpred-ov", "fm"), ("dfm3", "dfm3-h192-xpred-ov", "dfm"),
                              ("pyramidal", "pyr-h192-xpred-ov", "pyramidal")):  # fmt: skip
        done, calls = _lane(tmp_path, "photo_tuning.sh", f"overlap-{lane}")
        assert calls[-1][calls[-1].index("--out") + 1] == f"runs/photo-tune/{out}"
        pinned = PYRAMIDAL_PINNED if method == "pyramidal" else PINNED
        assert calls[-1][calls[-1].index("--methods") + 1] == method
        expected = [*pinned, *overlap[len(PINNED) :]]
        assert _overrides(calls[-1])[: len(expected)] == expected
    assert "method.stages=3" in _overrides(_lane(tmp_path, "photo_tuning.sh", "overlap-dfm3")[1][-1])
    _, calls = _lane(tmp_path, "photo_tuning.sh", "overlap-dfm4")  # four stages at 64 px: 8 -> 16 -> 32 -> 64
    assert calls[-1][calls[-1].index("--out") + 1] == "runs/photo-tune/dfm4-h192-xpred-ov"
    assert _overrides(calls[-1])[: len(overlap)] == overlap and "method.stages=4" in _overrides(calls[-1])
    for lane, out in (("overlap-pyramidal3", "runs/photo-tune/pyr3-h192-xpred-ov"),  # Pyramidal Flow, three stages
                      ("128p8ov-pyramidal3", "runs/photo-tune/p128p8-ov-pyramidal3")):  # fmt: skip
        done, calls = _lane(tmp_path, "photo_tuning.sh", lane)
        argv = calls[-1]
        assert done.returncode == 0 and argv[argv.index("--out") + 1] == out
        assert argv[argv.index("--methods") + 1] == "pyramidal" and "method.stages=3" in _overrides(argv)
        assert "model.overrides.head_overlap=true" in _overrides(argv)
    # 1,000 samples at a headline point: the lane's trained runs linked into runs/photo-1k and scored, not retrained
    done, calls = _lane(tmp_path, "photo_tuning.sh", "1k-overlap-fm")
    assert done.returncode == 1 and "no finished run runs/photo-tune/fm-h192-xpred-ov/runs/*-s[01]" in done.stderr
    trained = tmp_path / "runs" / "photo-tune" / "fm-h192-xpred-ov" / "runs"
    for run in ("fm-abc-s0", "fm-abc-s1", "fm-abc-s2"):
        (trained / run).mkdir(parents=True)
    done, calls = _lane(tmp_path, "photo_tuning.sh", "1k-overlap-fm")
    assert done.returncode == 0, done.stderr
    argv = calls[-1]
    assert (
        argv[argv.index("--out") + 1] == "runs/photo-1k/fm-h192-xpred-ov" and argv[argv.index("--seeds") + 1] == "0,1"
    )
    assert argv[argv.index("--num-samples") + 1] == "1000" and _overrides(argv)[: len(overlap)] == overlap
    linked = tmp_path / "runs" / "photo-1k" / "fm-h192-xpred-ov" / "runs"
    assert sorted(p.name for p in linked.iterdir()) == ["fm-abc-s0", "fm-abc-s1"]
    assert (linked / "fm-abc-s0").resolve() == (trained / "fm-abc-s0").resolve()
    for m in ("dfm", "fm"):  # the euler lane: each tuned seed-0 run scored again with Euler, linked, not retrained
        (tmp_path / "runs" / "photo-tune" / f"{m}-h192-xpred" / "runs" / f"{m}-abc-s0").mkdir(parents=True)
    done, calls = _lane(tmp_path, "photo_tuning.sh", "euler")
    assert done.returncode == 0, done.stderr
    assert [c[c.index("--out") + 1] for c in calls[-2:]] == [
        f"runs/photo-sampler/{m}-h192-xpred-euler40" for m in ("dfm", "fm")
    ]
    for m in ("dfm", "fm"):
        link = tmp_path / "runs" / "photo-sampler" / f"{m}-h192-xpred-euler40" / "runs" / f"{m}-abc-s0"
        assert (
            link.is_symlink()
            and link.resolve()
            == (tmp_path / "runs" / "photo-tune" / f"{m}-h192-xpred" / "runs" / f"{m}-abc-s0").resolve()
        )
    done, _ = _lane(tmp_path, "photo_tuning.sh", "128-dfm5")
    assert done.returncode == 2 and "usage" in done.stderr


def test_photo_tuning_resample_tune_and_budget_lanes(tmp_path: Path) -> None:
    overlap = [
        *PINNED,
        "model.overrides.hidden_size=192",
        "method.prediction=data",
        "model.overrides.head_overlap=true",
    ]
    three = ["method.stages=3", "method.stage_probs=0.4,0.3,0.3", "sampler.steps=10,5,5", "sampler.thresholds=0.7,0.85"]
    variants = ("t8090 sampler.thresholds=0.8,0.9", "s668 sampler.steps=6,6,8 sampler.thresholds=0.8,0.9")
    done, calls = _lane(tmp_path, "photo_tuning.sh", "resample-dfm3", *variants)
    assert done.returncode == 1 and "no finished run runs/photo-tune/dfm3-h192-xpred-ov/runs/*-s[01]" in done.stderr
    trained = tmp_path / "runs" / "photo-tune" / "dfm3-h192-xpred-ov" / "runs" / "dfm-abc-s1"
    trained.mkdir(parents=True)
    done, calls = _lane(tmp_path, "photo_tuning.sh", "resample-dfm3", *variants, env={"SEEDS": "0,1"})
    assert done.returncode == 0, done.stderr
    assert [c[c.index("--out") + 1] for c in calls] == [
        "runs/photo-sampler/dfm3-h192-xpred-ov-t8090",
        "runs/photo-sampler/dfm3-h192-xpred-ov-s668",
    ]
    assert _overrides(calls[0]) == [*overlap, *three, "sampler.thresholds=0.8,0.9"]  # the variant's settings win
    assert _overrides(calls[1]) == [*overlap, *three, "sampler.steps=6,6,8", "sampler.thresholds=0.8,0.9"]
    assert calls[1][calls[1].index("--seeds") + 1] == "0,1"
    link = tmp_path / "runs" / "photo-sampler" / "dfm3-h192-xpred-ov-s668" / "runs" / "dfm-abc-s1"
    assert link.is_symlink() and link.resolve() == trained.resolve()  # scored, not retrained
    short = tmp_path / "runs" / "photo-800" / "dfm3-h192-xpred-ov" / "runs" / "dfm-abc-s0"  # FROM: another budget's
    short.mkdir(parents=True)
    done, calls = _lane(tmp_path, "photo_tuning.sh", "resample-dfm3", "sh03 sampler.shift=0.3",
                        env={"FROM": "runs/photo-800", "STEPS": "800"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert calls[-1][calls[-1].index("--out") + 1] == "runs/photo-800-sampler/dfm3-h192-xpred-ov-sh03"
    assert _overrides(calls[-1]) == [*overlap, *three, "sampler.shift=0.3"]
    link = tmp_path / "runs" / "photo-800-sampler" / "dfm3-h192-xpred-ov-sh03" / "runs" / "dfm-abc-s0"
    assert link.is_symlink() and link.resolve() == short.resolve()
    big = tmp_path / "runs" / "photo-128a" / "p128p8-ov-dfm3" / "runs" / "dfm-abc-s0"  # the 128 px lane's run
    big.mkdir(parents=True)
    done, calls = _lane(tmp_path, "photo_tuning.sh", "resample-128dfm3", "sh03 sampler.shift=0.3",
                        env={"FROM": "runs/photo-128a"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert calls[-1][calls[-1].index("--out") + 1] == "runs/photo-128a-sampler/p128p8-ov-dfm3-sh03"
    assert _overrides(calls[-1]) == [
        *PINNED, "data.dataset=data/photos/128/fit", "data.resolution=128", "model.overrides.patch_size=8",
        "model.overrides.hidden_size=192", "method.prediction=data", "model.overrides.head_overlap=true",
        *three, "sampler.shift=0.3",
    ]  # fmt: skip
    assert calls[-1][calls[-1].index("--steps") + 1] == "1600"
    link = tmp_path / "runs" / "photo-128a-sampler" / "p128p8-ov-dfm3-sh03" / "runs" / "dfm-abc-s0"
    assert link.is_symlink() and link.resolve() == big.resolve()
    # the 128 px lane trains with the same settings the resample lane scores with
    _, calls = _lane(tmp_path, "photo_tuning.sh", "128p8ov-dfm3")
    assert _overrides(calls[-1]) == _overrides(calls[-2])[:-1]
    fm128 = tmp_path / "runs" / "photo-128a" / "p128p8-ov-fm" / "runs" / "fm-abc-s0"  # Flow Matching's 128 px run
    fm128.mkdir(parents=True)
    done, calls = _lane(tmp_path, "photo_tuning.sh", "resample-128fm", "sh06 sampler.shift=0.6",
                        env={"FROM": "runs/photo-128a", "NUM": "1000"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    argv = calls[-1]
    assert argv[argv.index("--out") + 1] == "runs/photo-128a-sampler/p128p8-ov-fm-sh06"
    assert argv[argv.index("--methods") + 1] == "fm" and argv[argv.index("--num-samples") + 1] == "1000"
    link = tmp_path / "runs" / "photo-128a-sampler" / "p128p8-ov-fm-sh06" / "runs" / "fm-abc-s0"
    assert link.is_symlink() and link.resolve() == fm128.resolve()
    _, train = _lane(tmp_path, "photo_tuning.sh", "128p8ov-fm")
    assert _overrides(argv) == [*_overrides(train[-1]), "sampler.shift=0.6"]
    four = tmp_path / "runs" / "photo-128a" / "p128p8-ov-dfm4" / "runs" / "dfm-abc-s0"  # four stages at 128 px
    four.mkdir(parents=True)
    done, calls = _lane(tmp_path, "photo_tuning.sh", "resample-128dfm4", "t808995 sampler.thresholds=0.8,0.89,0.95",
                        env={"FROM": "runs/photo-128a"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert calls[-1][calls[-1].index("--out") + 1] == "runs/photo-128a-sampler/p128p8-ov-dfm4-t808995"
    _, train = _lane(tmp_path, "photo_tuning.sh", "128p8ov-dfm4")  # scored with the settings it was trained with
    assert _overrides(calls[-1]) == [*_overrides(train[-1]), "sampler.thresholds=0.8,0.89,0.95"]
    assert "method.stages=4" in _overrides(train[-1])
    assert (tmp_path / "runs" / "photo-128a-sampler" / "p128p8-ov-dfm4-t808995" / "runs" / "dfm-abc-s0").is_symlink()
    four64 = tmp_path / "runs" / "photo-tune" / "dfm4-h192-xpred-ov" / "runs" / "dfm-abc-s0"  # four stages at 64 px
    four64.mkdir(parents=True)
    done, calls = _lane(tmp_path, "photo_tuning.sh", "resample-dfm4", "t808995 sampler.thresholds=0.8,0.89,0.95")
    assert done.returncode == 0, done.stderr
    assert calls[-1][calls[-1].index("--out") + 1] == "runs/photo-sampler/dfm4-h192-xpred-ov-t808995"
    _, train = _lane(tmp_path, "photo_tuning.sh", "overlap-dfm4")
    assert _overrides(calls[-1]) == [*_overrides(train[-1]), "sampler.thresholds=0.8,0.89,0.95"]
    link = tmp_path / "runs" / "photo-sampler" / "dfm4-h192-xpred-ov-t808995" / "runs" / "dfm-abc-s0"
    assert link.is_symlink() and link.resolve() == four64.resolve()
    tuned = tmp_path / "runs" / "photo-tune" / "dfm3-h192-xpred-ov-p622" / "runs" / "dfm-abc-s0"  # RUN: a tune-* run
    tuned.mkdir(parents=True)
    done, calls = _lane(tmp_path, "photo_tuning.sh", "resample-dfm3",
                        "t8995 method.stage_probs=0.6,0.2,0.2 sampler.thresholds=0.89,0.95",
                        env={"RUN": "dfm3-h192-xpred-ov-p622"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert calls[-1][calls[-1].index("--out") + 1] == "runs/photo-sampler/dfm3-h192-xpred-ov-p622-t8995"
    link = tmp_path / "runs" / "photo-sampler" / "dfm3-h192-xpred-ov-p622-t8995" / "runs" / "dfm-abc-s0"
    assert link.is_symlink() and link.resolve() == tuned.resolve()
    _, calls = _lane(tmp_path, "photo_tuning.sh", "tune-dfm3", "p622 method.stage_probs=0.6,0.2,0.2")
    assert _overrides(calls[-1]) == [*overlap, *three, "method.stage_probs=0.6,0.2,0.2"]
    done, _ = _lane(tmp_path, "photo_tuning.sh", "tune-dfm3")
    assert done.returncode == 2 and "tune-dfm3: give at least one variant" in done.stderr
    done, calls = _lane(tmp_path, "photo_tuning.sh", "tune-fm", "lr2e-3 optim.lr=2e-3")  # trained afresh
    assert done.returncode == 0, done.stderr
    assert calls[-1][calls[-1].index("--out") + 1] == "runs/photo-tune/fm-h192-xpred-ov-lr2e-3"
    assert calls[-1][calls[-1].index("--methods") + 1] == "fm" and _overrides(calls[-1]) == [*overlap, "optim.lr=2e-3"]
    ln = "ln-mlm10 method.options.time=logit_normal method.main_loc=-1.0"
    done, calls = _lane(tmp_path, "photo_tuning.sh", "tune-pyramidal", ln, env={"SEEDS": "1"})  # 64 px
    assert done.returncode == 0, done.stderr
    argv = calls[-1]
    assert argv[argv.index("--out") + 1] == "runs/photo-tune/pyr-h192-xpred-ov-ln-mlm10"
    assert argv[argv.index("--methods") + 1] == "pyramidal" and argv[argv.index("--seeds") + 1] == "1"
    assert _overrides(argv) == [*PYRAMIDAL_PINNED, *overlap[len(PINNED) :], "method.options.time=logit_normal",
                                "method.main_loc=-1.0"]  # fmt: skip
    trained_with = _overrides(argv)
    pyr = tmp_path / "runs" / "photo-64-800" / "pyr-h192-xpred-ov-ln-mlm10" / "runs" / "pyramidal-abc-s0"
    pyr.mkdir(parents=True)  # that run, trained for 800 steps, scored again with 1,000 samples
    env = {"FROM": "runs/photo-64-800", "RUN": "pyr-h192-xpred-ov-ln-mlm10", "NUM": "1000"}
    done, calls = _lane(tmp_path, "photo_tuning.sh", "resample-pyramidal", f"n1000 {ln.split(' ', 1)[1]}", env=env)
    assert done.returncode == 0, done.stderr
    argv = calls[-1]
    assert argv[argv.index("--out") + 1] == "runs/photo-64-800-sampler/pyr-h192-xpred-ov-ln-mlm10-n1000"
    assert argv[argv.index("--num-samples") + 1] == "1000" and _overrides(argv) == trained_with
    link = tmp_path / "runs" / "photo-64-800-sampler" / "pyr-h192-xpred-ov-ln-mlm10-n1000" / "runs" / "pyramidal-abc-s0"
    assert link.is_symlink() and link.resolve() == pyr.resolve()
    lanes = (("tune-128fm", "p128p8-ov-fm", "fm", None), ("tune-128dfm3", "p128p8-ov-dfm3", "dfm", "3"),
             ("tune-128dfm4", "p128p8-ov-dfm4", "dfm", "4"),
             ("tune-128pyramidal", "p128p8-ov-pyramidal", "pyramidal", None))  # fmt: skip
    for lane, out, m, stages in lanes:  # 128 px
        done, calls = _lane(tmp_path, "photo_tuning.sh", lane, "mlm05 method.main_loc=-0.5",
                            env={"OUTROOT": "runs/photo-128-400", "STEPS": "400"})  # fmt: skip
        argv = calls[-1]
        assert done.returncode == 0 and argv[argv.index("--out") + 1] == f"runs/photo-128-400/{out}-mlm05"
        assert argv[argv.index("--methods") + 1] == m and argv[argv.index("--steps") + 1] == "400"
        assert "data.resolution=128" in _overrides(argv) and _overrides(argv)[-1] == "method.main_loc=-0.5"
        asked = [o for o in _overrides(argv) if o.startswith("method.stages=")]
        assert asked == ([f"method.stages={stages}"] if stages else [])
    done, calls = _lane(tmp_path, "photo_tuning.sh", "fm", env={"STEPS": "800", "OUTROOT": "runs/photo-800"})
    assert done.returncode == 0, done.stderr
    argv = calls[-1]
    assert argv[argv.index("--steps") + 1] == "800" and argv[argv.index("--out") + 1] == "runs/photo-800/fm-h192-xpred"
    assert _overrides(argv) == [*PINNED, "model.overrides.hidden_size=192", "method.prediction=data"]


def test_glyph_sampler_lane_scores_the_trained_run_without_retraining(tmp_path: Path) -> None:
    trained = tmp_path / "runs" / "glyph-check" / "dfm-xpred" / "runs" / "dfm-abc-s0"
    trained.mkdir(parents=True)
    done, calls = _lane(tmp_path, "glyph_check.sh", "sampler")
    assert done.returncode == 0, done.stderr
    outs = [c[c.index("--out") + 1] for c in calls]
    names = ["dfm-xpred-steps10-10", "dfm-xpred-tau0.9", "dfm-xpred-tau0.5"]
    assert outs == [f"runs/glyph-check/{name}" for name in names]
    assert [_overrides(c)[len(GLYPH_PINNED) :] for c in calls] == [
        ["method.prediction=data", "sampler.steps=10,10"],
        ["method.prediction=data", "sampler.thresholds=0.9"],
        ["method.prediction=data", "sampler.thresholds=0.5"],
    ]
    assert all(_overrides(c)[: len(GLYPH_PINNED)] == GLYPH_PINNED for c in calls)
    for name in names:  # each finds lane A's data-predicting run trained
        link = tmp_path / "runs" / "glyph-check" / name / "runs" / "dfm-abc-s0"
        assert link.is_symlink() and link.resolve() == trained.resolve()


def test_glyph_fm_loc_lanes_train_flow_matching_at_both_time_laws(tmp_path: Path) -> None:
    done, calls = _lane(tmp_path, "glyph_check.sh", "fm-loc")
    assert done.returncode == 0, done.stderr
    assert [c[c.index("--out") + 1] for c in calls] == ["runs/glyph-check/fm-xpred", "runs/glyph-check/fm-xpred-mlm10"]
    assert [_overrides(c)[len(GLYPH_PINNED) :] for c in calls] == [
        ["method.prediction=data"],
        ["method.prediction=data", "method.main_loc=-1.0"],
    ]
    assert all(c[c.index("--preset") + 1] == "cpu-glyph" and c[c.index("--methods") + 1] == "fm" for c in calls)
    done, calls = _lane(tmp_path, "glyph_check.sh", "fm-loc-fmnist")
    assert done.returncode == 0, done.stderr
    calls = calls[2:]  # this lane's calls (after the first lane's)
    assert [c[c.index("--out") + 1] for c in calls] == [
        "runs/preset-check/fmnist-fm-data",
        "runs/preset-check/fmnist-fm-data-mlm10",
    ]
    assert all(c[c.index("--preset") + 1] == "cpu" and c[c.index("--reference") + 1] == "val" for c in calls)
    assert _overrides(calls[-1])[len(GLYPH_PINNED) :] == ["method.prediction=data", "method.main_loc=-1.0"]


def test_border_contrast_finds_a_busy_border_in_a_saved_grid(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("border_contrast", BENCH / "border_contrast.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    calm = rng.integers(100, 110, (32, 32, 3))
    busy = calm.copy()
    busy[:4, ::2] = 250  # dots along the top border: that strip's neighbour differences grow ~30x
    pad, res = 2, 32
    grid = np.full((pad + 2 * (res + pad), pad + 3 * (res + pad), 3), 255, dtype=np.uint8)
    for i in range(6):
        r, c = divmod(i, 3)
        grid[pad + r * (res + pad) :][:res, pad + c * (res + pad) :][:, :res] = busy if i == 4 else calm
    run = tmp_path / "bench" / "runs" / "fm-x-s0" / "samples"
    run.mkdir(parents=True)
    Image.fromarray(grid).save(run / "step_00000100.png")
    images = module.grid_images(run / "step_00000100.png", res)
    assert len(images) == 6 and np.array_equal(images[4], busy) and np.array_equal(images[0], calm)
    assert abs(module.border_contrast(images[:4]) - 1) < 0.1  # uniform noise: the border like the middle
    assert module.border_contrast([busy]) > 5
    done = subprocess.run([sys.executable, str(BENCH / "border_contrast.py"), "--step", "100", "--res", "32",
                           f"run={tmp_path / 'bench'}"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and "| run |" in done.stdout, done.stderr
    done = subprocess.run([sys.executable, str(BENCH / "border_contrast.py"), "--step", "100", "--res", "30",
                           f"run={tmp_path / 'bench'}"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1 and "is not a grid of 30 px images" in done.stderr


def test_border_swd_separates_the_border_from_the_inside(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("border_swd", BENCH / "border_swd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    g = torch.Generator().manual_seed(0)
    smooth = lambda n: torch.nn.functional.interpolate(  # noqa: E731
        torch.rand(n, 3, 8, 8, generator=g) * 255, size=32, mode="bilinear").round().to(torch.uint8)  # fmt: skip
    real, fake = smooth(64), smooth(64)
    dotted = fake.clone()
    dotted[..., :2, ::4] = 255  # dots along the top border only
    clean, dots = module.swd_rows(fake, real, margin=4), module.swd_rows(dotted, real, margin=4)
    assert dots["inside"] == clean["inside"]  # the cut removes every dot: the same scores, to the last digit
    assert dots["whole"]["swd_32"] > 2 * clean["whole"]["swd_32"]  # the whole images' finest level sees them
    assert module.cut(real, 4).shape[-2:] == (24, 24)
    # end to end on samples kept in a run folder: scored, not drawn again
    run = tmp_path / "bench" / "runs" / "dfm-x-s0"
    (run / "border_swd").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    np.savez(run / "border_swd" / "step_00000100_n64.npz", arr_0=dotted.movedim(1, -1).numpy())
    np.savez(tmp_path / "ref.npz", arr_0=real.movedim(1, -1).numpy())
    args = ["--step", "100", "--margin", "4", "--num-samples", "64", "--reference", str(tmp_path / "ref.npz")]
    done = _run("border_swd.py", *args, f"dots={tmp_path / 'bench'}")
    assert done.returncode == 0, done.stderr
    whole = f"{dots['whole']['swd_32']:6.1f}"
    assert f"dots                     whole  32: {whole}" in done.stdout
    done = _run("border_swd.py", *args[:2], "--margin", "16", *args[4:], f"dots={tmp_path / 'bench'}")
    assert done.returncode == 1 and "--margin 16 leaves nothing of (32, 32) images" in done.stderr
    # --shift: the samples of that sampler are kept (and read) apart from the run's sampler's
    np.savez(run / "border_swd" / "step_00000100_n64_shift0.3.npz", arr_0=fake.movedim(1, -1).numpy())
    done = _run("border_swd.py", *args, "--shift", "0.3", f"clean={tmp_path / 'bench'}")
    assert done.returncode == 0, done.stderr
    assert f"clean                    whole  32: {clean['whole']['swd_32']:6.1f}" in done.stdout


def test_photo_tuning_lanes_are_accepted_by_the_real_bench(tmp_path: Path, monkeypatch) -> None:
    """The stand-in ``dfm`` records a lane's arguments; the real `dfm bench quality` parser and run configs must
    take them (a pinned method option that none of a lane's methods has was once refused by every lane)."""
    import argparse

    from dfm.bench.quality import add_quality_parser, checked_run_config, settings_from_args

    monkeypatch.chdir(tmp_path)  # the lanes name the photographs relative to the repository root: not built here
    for size in (64, 128):  # the folders of a data set built with splits, which --reference fit asks for
        for split in ("fit", "val", "test"):
            (tmp_path / "data" / "photos" / str(size) / split).mkdir(parents=True)
    parser = argparse.ArgumentParser()
    add_quality_parser(parser.add_subparsers())
    ln = "ln-mlm10 method.options.time=logit_normal method.main_loc=-1.0"
    lanes = [("overlap-fm",), ("overlap-dfm3",), ("overlap-dfm4",), ("overlap-pyramidal",), ("128p8ov-dfm4",),
             ("tune-fm", "mlm10 method.main_loc=-1.0"), ("tune-pyramidal", ln), ("tune-128pyramidal", ln),
             ("tune-128dfm4", "t808995 sampler.thresholds=0.8,0.89,0.95"), ("pyramidal-xpred-fine",)]  # fmt: skip
    times = {}
    for lane, *variants in lanes:
        done, calls = _lane(tmp_path, "photo_tuning.sh", lane, *variants)
        assert done.returncode == 0, done.stderr
        settings = settings_from_args(parser.parse_args(calls[-1][1:]))
        for variant in settings.variants:
            cfg = checked_run_config(settings, variant, seed=0)
            if cfg.method.name == "pyramidal":
                times[lane] = (cfg.method.options["time"], cfg.method.main_loc)
    # the pinned uniform law (the runs' own time) unless the lane asks for its own
    assert times == {"overlap-pyramidal": ("uniform", 0.0), "tune-pyramidal": ("logit_normal", -1.0),
                     "tune-128pyramidal": ("logit_normal", -1.0), "pyramidal-xpred-fine": ("uniform", 0.0)}  # fmt: skip
