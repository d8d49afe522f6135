"""Checkpoints: a dict holding the weights, the training arguments, labels and preprocessing spec,
so evaluation and export need nothing but the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from app.core.contract import PreprocessSpec
from model_export.resnet import ResNet50

FORMAT = "btd-resnet50/1"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": FORMAT, **payload}, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a truncated checkpoint


def read_checkpoint(path: Path) -> dict[str, Any]:
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a btd training checkpoint")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[ResNet50, tuple[str, ...], PreprocessSpec]:
    """The trained model in eval mode, its labels (logit order) and preprocessing spec."""
    labels = tuple(ckpt["labels"])
    args = ckpt.get("args", {})
    model = ResNet50(len(labels), dropout=float(args.get("dropout", 0.0)), stride_in_1x1=True)
    model.load_state_dict(ckpt["model"])
    return model.eval(), labels, PreprocessSpec.from_json(ckpt["preprocess"])
