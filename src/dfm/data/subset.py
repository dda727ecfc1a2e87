"""A data set restricted to some of its classes (``data.classes``), e.g. to pretrain on classes 0-4 and fine-tune
on 5-9. Labels keep their original values, so a class-conditional model keeps its class embedding."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dfm.data.base import DFMDataset


class ClassSubset(DFMDataset):
    """The items of ``base`` whose label is in ``classes``; needs a data set with in-memory ``labels``."""

    def __init__(self, base: DFMDataset, classes: Sequence[int]) -> None:
        labels = getattr(base, "labels", None)
        if not isinstance(labels, torch.Tensor):
            raise ValueError(
                f"data.classes needs a data set whose labels are in memory (Fashion-MNIST); "
                f"{type(base).__name__} has none: prepare a folder with only the wanted classes instead"
            )
        bad = sorted({int(c) for c in classes} - set(range(base.num_classes)))
        if bad or not classes:
            raise ValueError(f"data.classes={tuple(classes)}: the data set has classes 0..{base.num_classes - 1}")
        self.base = base
        self.classes = tuple(int(c) for c in classes)
        self.indices = torch.nonzero(torch.isin(labels, torch.tensor(self.classes))).flatten()
        self.labels = labels[self.indices]
        for name in ("num_classes", "class_names", "sample_shape", "vae_path", "latent_shift", "latent_scale",
                     "padding"):  # fmt: skip
            setattr(self, name, getattr(base, name))

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int, augment: bool = True, generator: torch.Generator | None = None):
        return self.base.load(int(self.indices[index]), augment=augment, generator=generator)

    def get_batch(self, indices: torch.Tensor, generator: torch.Generator | None = None, augment: bool = True):
        return self.base.get_batch(self.indices[torch.as_tensor(indices, dtype=torch.long)], generator, augment)
