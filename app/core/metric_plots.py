"""The metrics' figures (matplotlib, headless), drawn once for ``btd evaluate`` (PNG files) and
``btd validate`` (SVG inlined in its HTML report). Needs the ``report`` extra (matplotlib).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files and strings only
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path) -> None:
    """Write the figure (format from the suffix) and free it."""
    fig.savefig(path)
    _pyplot().close(fig)


def svg(fig: Any) -> str:
    """The figure as an inline ``<svg>`` element (text drawn as paths: no font needed), freed."""
    plt = _pyplot()
    buffer = io.StringIO()
    with plt.rc_context({"svg.fonttype": "path", "svg.hashsalt": "btd"}):  # hashsalt: the same ids each run
        fig.savefig(buffer, format="svg")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def confusion_figure(cm: np.ndarray, labels: Sequence[str]) -> Any:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=120)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > threshold else "black")
    fig.tight_layout()
    return fig


def roc_figure(curves: Mapping[str, tuple], per_class: Mapping[str, Mapping[str, Any]],
               operating_point: tuple[float, float] | None = None) -> Any:
    """One-vs-rest ROC curves (``metrics.roc_curves``), AUC in the legend; ``operating_point``
    (false positive rate, sensitivity) of the tumour decision, marked when given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=120)
    for label, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, label=f"{label} (AUC {per_class.get(label, {}).get('roc_auc', float('nan')):.3f})")
    if operating_point is not None:
        ax.plot(*operating_point, "k^", label="tumour decision at the model's threshold")
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("one-vs-rest ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def reliability_figure(bins: Sequence[Mapping[str, float]]) -> Any:
    """The reliability diagram of ``metrics.reliability_bins``: accuracy against mean confidence per
    bin (bar width: the bin, the diagonal: perfect calibration), images per bin below."""
    plt = _pyplot()
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5, 5), dpi=120, sharex=True,
                                     gridspec_kw={"height_ratios": [3, 1]})
    lo = [b["lo"] for b in bins]
    width = [b["hi"] - b["lo"] for b in bins]
    ax.bar(lo, [b["accuracy"] for b in bins], width=width, align="edge", edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="C1", label="bin mean")
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("reliability (top-label, calibrated)")
    ax.legend(loc="upper left", fontsize=8)
    counts.bar(lo, [b["images"] for b in bins], width=width, align="edge", edgecolor="k", color="0.6")
    counts.set_xlabel("confidence")
    counts.set_ylabel("images")
    counts.set_xlim(0, 1)
    fig.tight_layout()
    return fig
