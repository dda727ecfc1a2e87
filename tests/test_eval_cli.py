"""`dfm eval` end to end on tiny image sets with the offline EfficientNet-Lite0 and a random Fashion CNN."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dfm.eval import seam_ratio
from dfm.eval.cli import add_eval_parser, main
from dfm.eval.extractors import FashionCNN
from dfm.eval.extractors.efficientnet import bundled_weights_path
from dfm.eval.frechet import FeatureStats
from dfm.eval.reference import ReferenceStats, load_reference, save_reference
from dfm.eval.swd import level_sigma
from dfm.eval.weights import sha256_file

N = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same 12 RGB 32x32 images as an ADM npz (with labels and a sampling.json) and as a PNG folder."""
    root = tmp_path_factory.mktemp("eval_cli")
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 255, (N, 4, 4, 3))
    images = np.kron(coarse, np.ones((1, 8, 8, 1))) + rng.uniform(-20, 20, (N, 32, 32, 3))
    images = images.clip(0, 255).astype(np.uint8)
    labels = np.arange(N) % 10
    samples = root / "run" / "samples.npz"
    samples.parent.mkdir()
    np.savez(samples, arr_0=images, labels=labels)
    sampling = {"steps": 40, "solver": "euler", "cfg_scale": 1.5}
    (samples.parent / "sampling.json").write_text(json.dumps(sampling))
    folder = root / "pngs" / "images"
    folder.parent.mkdir()
    (folder.parent / "sampling.json").write_text(json.dumps({"steps": 10}))
    folder.mkdir()
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(folder / f"{i:05d}_class{label}.png")
    torch.manual_seed(0)
    classifier = root / "cnn.pth"
    torch.save(FashionCNN().state_dict(), classifier)
    garbage = root / "not_a_network.pt"
    garbage.write_bytes(b"PK\x03\x04 this is not a network")
    return {
        "root": root,
        "samples": samples,
        "folder": folder,
        "sampling": sampling,
        "classifier": classifier,
        "garbage": garbage,
    }


