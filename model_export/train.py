"""Fine-tune ResNet-50 on an ImageFolder tree, in the shape of torchvision's reference script:
``load_data``, ``train_one_epoch``, ``predict``, ``main``.

Paths: on CPU with the trunk frozen through layer3 (``--freeze layer4`` or ``head``) the layer3
features are cached once and layer4 + head train on the cache; otherwise images run through the
network every epoch (on CUDA with mixed precision and channels_last). Under ``torchrun`` the
model is wrapped in DistributedDataParallel (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from app.core.contract import PreprocessSpec
from model_export import scores
from model_export.augment import Augment, AugmentConfig
from model_export.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from model_export.data import (
    Sample,
    labels_of,
    limit_per_class,
    load_samples,
    select,
    summarise,
    write_split_file,
)
from model_export.datasets import CachedFeatureDataset, SliceDataset
from model_export.features import build_feature_cache
from model_export.options import TrainConfig, record
from model_export.resnet import ResNet50, apply_freeze, load_backbone, set_train_mode

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def main_value(self, value: float) -> float:
        """Rank 0's value on every rank. Validation runs the unwrapped model, whose BatchNorm running
        statistics differ between ranks after the last step, so ranks can score val differently; the
        early-stopping decision must still be the same everywhere or the ranks deadlock."""
        if self.world_size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return float(box[0])


def setup_runtime(config: TrainConfig) -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    amp_on = config.amp == "on" or (config.amp == "auto" and device.type == "cuda")
    amp_dtype = None
    if amp_on:
        amp_dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    cl_on = config.channels_last == "on" or (config.channels_last == "auto" and device.type == "cuda")
    return Runtime(device, rank, world_size, amp_dtype, cl_on)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def seed_epoch(seed: int, epoch: int) -> None:
    """Reseed torch's global generator (dropout) from (seed, epoch) alone, so an epoch draws the
    same masks whether the feature cache was built in this run (its loaders consume the generator)
    or reused, and whether the run was resumed."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


def load_data(config: TrainConfig) -> tuple[list[Sample], tuple[str, ...]]:
    samples = load_samples(
        Path(config.data),
        Path(config.split_file) if config.split_file else None,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
        **config.columns,
    )
    samples = limit_per_class(samples, config.limit_per_class, config.seed)
    labels = labels_of(samples)
    for split in ("train", "val"):
        if not select(samples, split):
            raise ValueError(f"no images in the {split!r} split")
    return samples, labels


def uses_feature_cache(config: TrainConfig, runtime: Runtime) -> bool:
    frozen_through_layer3 = config.freeze in ("layer4", "head")
    if config.feature_cache == "on":
        if not frozen_through_layer3:
            raise ValueError("--feature-cache on needs --freeze layer4 or head (a frozen trunk through layer3)")
        return True
    return config.feature_cache == "auto" and frozen_through_layer3 and runtime.device.type == "cpu"


class FromLayer3(nn.Module):
    """layer4 + head, the part trained on cached layer3 features."""

    def __init__(self, model: ResNet50) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_from_layer3(x)


def make_loader(dataset: Dataset, config: TrainConfig, runtime: Runtime, *, train: bool) -> DataLoader:
    sampler = DistributedSampler(
        dataset, num_replicas=runtime.world_size if train else 1, rank=runtime.rank if train else 0,
        shuffle=train, seed=config.seed, drop_last=False,
    )
    return DataLoader(
        dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers,
        pin_memory=runtime.device.type == "cuda", persistent_workers=False,
    )


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               nesterov=True)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    total = max(1, config.epochs * steps_per_epoch)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=config.lr * 0.01)
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total)
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    raise ValueError(f"unknown schedule {config.schedule!r}")


def _autocast(runtime: Runtime):
    if runtime.amp_dtype is None:
        return torch.autocast(runtime.device.type, enabled=False)
    return torch.autocast(runtime.device.type, dtype=runtime.amp_dtype)


