"""The figures of ``btd validate`` (a dict, written as JSON) and their HTML report (Jinja2, figures
inlined as SVG: one self-contained file). The metrics are ``app.core.metrics``'s, computed as
``btd evaluate`` computes them for the model card, so the site's figures and the card's compare.

Only names reach the figures: labels, metric names, subgroup names (``app.core.acquisition``'s plane
and sequence, ``app.core.scanner``'s vendor and field strength), reasons; never a file name or a
DICOM value (patient data).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.core import metric_plots, metrics
from app.core.acquisition import PLANE_WORDS, SEQUENCE_WORDS
from app.core.decision import softmax
from app.core.result import Prediction
from app.core.scanner import UNKNOWN, Scanner

if TYPE_CHECKING:
    from app.engine.engine import Engine

SUBGROUPS = {"sequence": "sequence (DICOM headers)", "plane": "plane (DICOM headers)",
             "manufacturer": "manufacturer", "field_strength": "field strength"}
# The figures shown beside the model card's, in order: (name in metrics and btd.metrics, words).
SHOWN = ((metrics.ACCURACY, "accuracy"), (metrics.TUMOUR_SENSITIVITY, "tumour sensitivity"),
         (metrics.TUMOUR_SPECIFICITY, "tumour specificity"), (metrics.MACRO_F1, "macro F1"),
         (metrics.MACRO_AUC, "macro ROC AUC (one-vs-rest)"), (metrics.ECE_CALIBRATED, "calibration error (ECE)"))
PROPORTIONS = {metrics.ACCURACY, metrics.TUMOUR_SENSITIVITY, metrics.TUMOUR_SPECIFICITY}
# ``btd quantize`` files the float model's metrics under this key of a quantised file's btd.metrics.
QUANTISED_SOURCE_KEY = "fp32_source"
TEMPLATE = "validation_report.html.j2"


@dataclass
class Measured:
    """One labelled file after the engine: its logits and prediction, or the error's title."""

    label: str
    logits: np.ndarray | None = None
    prediction: Prediction | None = None
    groups: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    detail: str = ""  # the error with the file's path: for stderr only, never the report


def subgroups_of(prediction: Prediction, scanner: Scanner) -> dict[str, str]:
    """The image's subgroups: plane and sequence as the intended-use gate read them, the scanner's
    vendor and field strength; "unknown" where no header says (PNG, JPEG, a DICOM without them)."""
    acquisition = prediction.acquisition
    return {"sequence": (acquisition.sequence if acquisition else None) or UNKNOWN,
            "plane": (acquisition.plane if acquisition else None) or UNKNOWN,
            "manufacturer": scanner.manufacturer, "field_strength": scanner.field_strength}


@dataclass(frozen=True)
class Assessed:
    """The assessed images' arrays, for the figures that need them (ROC, reliability)."""

    logits: np.ndarray  # [n, C]
    y: np.ndarray  # [n] class indices
    labels: tuple[str, ...]
    temperature: float
    report: dict | None  # metrics.classification_report, None without images


def _interval(value: tuple[float, float] | None) -> list[float] | None:
    return None if value is None else [value[0], value[1]]


def measured_figures(rows: Sequence[Measured], labels: Sequence[str], temperature: float, threshold: float, *,
                     resamples: int, seed: int) -> tuple[dict[str, Any], Assessed]:
    """Counts, the not-assessed share and reasons, and the metrics of the assessed images with their
    95% intervals (Wilson for proportions, bootstrap for macro F1 and AUC)."""
    read = [r for r in rows if r.error is None]
    assessed = [r for r in read if r.prediction.assessed]
    not_assessed = len(read) - len(assessed)
    reasons = Counter(reason for r in read if not r.prediction.assessed for reason in r.prediction.ood_reasons)
    out: dict[str, Any] = {
        "labelled": len(rows),
        "true_labels": dict(Counter(r.label for r in rows)),
        "failed": {"images": len(rows) - len(read), "reasons": dict(Counter(r.error for r in rows if r.error))},
        "read": len(read),
        "not_assessed": {"images": not_assessed, "share": not_assessed / len(read) if read else None,
                         "ci": _interval(metrics.wilson_interval(not_assessed, len(read))),
                         "reasons": dict(reasons.most_common())},
        "assessed": len(assessed),
    }
    index = {label: i for i, label in enumerate(labels)}
    logits = np.array([r.logits for r in assessed], dtype=np.float64).reshape(len(assessed), len(labels))
    y = np.array([index[r.label] for r in assessed], dtype=np.int64)
    report = None
    if assessed:
        report = metrics.classification_report(logits, y, labels, temperature=temperature, threshold=threshold)
        boot = metrics.bootstrap_intervals(logits, y, resamples=resamples, seed=seed)
        counts = report.get("tumour_counts", {})
        successes = {metrics.ACCURACY: (int(np.trace(np.array(report["confusion_matrix"]))), len(y)),
                     metrics.TUMOUR_SENSITIVITY: (counts.get("true_positives", 0), counts.get("tumours", 0)),
                     metrics.TUMOUR_SPECIFICITY: (counts.get("true_negatives", 0), counts.get("no_tumours", 0))}
        figures = {}
        for name, _ in SHOWN:
            value = report.get(name)
            if name in PROPORTIONS:
                k, n = successes[name]
                figures[name] = {"value": value, "ci": _interval(metrics.wilson_interval(k, n)) if value is not None
                                 else None, "successes": k, "of": n, "interval": "Wilson"}
            else:
                figures[name] = {"value": value, "ci": _interval(boot.get(name)) if value is not None else None,
                                 "interval": f"bootstrap ({resamples} resamples)" if name in boot else None}
        out.update({"metrics": figures, "confusion_matrix": report["confusion_matrix"],
                    "per_class": report["per_class"], "threshold": threshold, "temperature": temperature})
    return out, Assessed(logits, y, tuple(labels), temperature, report)