def test_score_npz_against_folder_writes_scores_and_protocol(data, capsys) -> None:
    out = data["root"] / "scores.json"
    metrics = "fd:efficientnet-lite0,pr:efficientnet-lite0,is:efficientnet-lite0,swd,accuracy"
    argv = [
        "score",
        str(data["samples"]),
        "--ref",
        str(data["folder"]),
        "--metrics",
        metrics,
        "--weights",
        f"fashion-cnn={data['classifier']}",
        "--is-splits",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    scores, protocol = result["scores"], result["protocol"]
    assert "fd_efficientnet-lite0" in capsys.readouterr().out
    # The reference holds the same images: zero distance, full precision and recall.
    assert scores["fd_efficientnet-lite0"] == pytest.approx(0.0, abs=1e-4)
    assert scores["precision_efficientnet-lite0"] == 1.0 and scores["recall_efficientnet-lite0"] == 1.0
    assert scores["is_efficientnet-lite0_mean"] >= 1.0
    assert set(scores) >= {"swd_32", "swd_16", "swd_mean"}
    # Accuracy against the labels stored in the npz, under the given classifier.
    model = FashionCNN()
    model.load_state_dict(torch.load(data["classifier"]))
    with np.load(data["samples"]) as npz:
        images = torch.from_numpy(npz["arr_0"]).permute(0, 3, 1, 2)
        expected = (model.eval()(images).logits.argmax(1).numpy() == npz["labels"]).mean()
    assert scores["class_accuracy"] == pytest.approx(expected)
    # The protocol: extractor, weights file and hash, preprocessing, counts, sampler settings.
    effnet = protocol["extractors"]["efficientnet-lite0"]
    assert effnet["weights_sha256"] == sha256_file(bundled_weights_path())
    assert effnet["preprocessing"]["size"] == 224 and effnet["feature_dim"] == 1280
    assert protocol["extractors"]["fashion-cnn"]["weights"] == str(data["classifier"])
    assert protocol["samples"]["count"] == N and protocol["references"][0]["kind"] == "folder"
    assert protocol["sampling"] == data["sampling"]
    assert protocol["settings"]["pr_k"] == 3 and protocol["settings"]["swd"]["images"] == N


def test_seams_score_the_token_grid_of_samples_and_reference(data) -> None:
    # The fixture's images are 8x8 flat tiles plus noise: a mosaic on the 8-pixel grid (half of a 4-pixel grid's
    # borders are its borders: a weaker ratio there).
    out = data["root"] / "seams.json"
    samples, ref = str(data["samples"]), str(data["folder"])
    assert main(["score", samples, "--ref", ref, "--metrics", "seams,seams:4", "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    with np.load(data["samples"]) as npz:
        images = torch.from_numpy(npz["arr_0"]).permute(0, 3, 1, 2).float()
    scores = result["scores"]
    assert scores["seam_ratio_8"] == pytest.approx(seam_ratio(images, 8)) and scores["seam_ratio_8"] > 3
    assert (
        scores["seam_ratio_4"] == pytest.approx(seam_ratio(images, 4))
        and scores["seam_ratio_4"] < scores["seam_ratio_8"]
    )
    # the reference folder holds the same images (in another order): the same ratios
    assert scores["seam_ratio_8_ref"] == pytest.approx(scores["seam_ratio_8"])
    assert result["protocol"]["settings"]["seams"] == {"periods": [4, 8], "reference_images": N}
    # No reference needed
    assert main(["score", str(data["samples"]), "--metrics", "seams:8", "--out", str(out), "--no-progress"]) == 0
    assert set(json.loads(out.read_text())["scores"]) == {"seam_ratio_8"}


def test_sigma_scores_the_detail_per_scale_of_samples_and_reference(data) -> None:
    out = data["root"] / "sigma.json"
    samples, ref = str(data["samples"]), str(data["folder"])
    args = ["score", samples, "--metrics", "sigma", "--swd-min-resolution", "8", "--out", str(out), "--no-progress"]
    assert main([*args, "--ref", ref]) == 0
    result = json.loads(out.read_text())
    with np.load(data["samples"]) as npz:
        images = torch.from_numpy(npz["arr_0"]).permute(0, 3, 1, 2).float()
    expected = level_sigma(images, 8)
    scores = result["scores"]
    assert {k: scores[k] for k in expected} == pytest.approx(expected) and len(expected) >= 2
    # the reference folder holds the same images (in another order): the same spreads beside them
    assert {k: scores[f"{k}_ref"] for k in expected} == pytest.approx(expected)
    assert result["protocol"]["settings"]["sigma"]["min_resolution"] == 8
    assert main(args) == 0  # no reference needed
    assert set(json.loads(out.read_text())["scores"]) == set(expected)


def test_reference_file_round_trips_exactly(tmp_path) -> None:
    x = np.random.default_rng(1).standard_normal((20, 4))
    ref = ReferenceStats(
        "efficientnet-lite0", FeatureStats(4).update(x), {"source": {"kind": "npz"}}, x.astype(np.float32)
    )
    loaded = load_reference(save_reference(tmp_path / "ref.npz", ref))
    assert loaded.extractor == "efficientnet-lite0" and loaded.stats.count == 20
    np.testing.assert_array_equal(loaded.mu, ref.mu)
    np.testing.assert_allclose(loaded.sigma, ref.sigma, rtol=1e-15)
    np.testing.assert_array_equal(loaded.features, x.astype(np.float32))
    assert loaded.protocol == {"source": {"kind": "npz"}}
    with pytest.raises(ValueError, match=r"\.npz"):
        save_reference(tmp_path / "ref.json", ref)


def test_ref_command_then_score_against_statistics(data) -> None:
    ref_file = data["root"] / "ref_effnet.npz"
    argv = ["ref", str(data["folder"]), "--extractor", "efficientnet-lite0", "--out", str(ref_file)]
    assert main([*argv, "--save-features", "--no-progress"]) == 0
    ref = load_reference(ref_file)
    assert ref.stats.count == N and ref.features.shape == (N, 1280)
    assert ref.protocol["extractor"]["name"] == "efficientnet-lite0"
    out = data["root"] / "vs_stats.json"
    metrics = "fd:efficientnet-lite0,pr:efficientnet-lite0"
    argv = [str(data["folder"]), "--ref", str(ref_file), "--metrics", metrics, "--out", str(out), "--no-progress"]
    assert main(argv) == 0  # `score` may be left out with `python -m dfm.eval`
    scores = json.loads(out.read_text())["scores"]
    assert scores["fd_efficientnet-lite0"] == pytest.approx(0.0, abs=1e-4)
    assert scores["precision_efficientnet-lite0"] == 1.0
    assert json.loads(out.read_text())["protocol"]["sampling"] == {"steps": 10}  # found in the parent folder


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["score", "missing_dir_xyz", "--ref", "fashion-mnist", "--metrics", "swd"], "missing_dir_xyz"),
        (["score", "{samples}", "--ref", "{folder}", "--metrics", "fjd"], "unknown metric 'fjd'"),
        (["score", "{samples}", "--metrics", "seams:1"], "metric 'seams:1': give the token grid in pixels"),
        (["score", "{samples}", "--metrics", "seams:5"], "period=5 must be >= 2 and divide the image size 32x32"),
        (["score", "{samples}", "--metrics", "fd:efficientnet-lite0"], "need a reference"),
        (
            ["score", "{samples}", "--ref", "{folder}", "--metrics", "is", "--weights", "inception-v3=/no/such.pth"],
            "/no/such.pth",
        ),
        # issue 11: damaged weights files
        (
            ["score", "{samples}", "--ref", "{folder}", "--metrics", "fvd", "--weights", "i3d={garbage}"],
            "i3d: {garbage} is not a TorchScript file",
        ),
        (
            ["score", "{samples}", "--metrics", "accuracy", "--weights", "fashion-cnn={garbage}"],
            "cannot read weights file {garbage}",
        ),
    ],  # fmt: skip
)
def test_bad_input_is_one_line_and_nonzero(data, capsys, argv, message) -> None:
    names = {"samples": data["samples"], "folder": data["folder"], "garbage": data["garbage"]}
    argv, message = [a.format(**names) for a in argv], message.format(**names)
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bad_weights_flag_is_rejected_by_the_parser(data) -> None:
    with pytest.raises(SystemExit) as info:
        main(["score", str(data["samples"]), "--weights", "no-equals-sign"])
    assert info.value.code == 2


