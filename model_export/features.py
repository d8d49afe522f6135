"""The fast CPU path: layer3 feature maps computed once, stored as a float16 memmap on disk.

With the trunk frozen through layer3, every epoch would recompute the same stem..layer3
forward (about 60% of a ResNet-50's cost). Computing it once per image and augmented view,
then training layer4 + head on the cache, makes a CPU epoch minutes instead of hours
(``bench/bench_train.py`` measures both rates and the epoch time on your machine). A cache is keyed by
everything that determines its contents, and is written completely before it is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from model_export.datasets import SliceDataset
from model_export.resnet import ResNet50

log = logging.getLogger(__name__)

META_FILE = "meta.json"
ARRAY_FILE = "layer3.f16"


@dataclass
class FeatureCache:
    directory: Path
    array: np.ndarray  # float16 memmap [images * views, 1024, s/16, s/16]
    targets: np.ndarray  # int64 [images]
    views: int

    @property
    def images(self) -> int:
        return len(self.targets)


def trunk_fingerprint(model: ResNet50) -> str:
    """Hash of the stem..layer3 weights and BN statistics (what the cached features depend on)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3"):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def layer3_shape(model: ResNet50, size: int) -> tuple[int, int, int]:
    was_training = model.training
    with torch.inference_mode():
        out = model.eval().stem_to_layer3(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    model.train(was_training)
    return tuple(out.shape[1:])  # type: ignore[return-value]


def cache_key(dataset: SliceDataset, views: int, fingerprint: str) -> str:
    payload = {
        "paths": [str(s.path) for s in dataset.samples],
        # an image rewritten in place (same path, new pixels) must not reuse the old features
        "files": [(st.st_size, st.st_mtime_ns) for st in (os.stat(s.path) for s in dataset.samples)],
        "labels": [s.label for s in dataset.samples],
        "spec": dataset.spec.to_json(),
        "augment": dataset.augment.config.to_dict() if dataset.augment else None,
        "seed": dataset.seed,
        "views": views,
        "trunk": fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


class _Views(Dataset):
    """Every (image, view) pair of a SliceDataset, flattened; view v uses epoch v's augmentation."""

    def __init__(self, dataset: SliceDataset, views: int, indices: Sequence[int]) -> None:
        self.dataset, self.views, self.indices = dataset, views, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        flat = self.indices[i]
        index, view = divmod(flat, self.views)
        rng_view = view if self.dataset.augment is not None else 0
        return flat, torch.from_numpy(self.dataset.load(index, rng_view))


def build_feature_cache(
    model: ResNet50,
    dataset: SliceDataset,
    cache_root: Path,
    *,
    views: int = 1,
    batch_size: int = 32,
    workers: int = 0,
    device: torch.device | None = None,
    desc: str = "caching layer3",
    rank: int = 0,
    world_size: int = 1,
    barrier=None,
) -> FeatureCache:
    """Compute (or reuse) the layer3 features of ``dataset`` (``views`` augmented views per image
    when it augments, else one). Under DDP each rank fills its share of one shared file."""
    views = views if dataset.augment is not None else 1
    device = device or torch.device("cpu")
    directory = Path(cache_root) / cache_key(dataset, views, trunk_fingerprint(model))
    targets = np.array([dataset.index_of[s.label] for s in dataset.samples], dtype=np.int64)
    shape = (len(dataset) * views, *layer3_shape(model, dataset.spec.size))
    if not (directory / META_FILE).exists():
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(directory / ARRAY_FILE, mode="w+", dtype=np.float16, shape=shape).flush()
        if barrier:
            barrier()
        array = np.load(directory / ARRAY_FILE, mmap_mode="r+")
        mine = range(rank, shape[0], world_size)
        loader = DataLoader(_Views(dataset, views, mine), batch_size=batch_size, num_workers=workers)
        model.eval()
        with torch.inference_mode():
            for flat, batch in tqdm(loader, desc=desc, unit="batch", disable=rank != 0):
                out = model.stem_to_layer3(batch.to(device))
                array[flat.numpy()] = out.float().cpu().numpy().astype(np.float16)
        array.flush()
        del array
        if barrier:
            barrier()
        if rank == 0:
            meta = {"shape": list(shape), "views": views, "samples": len(dataset)}
            (directory / META_FILE).write_text(json.dumps(meta))
        if barrier:
            barrier()
    else:
        log.info("reusing feature cache %s", directory)
    array = np.load(directory / ARRAY_FILE, mmap_mode="r")
    if tuple(array.shape) != shape:
        raise ValueError(f"feature cache {directory} has shape {array.shape}, expected {shape}; delete it")
    return FeatureCache(directory, array, targets, views)
