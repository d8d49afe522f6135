"""``btd average``: one model from several fine-tuned ones by averaging their weights ("model soup",
Wortsman et al., 2022), scored on the validation split beside each ingredient.

Runs that share a starting point (stages, or runs ``--init-from`` one checkpoint) usually stay in
one basin of the loss, where the average of their weights can beat each of them: an ensemble's gain
at a single network's serving cost. Runs of other seeds start from other random heads and need not
share a basin (for 1.2.0 their average fell to 0.944 validation macro F1 from 0.978 and 0.973).
Whether an average is better is a question for validation, so the command measures the average,
every ingredient and their logit ensemble on the val split the same way (float32, the contract's
``preprocess``, no augmentation), fits the average's temperature there and stores it with those
figures in the new checkpoint. The out-of-distribution fit is not carried over:
the features moved, so run ``btd fit-ood`` on the result (``models/release.py --checkpoint`` does).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_export import scores
from model_export.checkpoint import read_checkpoint, save_checkpoint
from model_export.data import limit_per_class, load_samples, select
from model_export.evaluate import CheckpointModel, targets_for
from model_export.options import AverageConfig

log = logging.getLogger(__name__)

# What must agree between ingredients: a model that mixed labels, preprocessing or training data
# would carry a model card that describes none of its ingredients.
MUST_MATCH = ("labels", "preprocess", "training_data")
# Per-run state that does not describe the averaged weights.
DROPPED = ("model", "ood", "temperature", "optimizer", "scheduler", "scaler", "epoch", "best_macro_f1",
           "stale_epochs", "history")


def average_state(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of float tensors (weights, BatchNorm statistics); integer tensors (the
    BatchNorm step counters) are taken from the first state. Every state must have the same keys and
    shapes."""
    first = states[0]
    for i, state in enumerate(states[1:], start=2):
        if state.keys() != first.keys():
            raise ValueError(f"checkpoint {i} has other parameters than the first: "
                             f"{sorted(state.keys() ^ first.keys())[:5]}")
        for name, tensor in state.items():
            if tensor.shape != first[name].shape:
                raise ValueError(f"checkpoint {i}: {name} has shape {tuple(tensor.shape)}, "
                                 f"the first has {tuple(first[name].shape)}")
    return {name: (torch.stack([s[name].float() for s in states]).mean(0).to(tensor.dtype)
                   if tensor.is_floating_point() else tensor.clone())
            for name, tensor in first.items()}


def averaged_checkpoint(ckpts: Sequence[dict[str, Any]], sources: Sequence[str]) -> dict[str, Any]:
    if len(ckpts) < 2:
        raise ValueError("averaging needs at least two checkpoints")
    for key in MUST_MATCH:
        for source, ckpt in zip(sources[1:], ckpts[1:]):
            if ckpt.get(key) != ckpts[0].get(key):
                raise ValueError(f"{source} differs from {sources[0]} in {key!r}: only runs on the same "
                                 "data, labels and preprocessing can be averaged")
    merged = {k: v for k, v in ckpts[0].items() if k not in DROPPED and k != "format"}
    merged["model"] = average_state([c["model"] for c in ckpts])
    merged["averaged_from"] = list(sources)
    return merged


def score(logits: np.ndarray, y: np.ndarray, classes: int) -> dict[str, float]:
    predicted = logits.argmax(1)
    return {"accuracy": float((predicted == y).mean()), "macro_f1": scores.macro_f1(y, predicted, classes)}


def main(config: AverageConfig) -> dict[str, Any]:
    """Write the averaged checkpoint; returns the validation figures of it and of each ingredient."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    sources = [str(p) for p in config.checkpoints]
    ckpts = [read_checkpoint(p) for p in config.checkpoints]
    merged = averaged_checkpoint(ckpts, sources)
    samples = limit_per_class(load_samples(Path(config.data), config.split_file, seed=config.seed,
                                           **config.columns), config.limit_per_class, config.seed)
    chosen = select(samples, config.split)
    if not chosen:
        raise ValueError(f"no images in split {config.split!r}")
    out = Path(config.out)
    y = targets_for(chosen, merged["labels"])
    classes = len(merged["labels"])
    ingredients, member_logits = {}, []
    for source, ckpt in zip(sources, ckpts):
        logits = CheckpointModel(ckpt, config.threads).logits(chosen, config.batch_size, f"scoring {source}")
        member_logits.append(logits)
        ingredients[source] = score(logits, y, classes)
        log.info("%s: %s accuracy %.4f, macro-F1 %.4f", source, config.split, ingredients[source]["accuracy"],
                 ingredients[source]["macro_f1"])
    logits = CheckpointModel(merged, config.threads).logits(chosen, config.batch_size, "scoring the average")
    averaged = score(logits, y, classes)
    merged["temperature"] = scores.fit_temperature(logits, y)
    # The ensemble of the same ingredients (mean logits: their cost times the number of networks),
    # for comparison: what averaging the weights gives up, or gains, against it.
    merged["averaged_scores"] = {"split": config.split, "images": len(chosen), "average": averaged,
                                 "ingredients": ingredients,
                                 "logit_ensemble": score(np.mean(member_logits, axis=0), y, classes)}
    save_checkpoint(out, merged)
    best = max(ingredients.values(), key=lambda s: s["macro_f1"])
    log.info("average of %d: %s accuracy %.4f, macro-F1 %.4f (best ingredient %.4f, change %+.4f; logit "
             "ensemble %.4f); temperature %.3f; saved %s", len(sources), config.split, averaged["accuracy"],
             averaged["macro_f1"], best["macro_f1"], averaged["macro_f1"] - best["macro_f1"],
             merged["averaged_scores"]["logit_ensemble"]["macro_f1"], merged["temperature"], out)
    return merged["averaged_scores"]
