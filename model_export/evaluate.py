"""``btd evaluate``: metrics of a checkpoint or an exported ONNX model on one split.

Both kinds of model see the same inputs: the service's decoder and the contract's ``preprocess``
with the spec stored in the model, so the ONNX numbers describe the file that ships. Writes
``report.json``, ``report.md``, ``confusion_matrix.png``, ``roc_curves.png`` and
``predictions.csv`` to the output folder.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from app.core import metric_plots
from app.core.contract import INPUT_NAME, LOGITS_NAME, PreprocessSpec, preprocess
from model_export import scores
from model_export.data import Sample, limit_per_class, load_samples, read_gray, select
from model_export.options import EvalConfig

log = logging.getLogger(__name__)


def preprocessed_batches(samples: Sequence[Sample], spec: PreprocessSpec, batch_size: int,
                         desc: str = "evaluating") -> Iterator[np.ndarray]:
    """Float32 [B, 3, S, S] batches, exactly what the service feeds the model."""
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch", leave=False):
        chunk = samples[start : start + batch_size]
        yield np.stack([preprocess(read_gray(s.path), spec) for s in chunk])


class Model:
    """A model to score: labels, preprocessing spec, stored temperature/threshold, and logits."""

    labels: tuple[str, ...]
    spec: PreprocessSpec
    temperature: float
    threshold: float

    def logits(self, samples: Sequence[Sample], batch_size: int, desc: str) -> np.ndarray:
        return np.concatenate([self.run(batch) for batch in preprocessed_batches(samples, self.spec, batch_size,
                                                                                desc)])

    def run(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class OnnxModel(Model):
    """The file as the service loads it (``ModelFile``), run by ONNX Runtime on ``providers``."""

    def __init__(self, path: Path, threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        from app.core.model import ModelFile
        from app.engine.runner import RuntimeOptions, open_session

        model = ModelFile.load(path)
        meta = model.metadata
        self.labels, self.spec = meta.labels, meta.preprocess
        self.temperature, self.threshold = meta.temperature, meta.tumour_threshold
        self.session = open_session(model.path, RuntimeOptions(providers=tuple(providers), intra_op_threads=threads),
                                    channels=meta.preprocess.channels, size=meta.preprocess.size)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([LOGITS_NAME], {INPUT_NAME: batch})[0]


class CheckpointModel(Model):
    """A training checkpoint (a path, or one already read) run by PyTorch in float32."""

    def __init__(self, checkpoint: Path | dict[str, Any], threads: int = 0) -> None:
        import torch

        from model_export.checkpoint import model_from_checkpoint, read_checkpoint

        if threads > 0:
            torch.set_num_threads(threads)
        ckpt = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
        self.model, self.labels, self.spec = model_from_checkpoint(ckpt)
        self.temperature = float(ckpt.get("temperature") or 1.0)
        self.threshold = 0.5
        self._torch = torch

    def run(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.model(self._torch.from_numpy(batch))[0].numpy()


def load_model(path: Path, threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Model:
    if Path(path).suffix.lower() == ".onnx":
        return OnnxModel(path, threads, providers)
    return CheckpointModel(path, threads)


def targets_for(samples: Sequence[Sample], labels: Sequence[str]) -> np.ndarray:
    """Class indices in the model's label order; the data's labels may be a subset of the model's."""
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({s.label for s in samples} - set(index))
    if unknown:
        raise ValueError(f"the data has labels {unknown} that the model does not know ({list(labels)})")
    return np.array([index[s.label] for s in samples], dtype=np.int64)


def evaluate_model(model: Model, samples: Sequence[Sample], calibration: Sequence[Sample], *,
                   batch_size: int, threshold: float | None) -> tuple[dict, np.ndarray]:
    """(report, logits). The temperature is fit on ``calibration`` when given, else the model's own."""
    y = targets_for(samples, model.labels)
    logits = model.logits(samples, batch_size, "evaluating")
    if calibration:
        cal_logits = model.logits(calibration, batch_size, "calibrating")
        temperature = scores.fit_temperature(cal_logits, targets_for(calibration, model.labels))
        source = f"fit on {len(calibration)} calibration images"
    else:
        temperature, source = model.temperature, "stored in the model"
    report = scores.classification_report(logits, y, model.labels, temperature=temperature,
                                           threshold=model.threshold if threshold is None else threshold)
    report["temperature_source"] = source
    return report, logits


