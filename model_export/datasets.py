"""Torch datasets: image slices (decoded by the service's decoder, preprocessed by the contract's
``preprocess``) and cached layer3 feature maps."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from app.core.contract import PreprocessSpec, preprocess
from model_export.augment import Augment
from model_export.data import Sample, read_gray


class SliceDataset(Dataset):
    """(input tensor [3, S, S], class index). Without ``augment`` this is exactly the service's
    view of the image. Augmentation randomness depends on (seed, epoch, index, view) only, so runs
    are reproducible whatever the worker layout."""

    def __init__(
        self,
        samples: Sequence[Sample],
        labels: Sequence[str],
        spec: PreprocessSpec,
        augment: Augment | None = None,
        *,
        seed: int = 0,
    ) -> None:
        self.samples = list(samples)
        self.index_of = {label: i for i, label in enumerate(labels)}
        unknown = {s.label for s in self.samples} - set(self.index_of)
        if unknown:
            raise ValueError(f"labels {sorted(unknown)} are not among the model's {list(labels)}")
        self.spec = spec
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, view: int = 0) -> np.ndarray:
        gray = read_gray(self.samples[index].path)
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index, view])
            gray = self.augment(gray, rng)
        return preprocess(gray, self.spec)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.load(index)), self.index_of[self.samples[index].label]


class CachedFeatureDataset(Dataset):
    """(layer3 feature map as float32, class index) from a :class:`FeatureCache`; for each image,
    epoch ``e`` reads its augmented view ``e mod views``."""

    def __init__(self, cache: FeatureCache) -> None:  # noqa: F821 (avoid an import cycle)
        self.cache = cache
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.cache.images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        view = self.epoch % self.cache.views
        row = np.asarray(self.cache.array[index * self.cache.views + view], dtype=np.float32)
        return torch.from_numpy(row), int(self.cache.targets[index])