def model_card_figures(stored: Mapping[str, Any]) -> dict[str, Any]:
    """The model's own test figures (its ``btd.metrics``); a quantised file's are its float source's."""
    source = "measured on this file"
    if QUANTISED_SOURCE_KEY in stored:
        stored, source = stored[QUANTISED_SOURCE_KEY], "measured on the float model this file was quantised from"
    return {"metrics": {name: stored.get(name) for name, _ in SHOWN}, "images": stored.get("images"),
            "split": stored.get("split"), "source": source}


def build_figures(rows: Sequence[Measured], engine: Engine, *, resamples: int = metrics.BOOTSTRAP_RESAMPLES,
                  seed: int = 0) -> tuple[dict[str, Any], Assessed]:
    """The whole report as a dict (the JSON file), and the assessed images' arrays for its plots."""
    meta = engine.metadata
    labels = list(meta.labels)
    overall, assessed = measured_figures(rows, labels, meta.temperature, engine.threshold, resamples=resamples,
                                         seed=seed)
    subgroups: dict[str, dict[str, Any]] = {}
    for key in SUBGROUPS:
        values = sorted({r.groups[key] for r in rows if r.error is None}, key=lambda v: (v == UNKNOWN, v))
        subgroups[key] = {value: measured_figures([r for r in rows if r.error is None and r.groups[key] == value],
                                                  labels, meta.temperature, engine.threshold,
                                                  resamples=resamples, seed=seed)[0] for value in values}
    identity = engine.model_identity
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": identity.name, "version": identity.version, "sha256": identity.sha256,
                  "variant": engine.variant, "labels": labels, "validated_for": {
                      "planes": list(meta.validated.planes), "sequences": list(meta.validated.sequences),
                      "specific_sequences": list(meta.validated.specific)}},
        "confidence": metrics.CONFIDENCE,
        "overall": overall,
        "subgroups": subgroups,
        "model_card": model_card_figures(meta.metrics),
    }, assessed


def plots(assessed: Assessed, figures: Mapping[str, Any]) -> dict[str, str]:
    """Inline SVG figures of the assessed images: ROC curves (with the tumour decision's operating
    point) and the reliability diagram of the calibrated probabilities."""
    if assessed.report is None:
        return {}
    found = figures["overall"]["metrics"]
    sensitivity = found[metrics.TUMOUR_SENSITIVITY]["value"]
    specificity = found[metrics.TUMOUR_SPECIFICITY]["value"]
    point = (1 - specificity, sensitivity) if sensitivity is not None and specificity is not None else None
    curves = metrics.roc_curves(assessed.logits, assessed.y, assessed.labels)
    bins = metrics.reliability_bins(softmax(assessed.logits, assessed.temperature), assessed.y)
    return {"roc": metric_plots.svg(metric_plots.roc_figure(curves, assessed.report["per_class"], point)),
            "reliability": metric_plots.svg(metric_plots.reliability_figure(bins))}


def render_html(figures: Mapping[str, Any], svgs: Mapping[str, str]) -> str:
    import jinja2

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                                     autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                                     lstrip_blocks=True)
    environment.filters["pct"] = lambda v, digits=1: "n/a" if v is None else f"{100 * v:.{digits}f}%"
    environment.filters["num"] = lambda v, digits=3: "n/a" if v is None else f"{v:.{digits}f}"
    words = {"sequence": SEQUENCE_WORDS, "plane": PLANE_WORDS}
    return environment.get_template(TEMPLATE).render(
        r=figures, svgs=svgs, shown=SHOWN, proportions=PROPORTIONS,
        subgroup_names=SUBGROUPS, words=words, unknown=UNKNOWN,
        ece_bins=metrics.ECE_BINS)


def write_report(figures: Mapping[str, Any], assessed: Assessed, html_path: Path, json_path: Path) -> None:
    html_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    html_path.write_text(render_html(figures, plots(assessed, figures)), encoding="utf-8")
