"""Behaviour fingerprint for refactors: every method trains a tiny model for a few steps, resumes, and samples.

Records the logged losses, a hash of the final EMA weights and a hash of the sampled images (bytes of the float32
tensors) for each case. Run it before and after a change that must not change behaviour and compare:

    python benchmarks/fingerprint.py --out /tmp/before.json      # on the old commit
    python benchmarks/fingerprint.py --out /tmp/after.json       # on the new one
    python benchmarks/fingerprint.py --compare /tmp/before.json /tmp/after.json

Needs Fashion-MNIST (``dataset-fashion-mnist``); takes about a minute on one CPU thread. The numbers depend on
the machine (float reductions), so compare fingerprints taken on the same machine and torch version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from dfm.cli import main as cli
from dfm.generate import Generator

TINY = [
    "-o", "model.overrides.depth=1", "-o", "model.overrides.hidden_size=32", "-o", "model.overrides.num_heads=2",
    "-o", "train.num_sample_images=2", "-o", "optim.warmup_steps=2", "-o", "train.threads=1",
    "-o", "train.sample_every=0", "-o", "train.log_every=1", "-o", "train.ckpt_every=3",
]  # fmt: skip

CASES: dict[str, list[str]] = {
    "dfm": [],
    "dfm-noprec": ["-o", "method.precondition=false", "-o", "method.prediction=velocity"],
    "dfm-edm": ["-o", "method.loss_weighting=edm"],
    "dfm-haar-std": ["-o", "method.decomposition=haar", "-o", "method.standardize=true"],
    "dfm-3stage": [
        "-o",
        "method.stages=3",
        "-o",
        "sampler.steps=2,2,2",
        "-o",
        "sampler.thresholds=0.5,0.8",
        "-o",
        "method.stage_probs=0.4,0.3,0.3",
    ],  # fmt: skip
    "fm": ["--method", "fm"],
    "cascade": ["--method", "cascade"],
    "pyramidal": ["--method", "pyramidal"],
}


def _hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def run_case(name: str, extra: list[str], root: Path) -> dict:
    run = root / name
    common = ["--out", str(run), "--batch-size", "4", "--no-progress", *TINY, *extra]
    assert cli(["train", "--steps", "4", *common]) == 0
    assert cli(["train", "--steps", "6", "--resume", "auto", *common]) == 0  # a resumed run
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    gen = Generator.from_run(run)
    seeds = [0, 1, 2]
    out = gen.generate(seeds, [s % 10 for s in seeds])
    images, previews = out.images, out.previews
    weights = torch.cat([p.detach().flatten() for p in gen.network.state_dict().values() if p.is_floating_point()])
    return {
        "losses": losses,
        "ema_weights": _hash(weights),
        "images": _hash(images),
        "previews": [_hash(p) for p in previews],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where to write the fingerprint (JSON)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="cases to run (default: all)")
    args = parser.parse_args()
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        for k in diff:
            print(f"DIFFERENT {k}: {a.get(k)} != {b.get(k)}")
        print("identical" if not diff else f"{len(diff)} of {len(a)} cases differ")
        return 1 if diff else 0
    torch.set_num_threads(1)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or CASES:
            result[name] = run_case(name, CASES[name], Path(tmp))
            print(name, json.dumps(result[name]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
