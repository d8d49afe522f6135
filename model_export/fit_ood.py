"""``btd fit-ood``: fit the out-of-distribution score (``model_export.ood``) for a checkpoint and store
it in the checkpoint, so ``btd export`` puts it into the graph.

Features come from the checkpoint itself in float32, on the images exactly as the service sees
them (the contract's ``preprocess``, no augmentation): the fit on the training split, the threshold
on the validation split.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from app.core.contract import PreprocessSpec
from model_export import ood
from model_export.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from model_export.data import Sample, limit_per_class, load_samples, select
from model_export.datasets import SliceDataset
from model_export.options import FitOodConfig
from model_export.resnet import ResNet50

log = logging.getLogger(__name__)


def pooled_features(model: ResNet50, samples: Sequence[Sample], labels: Sequence[str], spec: PreprocessSpec,
                    batch_size: int = 16, desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """([N, 2048] global-average-pooled layer4 features, [N] targets), float32, no augmentation."""
    loader = DataLoader(SliceDataset(samples, labels, spec, None), batch_size=batch_size, shuffle=False)
    pooled, targets = [], []
    model.eval()
    with torch.inference_mode():
        for x, y in tqdm(loader, desc=desc, unit="batch", leave=False):
            _, features = model(x)
            pooled.append(features.mean(dim=(2, 3)).numpy())
            targets.append(y.numpy())
    return np.concatenate(pooled), np.concatenate(targets)


def features_key(model: ResNet50, spec: PreprocessSpec, train: Sequence[Sample], val: Sequence[Sample]) -> str:
    """What the pooled features depend on: the weights (the head's change with any training), the
    preprocessing and the images of each split."""
    digest = hashlib.sha256(model.fc.weight.detach().numpy().tobytes())
    digest.update(spec.to_json().encode())
    for split in (train, val):
        digest.update("\n".join(f"{s.path}\t{s.label}" for s in split).encode() + b"\0")
    return digest.hexdigest()


def main(config: FitOodConfig) -> ood.OodFit:
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    ckpt = read_checkpoint(config.checkpoint)
    model, labels, spec = model_from_checkpoint(ckpt)
    samples = load_samples(config.data, config.split_file, seed=config.seed, **config.columns)
    samples = limit_per_class(samples, config.limit_per_class, config.seed)
    train, val = select(samples, "train"), select(samples, "val")
    if not train or not val:
        raise ValueError("fit-ood needs images in the train and val splits")
    key = features_key(model, spec, train, val)
    if config.features is not None and config.features.exists():
        cached = np.load(config.features)
        if str(cached["key"]) != key:
            raise ValueError(f"{config.features} holds the features of another checkpoint or split: delete it to "
                             "extract them again")
        x_train, y_train, x_val = cached["x_train"], cached["y_train"], cached["x_val"]
        log.info("pooled features read from %s", config.features)
    else:
        x_train, y_train = pooled_features(model, train, labels, spec, config.batch_size, "train features")
        x_val, _ = pooled_features(model, val, labels, spec, config.batch_size, "val features")
        if config.features is not None:
            np.savez(config.features, key=key, x_train=x_train, y_train=y_train, x_val=x_val)
    fitted = ood.calibrate(ood.fit(x_train, y_train, config.components), x_val, config.quantile)
    ckpt["ood"] = fitted.to_state()
    save_checkpoint(config.checkpoint, ckpt)
    log.info("OOD score fitted on %d train images (%d components); threshold %.2f = the %.3f quantile of %d "
             "val images; stored in %s", len(x_train), fitted.projection.shape[1], fitted.threshold,
             config.quantile, len(x_val), config.checkpoint)
    return fitted
