"""The trainer's data: the data set of a run, which samples each step takes, and the stds measured at the start.

Reproducibility: all randomness of step k (which images, main stages, times, noise, label dropout) is drawn from
generators seeded by (seed, k) for the whole global batch, and each rank takes its slice. A run resumed from a
checkpoint therefore continues exactly as if it had never stopped, and 2 processes compute the same steps as 1
process at the same global batch. Data augmentation (flips, latent posterior draws) is the exception: each rank
draws it for its own slice from the step's data generator, so it matches across world sizes only in distribution.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

from dfm.config import DataConfig, MethodConfig
from dfm.data import build_dataset, is_image_folder
from dfm.data.subset import ClassSubset
from dfm.decomposition import estimate_level_std
from dfm.methods import Method

#: Floor of a measured per-stage std: a level that is (nearly) constant in the data, e.g. the fine level of
#: flat-coloured images, would otherwise get an infinite input scale from the preconditioning.
MIN_DATA_STD = 1e-3


def step_seed(seed: int, step: int, stream: int) -> int:
    """A seed for (run seed, step, stream) that never collides across steps of the same run."""
    return (seed * 1_000_003 + step) * 8 + stream


class EpochIndexer:
    """Global batch indices for any step: epochs are seeded permutations, so no state is needed to resume."""

    def __init__(self, size: int, batch: int, seed: int) -> None:
        self.size, self.batch, self.seed = size, batch, seed
        self._cache: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._cache:
            generator = torch.Generator().manual_seed(step_seed(self.seed, epoch, 7))
            self._cache = {epoch: torch.randperm(self.size, generator=generator)}
        return self._cache[epoch]

    def __call__(self, step: int) -> Tensor:
        out, start = [], step * self.batch
        need = self.batch
        while need:
            epoch, off = divmod(start, self.size)
            take = self._perm(epoch)[off : off + need]
            out.append(take)
            need -= len(take)
            start += len(take)
        return torch.cat(out)


#: the settings of ``data`` that only image folders take
FOLDER_SETTINGS = ("skip_bad", "upscale", "pad")


def open_dataset(data: DataConfig) -> Any:
    """The training set of ``data``; augmentation draws from a generator seeded per step, so resumes are exact."""
    extra: dict[str, Any] = {}
    if is_image_folder(data.dataset, data.frames):  # its errors name the settings that fix them
        extra = {"skip_bad": data.skip_bad, "upscale": data.upscale, "pad": data.pad,
                 "upscale_flag": "-o data.upscale=true", "pad_flag": "-o data.pad"}  # fmt: skip
    else:
        given = [f"data.{key}" for key in FOLDER_SETTINGS if getattr(data, key)]
        if given:
            many = len(given) > 1
            raise ValueError(f"{' and '.join(given)} appl{'y' if many else 'ies'} to image folders; {data.dataset!r} "
                             f"is not one: leave {'them' if many else 'it'} out")  # fmt: skip
    dataset = build_dataset(data.dataset, data.resolution, train=True, data_dir=data.data_dir,
                            random_flip=data.random_flip, frames=data.frames, num_clips=data.num_clips,
                            **extra)  # fmt: skip
    if data.classes is not None:
        dataset = ClassSubset(dataset, data.classes)
    if len(dataset) == 0:
        raise ValueError(f"dataset {data.dataset!r} is empty")
    return dataset


def measure_stds(method: Method, m: MethodConfig, dataset: Any, seed: int, main: bool = True) -> None:
    """Fill in what the method config leaves to the data, measured on up to 2,048 training samples (the same for a
    given seed): the level stds of ``standardize``, then the std of what each stage's network sees, for the
    preconditioning and the EDM loss weighting."""
    if not (m.standardize and m.level_std is None) and not (_needs_data_std(m) and m.data_std is None):
        return
    n = min(len(dataset), 2048)
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    x = dataset.get_batch(idx, augment=False)[0]
    if m.standardize and m.level_std is None:
        m.level_std = tuple(round(s, 6) for s in estimate_level_std(method.decomposition(m, standardized=False), x))
    if _needs_data_std(m) and m.data_std is None:
        stds = method.measure_data_std(m, method.decomposition(m), x)
        if min(stds) < MIN_DATA_STD and main:
            print(f"note: measured level stds {tuple(round(s, 6) for s in stds)}: a (nearly) constant level is "
                  f"preconditioned as if its std were {MIN_DATA_STD}", file=sys.stderr)  # fmt: skip
        m.data_std = tuple(round(max(s, MIN_DATA_STD), 6) for s in stds)


def _needs_data_std(m: MethodConfig) -> bool:
    return m.precondition or m.loss_weighting == "edm"
