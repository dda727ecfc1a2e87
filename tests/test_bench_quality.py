"""`dfm bench quality` in miniature: four methods, tiny models, cached and resumable, a report and plots."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dfm.bench.quality import (
    ABLATIONS,
    BENCH_PRESETS,
    QualitySettings,
    Variant,
    add_quality_parser,
    checked_run_config,
    comparison_variants,
    ensure_references,
    reference_images,
    run_config,
    run_quality,
    settings_from_args,
)
from dfm.presets import get_preset

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed")


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_quality_parser(parser.add_subparsers())
    return parser.parse_args(["quality", *argv])


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> str:
    from dfm.eval.extractors.classifier import FashionCNN

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cnn") / "cnn.safetensors"
    save_file(FashionCNN().state_dict(), path)  # a stand-in: the bench needs features, not a good classifier
    return str(path)


def test_smoke_bench_runs_caches_and_reports(tmp_path: Path, classifier: str) -> None:
    settings = QualitySettings(variants=comparison_variants(), **{**BENCH_PRESETS["smoke"], "num_samples": 12})
    logs: list[str] = []
    result = run_quality(settings, tmp_path, command="test", log=logs.append, weights={"fashion-cnn": classifier},
                         cache=tmp_path / "cache")  # fmt: skip
    rows = result["rows"]
    # 4 methods x 1 seed x {(step 2, g 1.0), (step 2, g 1.5)}
    assert len(rows) == 8
    assert {r["method"] for r in rows} == {"dfm", "fm", "cascade", "pyramidal"}
    for r in rows:
        assert r["fd_efficientnet-lite0"] > 0 and r["fd_fashion-cnn"] >= 0
        assert {"swd_28", "swd_14", "class_accuracy"} <= set(r)
        # Heun 2 + 2 (4 for Flow Matching): 2 x 4 - 1 network evaluations, 2 x 4 - 2 for the cascade, whose two
        # models each end on the data with an Euler step
        assert r["nfe"] == (6 if r["method"] == "cascade" else 7) * (1 if r["guidance"] == 1.0 else 2)
    report = (tmp_path / "report.md").read_text()
    for name in ("DFM", "Flow Matching", "Cascaded", "Pyramidal Flow"):
        assert f"| {name} | 1.0 |" in report and f"| {name} | 1.5 |" in report
    assert len(result["plots"]) == 4 and all(Path(p).is_file() for p in result["plots"])
    flops = {info["method"]: info["train_flops"] for info in result["summary"]["runs"].values()}
    assert flops["dfm"] == pytest.approx(flops["fm"], rel=0.05)  # same backbone, same token count

    # A second call reuses every run and every score: same rows, no training.
    logs.clear()
    again = run_quality(settings, tmp_path, command="test", log=logs.append, weights={"fashion-cnn": classifier},
                        cache=tmp_path / "cache")  # fmt: skip
    assert not any(line.startswith(("training", "scoring", "sampled")) for line in logs)
    assert json.dumps(again["rows"], sort_keys=True) == json.dumps(rows, sort_keys=True)


def test_training_runs_on_the_bench_device(tmp_path: Path, monkeypatch) -> None:
    # `--device cuda` once trained on the CPU (the Trainer's default) and only scored on the GPU.
    import dfm.bench.quality as quality

    seen = []

    class Recorder:
        def __init__(self, cfg, run_dir, resume, dist_info, progress):
            seen.append(dist_info.device)
            Path(run_dir).mkdir(parents=True)

        def fit(self):
            return None

    monkeypatch.setattr(quality, "Trainer", Recorder)
    cfg = run_config(QualitySettings(**BENCH_PRESETS["smoke"]), comparison_variants()[0], seed=0)
    quality.train_run(cfg, tmp_path / "cuda-run", log=lambda line: None, device="cuda")
    quality.train_run(cfg, tmp_path / "cpu-run", log=lambda line: None)
    assert seen == [torch.device("cuda"), torch.device("cpu")]


def test_extending_a_bench_keeps_the_checkpoints_of_its_earlier_call(tmp_path: Path) -> None:
    import dfm.bench.quality as quality
    from dfm.checkpoint import list_checkpoints

    run = tmp_path / "run"
    for steps, points in ((4, 4), (8, 2)):  # checkpoints every step, then every 4 steps (keep_last 5, then 3)
        settings = QualitySettings(**{**BENCH_PRESETS["smoke"], "steps": steps, "eval_points": points})
        quality.train_run(run_config(settings, comparison_variants()[1], seed=0), run, log=lambda line: None)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [f"step_{s:08d}" for s in (1, 2, 3, 4, 8)]


def test_sampling_ablation_shares_one_training_run() -> None:
    variants = ABLATIONS["sampling"]()
    assert len({v.run_key() for v in variants}) == 1 and len(variants) == 10
    assert [v.sample["solver"] for v in variants] == ["euler"] * 9 + ["heun"]  # the paper's study is Euler's
    assert len({v.run_key() for v in ABLATIONS["stage-probs"]()}) == 6  # 0.3, 0.5, 0.7, 0.8, 0.9, 0.95
    assert Variant("a", "fm").run_key() != Variant("a", "dfm").run_key()


def test_each_method_trains_with_its_loss_unless_one_is_asked_for() -> None:
    plain = settings_from_args(_parse("--preset", "smoke", "--methods", "dfm,fm,cascade"))
    losses = {v.method: run_config(plain, v, 0).method.loss_weighting for v in plain.variants}
    assert losses == {"dfm": "edm", "fm": "velocity", "cascade": "velocity"}  # each method's measured best
    asked = settings_from_args(_parse("--preset", "smoke", "--methods", "dfm,fm", "-o", "method.loss_weighting=edm"))
    assert {run_config(asked, v, 0).method.loss_weighting for v in asked.variants} == {"edm"}
    velocity = settings_from_args(_parse("--preset", "smoke", "-o", "method.loss_weighting=velocity"))
    assert {run_config(velocity, v, 0).method.name for v in velocity.variants} >= {"dfm", "fm"}
    assert run_config(velocity, velocity.variants[0], 0).method.loss_weighting == "velocity"


def test_a_method_option_reaches_only_the_methods_that_have_it() -> None:
    asked = ["-o", "method.options.time=logit_normal", "-o", "method.options.cond_noise=0.1"]
    settings = settings_from_args(_parse("--preset", "smoke", "--methods", "dfm,pyramidal,cascade", *asked))
    options = {v.method: checked_run_config(settings, v, 0).method.options for v in settings.variants}
    assert options["dfm"] == {} and options["pyramidal"]["time"] == "logit_normal"
    assert options["cascade"]["cond_noise"] == 0.1 and "time" not in options["cascade"]
    wrong = settings_from_args(_parse("--preset", "smoke", "--methods", "dfm,fm", "-o", "method.options.time=uniform"))
    with pytest.raises(ValueError, match=r"-o method.options.time=uniform: not a setting of any method of this bench"):
        checked_run_config(wrong, wrong.variants[0], 0)


def test_an_override_scoped_to_a_method_reaches_only_its_runs() -> None:
    asked = ["-o", "fm:method.main_loc=-1.0", "-o", "fm:sampler.steps=40", "-o", "method.main_scale=0.8",
             "-o", "pyramidal:method.main_loc=-0.5", "-o", "pyramidal:method.main_loc=-0.7"]  # fmt: skip
    settings = settings_from_args(_parse("--preset", "smoke", "--methods", "dfm,fm,pyramidal", *asked))
    assert settings.overrides[-1] == "method.main_scale=0.8"  # unscoped: every variant
    assert settings.method_overrides == {"fm": ("method.main_loc=-1.0", "sampler.steps=40"),
                                         "pyramidal": ("method.main_loc=-0.5", "method.main_loc=-0.7")}  # fmt: skip
    cfgs = {v.method: checked_run_config(settings, v, 0) for v in settings.variants}
    assert {m: c.method.main_loc for m, c in cfgs.items()} == {"dfm": 0.0, "fm": -1.0, "pyramidal": -0.7}
    assert {c.method.main_scale for c in cfgs.values()} == {0.8}
    assert cfgs["fm"].sampler.steps == (40,)  # after the switch: Flow Matching's own steps, not DFM's split
    assert cfgs["dfm"].sampler.steps == run_config(settings_from_args(_parse("--preset", "smoke")),
                                                   Variant("DFM", "dfm"), 0).sampler.steps  # fmt: skip
    # the cpu-photo preset trains Flow Matching and Pyramidal Flow at their own best time laws on photographs, and -o
    # adds to them
    photo = settings_from_args(_parse("--preset", "cpu-photo", "-o", "fm:optim.lr=2e-4", "-o", "dfm:method.tied=true"))
    law = ("method.options.time=logit_normal", "method.main_loc=-1.0")
    assert photo.method_overrides == {"dfm": ("method.tied=true",), "fm": ("method.main_loc=-1.0", "optim.lr=2e-4"),
                                      "pyramidal": law}  # fmt: skip
    assert "method.main_loc=-1.0" not in photo.overrides
    pinned = settings_from_args(_parse("--preset", "cpu-photo", "-o", "method.main_loc=-1.5", "-o", "fm:optim.lr=2e-4"))
    # a location for every method replaces the preset's
    assert pinned.method_overrides == {"fm": ("optim.lr=2e-4",), "pyramidal": law[:1]}
    with pytest.raises(ValueError, match=r"-o cascade:optim.lr=1e-3: 'cascade' is not a method of this bench; choose "
                                         r"from dfm, fm"):  # fmt: skip
        settings_from_args(_parse("--preset", "smoke", "--methods", "dfm,fm", "-o", "cascade:optim.lr=1e-3"))
    with pytest.raises(ValueError, match=r"-o fm:=1: expected METHOD:SECTION.KEY=VALUE"):
        settings_from_args(_parse("--preset", "smoke", "--methods", "fm", "-o", "fm:=1"))
    data = settings_from_args(_parse("--preset", "smoke", "-o", "data.dataset=fashion-mnist:fit"))  # ':' in a value
    assert data.overrides[-1] == "data.dataset=fashion-mnist:fit" and data.method_overrides == {}


def test_a_prediction_asked_for_reaches_the_baselines_that_implement_it() -> None:
    plain = settings_from_args(_parse("--preset", "smoke", "--methods", "dfm,fm,cascade,pyramidal"))
    asked = settings_from_args(_parse("--preset", "smoke", "--methods", "dfm,fm,cascade,pyramidal",
                                      "-o", "method.prediction=velocity", "-o", "method.prediction=data"))  # fmt: skip
    predictions = {v.method: run_config(plain, v, 0).method.prediction for v in plain.variants}
    assert predictions == {"dfm": "data", "fm": "data", "cascade": "velocity", "pyramidal": "velocity"}
    predictions = {v.method: run_config(asked, v, 0).method.prediction for v in asked.variants}
    assert predictions == {"dfm": "data", "fm": "data", "cascade": "velocity", "pyramidal": "data"}  # the last -o


def test_settings_from_args_and_errors(tmp_path: Path) -> None:
    s = settings_from_args(_parse("--preset", "smoke", "--methods", "dfm,fm", "--seeds", "0,1", "--steps", "6"))
    assert [v.method for v in s.variants] == ["dfm", "fm"] and s.seeds == (0, 1) and s.steps == 6
    assert s.eval_steps == [6]
    assert QualitySettings(steps=1200, eval_points=3).eval_steps == [400, 800, 1200]
    with pytest.raises(ValueError, match="unknown"):
        settings_from_args(_parse("--methods", "dfm,gan"))
    with pytest.raises(ValueError, match="1.0"):
        settings_from_args(_parse("--guidance", "1.5,2.0"))
    picked = settings_from_args(_parse("--ablation", "stage-probs", "--only", "0.5,0.9"))
    assert [v.name for v in picked.variants] == ["p(Q=1)=0.5", "p(Q=1)=0.9"]
    with_fm = settings_from_args(_parse("--ablation", "stage-probs", "--only", "0.5", "--methods", "dfm,fm"))
    assert [(v.name, v.method) for v in with_fm.variants] == [("p(Q=1)=0.5", "dfm"), ("Flow Matching", "fm")]
    with pytest.raises(ValueError, match="choose from 0.3, 0.5, 0.7"):
        settings_from_args(_parse("--ablation", "stage-probs", "--only", "0.6"))
    with pytest.raises(ValueError, match="with --ablation"):
        settings_from_args(_parse("--only", "0.5"))
    # a sampler override the DFM config cannot take is refused before anything is trained or written, with the fix
    fm40 = settings_from_args(_parse("--preset", "smoke", "--methods", "fm", "-o", "sampler.steps=40"))
    with pytest.raises(ValueError, match=r"sampler.steps=40: the model has 2 stage.*-o sampler.steps=30,10 gives"):
        run_quality(fm40, tmp_path / "bench", log=lambda _: None, cache=tmp_path / "cache")
    assert list(tmp_path.iterdir()) == []
    ablation = settings_from_args(_parse("--preset", "smoke", "--ablation", "decomposition"))
    assert [v.train for v in ablation.variants] == [
        ("method.decomposition=laplacian",),
        ("method.decomposition=haar",),
        ("method.decomposition=dct",),
    ]


def test_video_smoke_bench(tmp_path: Path, classifier: str) -> None:
    settings = settings_from_args(_parse("--preset", "video-smoke"))
    assert [v.method for v in settings.variants] == ["dfm", "fm"]
    result = run_quality(settings, tmp_path, command="test", log=lambda _: None, weights={"fashion-cnn": classifier},
                         cache=tmp_path / "cache")  # fmt: skip
    rows = result["rows"]
    assert len(rows) == 4  # 2 methods x {(2, 1.0), (2, 1.5)}
    for r in rows:
        assert {"fd_frames_efficientnet-lite0", "fd_frames_fashion-cnn", "swd_frames_32", "temporal_change_gap",
                "class_accuracy_frames"} <= set(r)  # fmt: skip
    assert len(list((tmp_path / "cache").glob("ref_data_moving-fashion-mnist_*_n8.npz"))) == 1
    assert "| DFM | 1.5 |" in (tmp_path / "report.md").read_text()


def test_cli_shares_reference_statistics_and_never_reuses_stale_ones(tmp_path: Path, classifier: str, capsys) -> None:
    from dfm.cli import main as cli

    cache = tmp_path / "cache"
    common = ["bench", "quality", "--preset", "smoke", "--methods", "fm", "--cache", str(cache),
              "--weights", f"fashion-cnn={classifier}", "--num-samples", "8"]  # fmt: skip
    assert cli([*common, "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert "| Flow Matching | 1.0 |" in captured.out
    # every point says what it is doing (scoring takes minutes at 128 px), with progress bars on stderr
    assert "at step 2, guidance 1.0: sampling 8 images" in captured.out and "sampled in" in captured.out
    assert "train: 100%|" in captured.err and "%|" in captured.err.split("train: 100%|")[-1]
    report = (tmp_path / "a" / "report.md").read_text()
    assert "Command: `dfm bench quality --preset smoke --methods fm --cache" in report  # the full command line
    refs = sorted(p.name for p in cache.glob("ref_*.npz"))
    assert len(refs) == 2 and all("_n64.npz" in r for r in refs)  # one per Fréchet extractor, smoke's 64 images
    stamp = {p: p.stat().st_mtime_ns for p in cache.glob("ref_*.npz")}
    assert cli([*common, "--out", str(tmp_path / "b"), "--no-progress"]) == 0  # another bench: reuses the statistics
    captured = capsys.readouterr()
    assert "%|" not in captured.err and "sampling 8 images" in captured.out  # no bars; the log lines stay
    # The finished run in "a" was trained with the velocity loss: asking for another loss there must not score it.
    capsys.readouterr()
    assert cli([*common, "--out", str(tmp_path / "a"), "-o", "method.loss_weighting=edm"]) == 2
    err = capsys.readouterr().err
    assert "was trained with other settings (method.loss_weighting: velocity -> edm)" in err and "--out" in err
    assert (tmp_path / "a" / "report.md").read_text() == report
    assert {p: p.stat().st_mtime_ns for p in cache.glob("ref_*.npz")} == stamp
    assert not list(cache.glob("fashion_cnn*"))  # the given classifier was used, none was trained
    # Another solver on the same run: no training to redo, but every point is sampled and scored again.
    scored = set((tmp_path / "a" / "scores").glob("*.json"))
    assert cli([*common, "--out", str(tmp_path / "a"), "-o", "sampler.solver=euler"]) == 0
    assert len(set((tmp_path / "a" / "scores").glob("*.json")) - scored) == len(scored) > 0
    rows = json.loads((tmp_path / "a" / "results.json").read_text())["rows"]
    assert {r["nfe"] for r in rows if r["guidance"] == 1.0} == {4}  # Euler 4, where the preset's Heun 4 makes 7
    fewer = settings_from_args(_parse("--preset", "smoke", "--methods", "fm"))
    fewer.num_reference = 32
    new = ensure_references(cache, fewer, {"fashion-cnn": classifier})
    assert all("_n32.npz" in Path(p).name for p in new[:2]) and len(list(cache.glob("ref_*.npz"))) == 4
    with pytest.raises(SystemExit):
        cli([*common, "--weights", "fashion-cnn"])  # NAME=PATH expected


def test_latent_bench_decodes_samples_and_scores_them_against_the_images(tmp_path: Path, classifier: str) -> None:
    """Latents from `dfm prepare`: samples are decoded by the recorded VAE and compared with the source images."""
    diffusers = pytest.importorskip("diffusers")
    from PIL import Image

    from dfm.data.prepare import prepare_latents

    rng = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(32):  # 64 images: the smoke preset's reference count
            pixels = (torch.rand(16, 16, 3, generator=rng) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    torch.manual_seed(0)
    blocks = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                  layers_per_block=1, norm_num_groups=4, sample_size=16, **blocks)  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    latents = prepare_latents(str(tmp_path / "images"), str(tmp_path / "vae"), tmp_path / "latents", resolution=16,
                              progress=False)  # fmt: skip
    args = _parse("--preset", "smoke", "--methods", "dfm,fm", "--num-samples", "8", "-o", f"data.dataset={latents}",
                  "-o", "data.resolution=16", "-o", "model.overrides.patch_size=2")  # fmt: skip
    settings = settings_from_args(args)
    result = run_quality(settings, tmp_path / "bench", command="test", log=lambda _: None,
                         weights={"fashion-cnn": classifier}, cache=tmp_path / "cache")  # fmt: skip
    assert {r["method"] for r in result["rows"]} == {"dfm", "fm"}
    # the reference holds the 64 source images (16 px, RGB), not latents
    (ref_images,) = (tmp_path / "cache").glob("ref_data_images-*_16px_*.npz")
    import numpy as np

    assert np.load(ref_images)["arr_0"].shape == (64, 16, 16, 3)
    spec = json.loads(next((tmp_path / "bench").rglob("data_spec.json")).read_text())
    assert spec["sample_shape"] == [4, 8, 8] and spec["padding"] == 0
    val = settings_from_args(_parse("--preset", "smoke", "--reference", "val", "-o", f"data.dataset={latents}"))
    with pytest.raises(ValueError, match=r"latents \(dfm prepare\) are scored on --reference test"):
        reference_images(tmp_path / "cache", val)


def test_the_photo_preset_runs_every_method_at_the_settings_the_study_chose(tmp_path: Path) -> None:
    """cpu-photo (docs/RESULTS.md, photographs): a model as wide as its 192-value token, the overlapping head and
    data prediction for all three methods (a baseline's twin would otherwise predict the velocity); -o still wins."""
    preset = dict(BENCH_PRESETS["cpu-photo"])
    preset["overrides"] = (*preset["overrides"], f"data.dataset={tmp_path}")  # the photographs are not built here
    settings = QualitySettings(**preset)
    chosen = {v.method: run_config(settings, v, seed=0) for v in comparison_variants() if v.method in settings.methods}
    assert sorted(chosen) == ["dfm", "fm", "pyramidal"]
    assert settings.metrics == ("fd:efficientnet-lite0", "swd", "sigma")  # the detail per level beside the SWD
    for method, cfg in chosen.items():
        assert cfg.method.name == method and cfg.method.prediction == "data"
        assert cfg.model.overrides == {"patch_size": 8, "hidden_size": 192, "head_overlap": True}
    # each baseline's time law at its best on photographs; DFM keeps its preset's
    assert chosen["fm"].method.main_loc == chosen["pyramidal"].method.main_loc == -1.0
    assert chosen["pyramidal"].method.options["time"] == "logit_normal"
    assert chosen["dfm"].method.main_loc == get_preset("quickstart").method.main_loc
    # a setting given with -o for every method wins over the preset's per-method one (photo_tuning.sh pins the old law)
    pinned = settings_from_args(_parse("--preset", "cpu-photo", "-o", "method.options.time=uniform",
                                       "-o", f"data.dataset={tmp_path}"))  # fmt: skip
    pyramidal = next(v for v in pinned.variants if v.method == "pyramidal")
    cfg = run_config(pinned, pyramidal, seed=0)
    assert cfg.method.options["time"] == "uniform" and cfg.method.main_loc == -1.0
    preset["overrides"] = (*preset["overrides"], "model.overrides.head_overlap=false", "method.prediction=velocity")
    cfg = run_config(QualitySettings(**preset), comparison_variants()[1], seed=0)
    assert cfg.model.overrides["head_overlap"] is False and cfg.method.prediction == "velocity"