def test_add_eval_parser_wires_into_another_cli() -> None:
    parser = argparse.ArgumentParser(prog="dfm")
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "ref", "fashion-mnist:test", "--extractor", "fashion-cnn", "--out", "r.npz"])
    assert (args.command, args.eval_command, args.source, args.extractor) == (
        "eval",
        "ref",
        "fashion-mnist:test",
        "fashion-cnn",
    )
    assert callable(args.handler)


def test_dfm_cli_dispatches_to_eval(capsys) -> None:
    from dfm.cli import main as dfm_main

    assert dfm_main(["eval", "list"]) == 0
    assert "efficientnet-lite0" in capsys.readouterr().out


def test_module_entry_point_lists_extractors() -> None:
    done = subprocess.run([sys.executable, "-m", "dfm.eval", "list"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for name in ("dinov2-vitl14", "inception-v3", "efficientnet-lite0", "fashion-cnn"):
        assert name in done.stdout


def _score_error(argv: list[str], capsys) -> str:
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def bad_sets(tmp_path_factory) -> dict:
    """Sample sets a user can get wrong: empty, a damaged PNG, too few labels, labels the classifier lacks."""
    root = tmp_path_factory.mktemp("bad_sets")
    images = np.zeros((12, 32, 32, 3), np.uint8)
    np.savez(root / "empty.npz", arr_0=images[:0])
    np.savez(root / "mislabelled.npz", arr_0=images, labels=np.arange(5))
    np.savez(root / "99.npz", arr_0=images, labels=np.full(12, 99))
    (root / "pngs").mkdir()
    Image.fromarray(images[0]).save(root / "pngs" / "ok.png")
    (root / "pngs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n torn")
    return {"root": root}


@pytest.mark.parametrize(
    ("samples", "metric", "message"),
    [
        ("empty.npz", "swd", "{root}/empty.npz holds no images"),
        ("pngs", "swd", "cannot read image {root}/pngs/broken.png"),
        ("mislabelled.npz", "accuracy", "{root}/mislabelled.npz holds 12 images but 5 labels"),
        ("99.npz", "accuracy", "sample label 99 is not a class of the fashion-cnn classifier (0..9)"),
    ],
)
def test_bad_sample_sets_are_refused_with_the_file_named(data, bad_sets, capsys, samples, metric, message) -> None:
    root = bad_sets["root"]
    argv = ["score", str(root / samples), "--metrics", metric, "--out", str(root / "scores.json")]
    argv += ["--ref", str(data["folder"])] if metric == "swd" else ["--weights", f"fashion-cnn={data['classifier']}"]
    assert message.format(root=root) in _score_error(argv, capsys)


def test_score_checks_the_output_folder_before_computing(data, tmp_path, capsys, monkeypatch) -> None:
    module = sys.modules["dfm.eval.evaluate"]  # the package's `evaluate` attribute is the function
    monkeypatch.setattr(module, "evaluate", lambda *a, **k: pytest.fail("scored before the check"))
    blocker = tmp_path / "file"  # root can write anywhere: a path through a regular file cannot be written
    blocker.write_text("")
    argv = ["score", str(data["samples"]), "--ref", str(data["folder"]), "--metrics", "swd"]
    assert f"cannot write to {blocker}" in _score_error([*argv, "--out", str(blocker / "scores.json")], capsys)


# ---------------------------------------------------------------------------------------------- issue 24
class _NotI3D(torch.nn.Module):
    """Takes I3D's arguments but gives 3 numbers per clip, not 400 features."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True, return_features: bool = False):
        return x.mean(dim=(2, 3, 4)) * self.scale


def test_files_that_are_not_what_they_claim_give_one_line_without_unsafe_advice(data, tmp_path, capsys) -> None:
    import pickle
    import warnings

    clips = tmp_path / "clips.npz"
    np.savez(clips, arr_0=np.zeros((2, 4, 16, 16, 3), np.uint8))
    fvd = ["score", str(clips), "--ref", str(clips), "--metrics", "fvd", "--out", str(tmp_path / "s.json")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, and still FVD's format
        linear, wrong = tmp_path / "linear.pt", tmp_path / "wrong.pt"
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(linear))
        torch.jit.script(_NotI3D()).save(str(wrong))
    err = _score_error([*fvd, "--weights", f"i3d={linear}"], capsys)
    assert f"i3d: {linear} is a TorchScript network, but not I3D" in err and "--weights i3d=PATH" in err
    err = _score_error([*fvd, "--weights", f"i3d={wrong}"], capsys)
    assert f"i3d: {wrong} gave (2, 3) for 2 clip(s), not 400 features each" in err

    junk, planted, objects = tmp_path / "junk.npz", tmp_path / "planted.npz", tmp_path / "objects.npz"
    junk.write_bytes(b"these are not the samples you are looking for" * 4)
    planted.write_bytes(pickle.dumps({"arr_0": [1, 2, 3]}))
    np.savez(objects, arr_0=np.array([{"a": 1}], dtype=object))
    for bad in (junk, planted, objects):
        as_samples, as_reference = [str(bad), "--ref", str(data["folder"])], [str(data["samples"]), "--ref", str(bad)]
        for argv in (["score", *as_samples], ["score", *as_reference]):
            err = _score_error([*argv, "--metrics", "swd", "--out", str(tmp_path / "s.json")], capsys)
            assert f"cannot read {bad}: it is not an .npz file of plain arrays" in err, err
            assert "allow_pickle" not in err and "unsafely" not in err and "pickle.load" not in err

    import argparse

    pickled, other = tmp_path / "pickled.pth", tmp_path / "other.pth"
    torch.save(argparse.Namespace(weights=1), pickled)
    torch.save(torch.nn.Linear(2, 2).state_dict(), other)
    accuracy = ["score", str(data["samples"]), "--metrics", "accuracy", "--out", str(tmp_path / "s.json")]
    err = _score_error([*accuracy, "--weights", f"fashion-cnn={pickled}"], capsys)
    assert f"cannot read weights file {pickled}" in err and "argparse.Namespace" in err
    assert "weights_only" not in err and "can still be loaded" not in err
    err = _score_error([*accuracy, "--weights", f"fashion-cnn={other}"], capsys)
    assert f"fashion-cnn: weights file {other} does not fit the fashion-cnn network" in err