def main(config: EvalConfig) -> dict:
    samples = load_samples(Path(config.data), config.split_file, seed=config.seed, **config.columns)
    samples = limit_per_class(samples, config.limit_per_class, config.seed)
    chosen = select(samples, config.split)
    if not chosen:
        raise ValueError(f"no images in split {config.split!r}")
    calibration = select(samples, config.calibration_split) if config.calibration_split else []
    if config.calibration_split and not calibration:
        log.warning("no %r images to fit the temperature on: using the model's own", config.calibration_split)
    model = load_model(config.model, config.threads, config.providers)
    log.info("evaluating %s on %d %s images (%s)", config.model, len(chosen), config.split,
             ", ".join(sorted({s.label for s in chosen})))
    report, logits = evaluate_model(model, chosen, calibration, batch_size=config.batch_size,
                                    threshold=config.threshold)
    report.update({"model": str(config.model), "split": config.split, "data": str(config.data),
                   "split_file": str(config.split_file) if config.split_file else None})
    if config.baseline is not None:
        base = load_model(config.baseline, config.threads, config.providers)
        if tuple(base.labels) != tuple(model.labels):
            raise ValueError("the baseline model has different labels")
        base_logits = base.logits(chosen, config.batch_size, "baseline")
        y = targets_for(chosen, model.labels)
        base_acc = float((base_logits.argmax(1) == y).mean())
        report["baseline"] = {
            "model": str(config.baseline),
            "accuracy": base_acc,
            "macro_f1": scores.macro_f1(y, base_logits.argmax(1), len(model.labels)),
            "accuracy_change": report["accuracy"] - base_acc,
            "prediction_agreement": float((base_logits.argmax(1) == logits.argmax(1)).mean()),
        }
    write_report(report, logits, chosen, model.labels, Path(config.out))
    return report


def write_report(report: dict, logits: np.ndarray, samples: Sequence[Sample], labels: Sequence[str],
                 out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_report(report))
    y = targets_for(samples, labels)
    probs = scores.softmax(logits, report["temperature"])
    with (out / "predictions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "predicted", *[f"p_{label}" for label in labels]])
        for s, row in zip(samples, probs):
            writer.writerow([str(s.path), s.label, labels[int(row.argmax())], *[f"{p:.5f}" for p in row]])
    plot_confusion_matrix(np.array(report["confusion_matrix"]), labels, out / "confusion_matrix.png")
    plot_roc_curves(scores.roc_curves(logits, y, labels), report.get("per_class", {}), out / "roc_curves.png")


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_report(r: dict) -> str:
    lines = [
        f"# Evaluation: `{r['model']}`",
        "",
        f"Split **{r['split']}**, {r['images']} images; classes present: {', '.join(r['present_labels'])}.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key in (scores.ACCURACY, scores.MACRO_F1, scores.WEIGHTED_F1, scores.MACRO_AUC,
                scores.TUMOUR_SENSITIVITY, scores.TUMOUR_SPECIFICITY, "threshold", scores.ECE,
                scores.ECE_CALIBRATED, "temperature"):
        if key in r:
            lines.append(f"| {key} | {_fmt(r[key])} |")
    lines += ["", f"Temperature {r['temperature_source']}. ECE: {scores.ECE_BINS} equal-width bins, top label.",
              "", "| class | precision | recall (sensitivity) | specificity | F1 | ROC-AUC | support |",
              "|---|---|---|---|---|---|---|"]
    for label, row in r["per_class"].items():
        lines.append(f"| {label} | {_fmt(row['precision'])} | {_fmt(row['recall'])} | {_fmt(row['specificity'])} "
                     f"| {_fmt(row['f1'])} | {_fmt(row.get('roc_auc'))} | {row['support']} |")
    labels = r["labels"]
    lines += ["", "Confusion matrix (rows: true, columns: predicted)", "",
              "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for label, row in zip(labels, r["confusion_matrix"]):
        lines.append(f"| **{label}** | " + " | ".join(str(v) for v in row) + " |")
    if "baseline" in r:
        b = r["baseline"]
        lines += ["", (f"Against baseline `{b['model']}`: accuracy {_fmt(b['accuracy'])} -> {_fmt(r['accuracy'])} "
                       f"(change {b['accuracy_change']:+.4f}), agreement {_fmt(b['prediction_agreement'])}.")]
    lines += ["", "![confusion matrix](confusion_matrix.png) ![ROC curves](roc_curves.png)", ""]
    return "\n".join(lines)


def plot_confusion_matrix(cm: np.ndarray, labels: Sequence[str], path: Path) -> None:
    metric_plots.save(metric_plots.confusion_figure(cm, labels), path)


def plot_roc_curves(curves: dict, per_class: dict, path: Path) -> None:
    metric_plots.save(metric_plots.roc_figure(curves, per_class), path)
