"""One answer -> the row its record holds, from the same values the answer and the audit line
carry: a ``Prediction`` (HTTP v1, the CLI, PACS) or the ``Decision`` the Open Inference Protocol's
audit line is made of, the model's identity, the input's facts (``InputFacts``) and the timings.
Cheap (a dict), made where the answer is given; the writer thread does the rest."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from app.core.baseline import INTENSITY_PERCENTILES
from app.core.decision import Decision
from app.core.result import ModelIdentity, Prediction, Timings
from app.engine.pipeline import InputFacts
from app.engine.records.schema import RECORDS

Transport = Literal["http-v1", "http-v2", "cli", "listener"]
PERCENTILE_COLUMNS = tuple(f"intensity_p{p:02d}" for p in INTENSITY_PERCENTILES)
TIMING_COLUMNS = {"decode": "decode_ms", "preprocess": "preprocess_ms", "queue": "queue_ms",
                  "inference": "inference_ms", "cam": "cam_ms", "total": "total_ms"}
# Text columns' lengths: a longer value is cut, never a refused batch.
_LENGTHS = {c.name: c.type.length for c in RECORDS.columns if getattr(c.type, "length", None)}


def prediction_row(*, request_id: str, transport: Transport, model: ModelIdentity, answer: Prediction | Decision,
                   facts: InputFacts | None = None, timings: Timings | None = None, item: int | None = None,
                   route: str | None = None, now: datetime | None = None) -> dict[str, Any]:
    """The record of one answered image (no patient data: see ``schema``)."""
    timings = timings if timings is not None else getattr(answer, "timings_ms", None)
    row: dict[str, Any] = {
        "recorded_at": now or datetime.now(timezone.utc), "request_id": request_id, "item": item,
        "transport": transport, "route": route, "model_name": model.name, "model_version": model.version,
        "model_sha256": model.sha256, "label": answer.label, "probabilities": dict(answer.probabilities),
        "tumour_probability": answer.tumour_probability, "tumour_detected": answer.tumour_detected,
        "threshold": answer.threshold, "ood_score": answer.ood_score, "ood_threshold": answer.ood_threshold,
        "assessed": answer.in_distribution is not False,
        "not_assessed_reasons": ",".join(answer.ood_reasons) or None,
    }
    row.update(dict.fromkeys(PERCENTILE_COLUMNS))
    if facts is not None:
        row.update(pixels_sha256=facts.pixels_sha256, media_type=facts.media_type, width=facts.width,
                   height=facts.height, modality=facts.modality, sequence=facts.sequence, plane=facts.plane,
                   instance_sha256=facts.instance_sha256)
        if facts.percentiles is not None:
            row.update(zip(PERCENTILE_COLUMNS, facts.percentiles))
    else:
        row.update(pixels_sha256=None, media_type=None, width=None, height=None, modality=None, sequence=None,
                   plane=None, instance_sha256=None)
    for key, column in TIMING_COLUMNS.items():
        row[column] = None if timings is None else getattr(timings, key)
    for name, length in _LENGTHS.items():
        value = row.get(name)
        if isinstance(value, str) and len(value) > length:
            row[name] = value[:length]
    return row
