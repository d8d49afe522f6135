"""The validation baseline stored in a model (``META_BASELINE``): how the drift signals were
distributed on the model's validation split, as the service would have recorded them.

One place for what a drift signal is: :func:`signal_values` turns one answer (a prediction record's
label, assessed flag, tumour probability, OOD score and intensity percentiles) into the value of
each signal. The exporter (``btd baseline``) builds the baseline from those values over the
validation images; the service (``app.engine.monitoring.drift``) bins its recent records' values
with the same bins and compares.

Signals (``SIGNALS``):
* ``class_mix``: the predicted label, or ``not_assessed`` for an answer that made no finding;
* ``tumour_probability``: 1 - p(no tumour), calibrated;
* ``ood_score``: the model's out-of-distribution score;
* ``intensity``: the decoded slice's 5th intensity percentile over its 99th (p05 / p99): how dark
  its background and darkest tissue are against its brightest. A ratio, so the same slice as an
  8-bit JPEG or a 12-bit DICOM gives the same value. Chosen on release 1.2.0's validation split:
  ratios of the median (p50 / p99, p50 / p95) move with how a source frames the head (PSI 0.12 to
  1.0 between its sources, so traffic from one source alone would alert), p05 / p99 does not (PSI
  0.01 to 0.02 for brain-mri-4class and figshare-cheng alone) and moves with a new acquisition
  (LGG T1 post-contrast slices: PSI 0.9). The raw percentiles' medians are kept for people
  (``Baseline.intensity``).

Continuous signals are binned at the validation values' deciles (ties merged), so each bin holds
about a tenth of the validation answers; the outer bins are open. Numpy only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from app.core.decision import NOT_ASSESSED

SIGNALS: tuple[str, ...] = ("class_mix", "tumour_probability", "ood_score", "intensity")
CONTINUOUS: tuple[str, ...] = ("tumour_probability", "ood_score", "intensity")
BASELINE_VERSION = 1
BINS = 10  # continuous signals: decile bins of the validation values
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)  # kept for people (model card, /v1/monitoring)
SignalValue = str | float | None
# The intensity percentiles kept of each decoded slice (a prediction record's columns, the baseline's
# intensity facts), read from at most this many of its pixels (an even grid): ~0.2 ms for any size.
INTENSITY_PERCENTILES = (1, 5, 50, 95, 99)
PERCENTILE_SAMPLES = 16384


def intensity_percentiles(pixels: np.ndarray) -> tuple[float, ...]:
    """The slice's intensities at ``INTENSITY_PERCENTILES``, read on an even grid of at most
    ``PERCENTILE_SAMPLES`` pixels."""
    height, width = pixels.shape
    step = max(1, math.ceil(math.sqrt(height * width / PERCENTILE_SAMPLES)))
    values = np.percentile(pixels[::step, ::step], INTENSITY_PERCENTILES)
    return tuple(round(float(v), 4) for v in values)


def intensity_ratio(percentiles: Sequence[float | None] | None) -> float | None:
    """p05 / p99 of a slice's ``INTENSITY_PERCENTILES``; None when unknown or when p99 is not above
    zero (a blank or negative-valued slice)."""
    if percentiles is None or len(percentiles) != len(INTENSITY_PERCENTILES):
        return None
    p05, p99 = percentiles[INTENSITY_PERCENTILES.index(5)], percentiles[INTENSITY_PERCENTILES.index(99)]
    if p05 is None or p99 is None or float(p99) <= 0:
        return None
    return float(p05) / float(p99)


def signal_values(*, label: str, assessed: bool, tumour_probability: float | None, ood_score: float | None,
                  percentiles: Sequence[float | None] | None) -> dict[str, SignalValue]:
    """One answer -> the value of each drift signal (None: this answer says nothing of that signal)."""
    return {"class_mix": label if assessed else NOT_ASSESSED, "tumour_probability": tumour_probability,
            "ood_score": ood_score, "intensity": intensity_ratio(percentiles)}


@dataclass(frozen=True)
class SignalBaseline:
    """One signal's validation distribution: ``categories`` (a categorical signal) or the inner bin
    ``edges`` (a continuous one: bin i is ``(edges[i-1], edges[i]]``, the first and last open), and
    the share of validation answers in each (sums to 1)."""

    kind: Literal["categories", "bins"]
    shares: tuple[float, ...]
    count: int  # validation answers with a value for this signal
    categories: tuple[str, ...] = ()
    edges: tuple[float, ...] = ()
    quantiles: dict[str, float] = field(default_factory=dict)

    def histogram(self, values: Iterable[SignalValue]) -> np.ndarray:
        """Counts of ``values`` in this signal's bins (None values skipped; a category the baseline
        never saw counts in no bin but is counted in :meth:`unseen`)."""
        if self.kind == "categories":
            index = {c: i for i, c in enumerate(self.categories)}
            counts = np.zeros(len(self.categories), dtype=np.int64)
            for v in values:
                if v is not None and v in index:
                    counts[index[v]] += 1
            return counts
        x = np.asarray([float(v) for v in values if v is not None], dtype=np.float64)
        x = x[np.isfinite(x)]
        return np.bincount(np.searchsorted(np.asarray(self.edges), x, side="left"),
                           minlength=len(self.edges) + 1).astype(np.int64)

    @classmethod
    def of_categories(cls, values: Sequence[SignalValue], categories: Sequence[str]) -> SignalBaseline:
        known = [v for v in values if v is not None]
        counts = np.array([sum(v == c for v in known) for c in categories], dtype=np.float64)
        return cls("categories", _shares(counts), len(known), categories=tuple(categories))

    @classmethod
    def of_values(cls, values: Sequence[SignalValue], bins: int = BINS) -> SignalBaseline:
        x = np.asarray([float(v) for v in values if v is not None], dtype=np.float64)
        x = x[np.isfinite(x)]
        if x.size == 0:
            raise ValueError("no values to make a baseline of")
        edges = tuple(float(e) for e in np.unique(np.quantile(x, np.arange(1, bins) / bins)))
        counts = np.bincount(np.searchsorted(np.asarray(edges), x, side="left"), minlength=len(edges) + 1)
        quantiles = {f"p{round(q * 100):02d}": float(np.quantile(x, q)) for q in QUANTILES}
        return cls("bins", _shares(counts.astype(np.float64)), int(x.size), edges=edges, quantiles=quantiles)


def _shares(counts: np.ndarray) -> tuple[float, ...]:
    total = counts.sum()
    if total <= 0:
        raise ValueError("no values to make a baseline of")
    return tuple(round(float(c / total), 6) for c in counts)


@dataclass(frozen=True)
class Baseline:
    """The drift signals' distributions on the model's validation split (``source`` says which)."""

    images: int
    signals: dict[str, SignalBaseline]
    source: dict[str, Any] = field(default_factory=dict)  # e.g. the split file and split, the model file
    intensity: dict[str, float] = field(default_factory=dict)  # median of each raw intensity percentile
    version: int = BASELINE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Baseline:
        """Raises ValueError naming what is wrong."""
        try:
            raw = json.loads(text)
            if raw.get("version") != BASELINE_VERSION:
                raise ValueError(f"baseline version {raw.get('version')!r}, this service reads {BASELINE_VERSION}")
            signals = {}
            for name, s in raw["signals"].items():
                signals[name] = SignalBaseline(kind=s["kind"], shares=tuple(map(float, s["shares"])),
                                               count=int(s["count"]), categories=tuple(s.get("categories", ())),
                                               edges=tuple(map(float, s.get("edges", ()))),
                                               quantiles={k: float(v) for k, v in s.get("quantiles", {}).items()})
                want = len(signals[name].categories) if s["kind"] == "categories" else len(signals[name].edges) + 1
                if s["kind"] not in ("categories", "bins") or len(signals[name].shares) != want:
                    raise ValueError(f"signal {name!r}: {len(signals[name].shares)} shares for {want} bins")
            return cls(images=int(raw["images"]), signals=signals, source=dict(raw.get("source", {})),
                       intensity={k: float(v) for k, v in raw.get("intensity", {}).items()}, version=raw["version"])
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed baseline: {exc!r}") from None


def build_baseline(answers: Sequence[Mapping[str, SignalValue]], labels: Sequence[str], *,
                   percentiles: Sequence[Sequence[float]] = (), source: Mapping[str, Any] | None = None) -> Baseline:
    """The baseline of the validation answers (each :func:`signal_values`' output) of a model with
    ``labels``; ``percentiles``: the images' raw ``INTENSITY_PERCENTILES``."""
    if not answers:
        raise ValueError("no answers to make a baseline of")
    signals = {"class_mix": SignalBaseline.of_categories([a["class_mix"] for a in answers],
                                                         [*labels, NOT_ASSESSED])}
    for name in CONTINUOUS:
        values = [a[name] for a in answers if a[name] is not None]
        if values:
            signals[name] = SignalBaseline.of_values(values)
    intensity = {}
    if len(percentiles):
        medians = np.median(np.asarray(percentiles, dtype=np.float64), axis=0)
        intensity = {f"p{p:02d}": round(float(v), 4) for p, v in zip(INTENSITY_PERCENTILES, medians)}
    return Baseline(images=len(answers), signals=signals, source=dict(source or {}), intensity=intensity)