def _to_device(x: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    x = x.to(runtime.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if runtime.channels_last else x


def train_one_epoch(
    net: nn.Module,
    set_mode: Callable[[], None],
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule,
    scaler: torch.amp.GradScaler,
    config: TrainConfig,
    runtime: Runtime,
    epoch: int,
) -> float:
    set_mode()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", disable=not runtime.is_main)
    for inputs, targets in bar:
        inputs, targets = _to_device(inputs, runtime), targets.to(runtime.device)
        with _autocast(runtime):
            logits, _ = net(inputs)
            loss = criterion(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        total += loss.item() * len(targets)
        count += len(targets)
        bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
    return total / max(count, 1)


def predict(net: nn.Module, loader: DataLoader, runtime: Runtime, desc: str = "predicting") -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C] float32, targets [N]) in the loader's order."""
    net.eval()
    outputs, targets = [], []
    with torch.inference_mode():
        for inputs, y in tqdm(loader, desc=desc, unit="batch", disable=not runtime.is_main, leave=False):
            with _autocast(runtime):
                logits, _ = net(_to_device(inputs, runtime))
            outputs.append(logits.float().cpu().numpy())
            targets.append(y.numpy())
    return np.concatenate(outputs), np.concatenate(targets)


def build_model(labels: tuple[str, ...], config: TrainConfig) -> ResNet50:
    model = ResNet50(len(labels), dropout=config.dropout, stride_in_1x1=True)
    if config.pretrained:
        from model_export.pretrained import imagenet_state_dict

        load_backbone(model, imagenet_state_dict())
    apply_freeze(model, config.freeze)
    return model


def main(config: TrainConfig) -> Path:
    """Train; returns the path of the best checkpoint (``<out>/best.pt``)."""
    runtime = setup_runtime(config)
    seed_everything(config.seed, config.deterministic)
    out = Path(config.out)
    samples, labels = load_data(config)
    spec = PreprocessSpec(size=config.image_size)
    train_samples, val_samples = select(samples, "train"), select(samples, "val")
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        log.info("classes %s; %d train / %d val images; device %s x%d", list(labels), len(train_samples),
                 len(val_samples), runtime.device, runtime.world_size)
        if config.split_file is None:  # evaluate must see this split, not one remade with other fractions
            made = write_split_file(samples, out / "splits.csv", Path(config.data))
            log.info("split made by near-duplicate grouping written to %s (pass it to evaluate as --split-file)",
                     made)

    # --resume continues a run (weights, optimizer, schedule, epochs); --init-from takes only the
    # weights, under this run's freeze, and starts the rest afresh.
    source = config.resume or config.init_from
    start = read_checkpoint(Path(source)) if source else None
    if start is not None and tuple(start["labels"]) != labels:
        raise ValueError(f"{source} was trained on {start['labels']}, the data has {list(labels)}")
    model = build_model(labels, config) if start is None else _resumed_model(start, config)
    resume = start if config.resume else None
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)

    augment = training_augment(config)
    train_set = SliceDataset(train_samples, labels, spec, augment, seed=config.seed)
    val_set = SliceDataset(val_samples, labels, spec, None, seed=config.seed)
    net: nn.Module = model
    if uses_feature_cache(config, runtime):
        from model_export.pretrained import cache_dir

        cache_root = Path(config.cache_dir) if config.cache_dir else cache_dir() / "features"
        common = dict(batch_size=config.batch_size, workers=config.workers, device=runtime.device,
                      rank=runtime.rank, world_size=runtime.world_size, barrier=runtime.barrier)
        train_cache = build_feature_cache(model, train_set, cache_root, views=config.views,
                                          desc="caching train layer3", **common)
        val_cache = build_feature_cache(model, val_set, cache_root, desc="caching val layer3", **common)
        train_set, val_set = CachedFeatureDataset(train_cache), CachedFeatureDataset(val_cache)  # type: ignore[assignment]
        net = FromLayer3(model)
        log.info("training layer4 + head on cached layer3 features (%d views)", train_cache.views)
    plain_net = net  # for validation: no DDP collectives, every rank scores the whole val split
    if runtime.world_size > 1:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(net, device_ids=device_ids)

    train_loader = make_loader(train_set, config, runtime, train=True)
    val_loader = make_loader(val_set, config, runtime, train=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    schedule = make_schedule(optimizer, config, len(train_loader))
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    start_epoch, best_f1, history, stale = 0, -1.0, [], 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["scheduler"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        start_epoch, best_f1 = resume["epoch"] + 1, resume["best_macro_f1"]
        history, stale = resume.get("history", []), resume.get("stale_epochs", 0)
        log.info("resumed from %s at epoch %d (best val macro-F1 %.4f)", config.resume, start_epoch + 1, best_f1)

    base = {"args": record(config), "labels": list(labels), "preprocess": spec.to_json(),
            "training_data": summarise(samples)}
    for epoch in range(start_epoch, config.epochs):
        seed_epoch(config.seed, epoch)
        train_set.set_epoch(epoch)  # type: ignore[union-attr]
        train_loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        started = time.perf_counter()
        loss = train_one_epoch(net, lambda: set_train_mode(model, config.freeze), train_loader, criterion,
                               optimizer, schedule, scaler, config, runtime, epoch)
        logits, targets = predict(plain_net, val_loader, runtime, desc="validating")
        val_f1 = runtime.main_value(scores.macro_f1(targets, logits.argmax(1), len(labels)))
        val_acc = runtime.main_value(float((logits.argmax(1) == targets).mean()))
        seconds = time.perf_counter() - started
        history.append({"epoch": epoch + 1, "train_loss": loss, "val_macro_f1": val_f1, "val_accuracy": val_acc,
                        "seconds": seconds})
        improved = val_f1 > best_f1
        best_f1, stale = (val_f1, 0) if improved else (best_f1, stale + 1)
        if runtime.is_main:
            log.info("epoch %d: loss %.4f, val macro-F1 %.4f, val accuracy %.4f (%.0f s)%s", epoch + 1, loss,
                     val_f1, val_acc, seconds, " *best*" if improved else "")
            state = {**base, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": schedule.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                     "best_macro_f1": best_f1, "stale_epochs": stale, "history": history}
            save_checkpoint(out / "last.pt", state)
            if improved:
                save_checkpoint(out / "best.pt", {**base, "model": model.state_dict(), "epoch": epoch,
                                                   "best_macro_f1": best_f1, "history": history})
        if stale >= config.patience:
            if runtime.is_main:
                log.info("early stop: no val macro-F1 gain for %d epochs", stale)
            break

    runtime.barrier()
    best = out / "best.pt"
    if runtime.is_main:
        _calibrate(best, plain_net, model, val_loader, runtime)
        (out / "history.json").write_text(json.dumps(history, indent=2))
    runtime.barrier()
    if runtime.world_size > 1:
        torch.distributed.destroy_process_group()
    return best


def training_augment(config: TrainConfig) -> Augment | None:
    """The augmentation ``config`` asks for: none, the default, or the default with another share of
    sequence (tissue contrast) remapping."""
    if not config.augment:
        return None
    if config.sequence_augment is None:
        return Augment()
    if not 0.0 <= config.sequence_augment <= 1.0:
        raise ValueError(f"--sequence-augment is a share of images, 0 to 1, not {config.sequence_augment}")
    return Augment(AugmentConfig(sequence_probability=config.sequence_augment))


def _resumed_model(ckpt: dict[str, Any], config: TrainConfig) -> ResNet50:
    model, _, _ = model_from_checkpoint(ckpt)
    apply_freeze(model, config.freeze)
    return model


def _calibrate(best: Path, net: nn.Module, model: ResNet50, val_loader: DataLoader, runtime: Runtime) -> None:
    """Fit the temperature on val for the best weights and store it in best.pt."""
    ckpt = read_checkpoint(best)
    model.load_state_dict(ckpt["model"])
    logits, targets = predict(net, val_loader, runtime, desc="calibrating")
    temperature = scores.fit_temperature(logits, targets)
    ece_before = scores.expected_calibration_error(scores.softmax(logits), targets)
    ece_after = scores.expected_calibration_error(scores.softmax(logits, temperature), targets)
    ckpt["temperature"] = temperature
    save_checkpoint(best, ckpt)
    log.info("best val macro-F1 %.4f at epoch %d; temperature %.3f (val ECE %.4f -> %.4f); saved %s",
             ckpt["best_macro_f1"], ckpt["epoch"] + 1, temperature, ece_before, ece_after, best)
