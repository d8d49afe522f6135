"""Shadow mode (README, "Model updates"): a candidate model (``BTD_SHADOW_MODEL``) sees a sampled
share of the live answers' images (``BTD_SHADOW_SHARE``) off the response path, and only its
agreement with the live model is kept: metrics, and a shadow comparison record when recording is on.

Never on the response path: ``offer`` is called after the live answer is made and only samples and
puts on a bounded queue (``BTD_SHADOW_QUEUE_SIZE``; a full queue skips the image, counted). One
thread runs the candidate, batch 1 and one intra-op thread, so it takes at most one core from the
live model. The candidate reuses the live model's preprocessed image when both models share the
preprocessing spec; otherwise it prepares the image itself, except DICOM, whose decoding runs only
in the isolated host workers (such images are skipped, counted).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from app.core.decode import DICOM
from app.core.result import Prediction
from app.engine import metrics
from app.engine.engine import Engine, EngineOptions
from app.engine.pipeline import Prepared, prepare

log = logging.getLogger("app.shadow")

_STOP = object()


@dataclass(frozen=True)
class ShadowOptions:
    path: Path
    share: float = 0.1  # of answered images
    queue_size: int = 32


@dataclass(frozen=True)
class ShadowItem:
    prepared: Prepared
    data: bytes
    media_type: str | None
    kind: str | None  # the request's sniffed type
    live: Prediction
    request_id: str | None
    item: int | None


def comparison_row(item: ShadowItem, shadow: Engine, decision: Any, inference_ms: float) -> dict[str, Any]:
    """The shadow comparison record of one image (table ``shadow_comparisons``; no patient data)."""
    live, model = item.live, shadow.model_identity
    return {
        "recorded_at": datetime.now(timezone.utc), "request_id": item.request_id or "", "item": item.item,
        "live_model_version": live.model.version, "live_model_sha256": live.model.sha256,
        "shadow_model_name": model.name, "shadow_model_version": model.version, "shadow_model_sha256": model.sha256,
        "shadow_label": decision.label, "shadow_tumour_probability": decision.tumour_probability,
        "shadow_tumour_detected": decision.tumour_detected, "shadow_assessed": decision.assessed,
        "label_agrees": decision.label == live.label, "tumour_agrees": decision.tumour_detected == live.tumour_detected,
        "shadow_inference_ms": inference_ms,
    }


class Shadow:
    def __init__(self, engine: Engine, options: ShadowOptions,
                 on_compared: Callable[[dict[str, Any]], None] | None = None, seed: int | None = None) -> None:
        self.engine = engine
        self.options = options
        self.on_compared = on_compared  # the record writer's add, when recording is on
        self.queue: queue.Queue[Any] = queue.Queue(options.queue_size)
        self._random = random.Random(seed)
        self._thread: threading.Thread | None = None
        self.compared = 0

    @classmethod
    def load(cls, options: ShadowOptions, engine_options: EngineOptions,
             on_compared: Callable[[dict[str, Any]], None] | None = None) -> Shadow:
        """Load, check and warm up the candidate: batch 1, one intra-op thread (blocking)."""
        runtime = replace(engine_options.runtime, intra_op_threads=1, model_runs=1)
        engine = Engine.load_single(options.path, replace(engine_options, runtime=runtime))
        return cls(engine, options, on_compared)

    def start(self) -> None:
        meta = self.engine.metadata
        metrics.SHADOW_MODEL_INFO.clear()
        metrics.SHADOW_MODEL_INFO.labels(meta.model_name, meta.model_version, self.engine.model.sha256).set(1)
        metrics.SHADOW_WAITING.set_function(self.queue.qsize)
        self._thread = threading.Thread(target=self._run, name="btd-shadow", daemon=True)
        self._thread.start()

    def offer(self, prepared: Prepared, data: bytes, media_type: str | None, kind: str | None, live: Prediction,
              request_id: str | None = None, item: int | None = None) -> None:
        """Maybe (``share``) queue one answered image for the candidate; never blocks."""
        if self._thread is None or self._random.random() >= self.options.share:
            return
        own_preparation = prepared.spec != self.engine.metadata.preprocess
        if own_preparation and kind == DICOM:
            metrics.SHADOW_SKIPPED.labels("dicom").inc()  # its own preparation would decode DICOM in-process
            return
        try:  # the bytes are kept only when the candidate prepares the image itself
            self.queue.put_nowait(ShadowItem(prepared, data if own_preparation else b"", media_type, kind, live,
                                             request_id, item))
        except queue.Full:
            metrics.SHADOW_SKIPPED.labels("busy").inc()

    def _run(self) -> None:
        while (item := self.queue.get()) is not _STOP:
            try:
                self.compare(item)
            except Exception as exc:  # any failure of the candidate costs its comparison, never an answer
                metrics.SHADOW_SKIPPED.labels("error").inc()
                log.warning("shadow model failed on an image (%s: %s)", type(exc).__name__, str(exc)[:200])

    def compare(self, item: ShadowItem) -> dict[str, Any]:
        """Run the candidate on one image and count (and record) its agreement with the live answer."""
        engine = self.engine
        prepared = item.prepared
        if prepared.spec != engine.metadata.preprocess:
            prepared = prepare(item.data, item.media_type, engine.prepare_options, sniffed=item.kind)
        started = time.perf_counter()
        (output,) = engine.infer([prepared.tensor], [False])
        inference_ms = (time.perf_counter() - started) * 1000.0
        decision = engine.decide(output.logits, output.ood_score, prepared.image_reasons)
        row = comparison_row(item, engine, decision, inference_ms)
        for check in metrics.SHADOW_CHECKS:
            metrics.SHADOW_COMPARISONS.labels(check, "agree" if row[f"{check}_agrees"] else "disagree").inc()
        self.compared += 1
        if self.on_compared is not None:
            self.on_compared(row)
        return row

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop the thread; images still waiting are dropped (they were never on any answer's path)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        try:
            self.queue.put_nowait(_STOP)
        except queue.Full:
            pass
        thread.join(timeout_s)
