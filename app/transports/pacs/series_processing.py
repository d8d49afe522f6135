"""Classify a complete series and send its results on (series mode of ``btd dicom-listen`` and
``btd dicomweb``): a chain of typed stages, each testable alone.

1. :class:`SeriesClassifier` reads each slice (a frame of an Enhanced MR object is a slice) in an
   isolated worker, in slice order (``app.core.series.order_slices``), and runs the model on batches
   of ``batch_size`` slices while the next batch is read;
2. an *aggregate* callable turns the slices' predictions into the one :class:`SeriesFinding`
   (``app.core.series.aggregate`` unless another is given: the seam the tests use until it lands);
3. the key slices are classified again with their CAM images, for their overlays (while the SR is built);
4. ``series_results``' builders make the SR, the KOS, the key overlays and the tumour region's
   Segmentation, which the sender stores with retries.

Slices are classified while the series still arrives (``classify_ahead``), each with its SR group, so
a complete series has only its last partial batch, its finding and its results left to make.

One log line per series (counts and the finding, never a tag value).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from app.core import series as core_series
from app.core.decode import DICOM, InstanceHeader, read_instance_header
from app.core.errors import ServiceError
from app.core.result import Prediction
from app.core.series import Ordering, SeriesFinding, order_slices
from app.engine.metrics import PACS_SERIES
from app.engine.records.rows import prediction_row
from app.engine.records.writer import RecordWriter
from app.transports.pacs.assembly import HeldInstance, HeldSeries, slice_key, slices_of_instance
from app.transports.pacs.processing import (
    RetryPolicy,
    Sender,
    StudyTracker,
    Unavailable,
    isolated_reader,
)
from app.transports.pacs.results import encode
from app.transports.pacs.series_results import (
    SERIES_BUILDERS,
    ClassifiedSeries,
    ClassifiedSlice,
    build_series_sr,
    slice_item,
    warm_up,
)

log = logging.getLogger("btd.pacs")

Aggregate = Callable[[Sequence[Prediction]], SeriesFinding]
SliceKey = tuple[str, int | None]  # (SOP Instance UID, frame)
SliceResult = tuple[ClassifiedSlice, Any] | None  # the slice and its record's facts; None: unreadable
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
SERIES_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.4", ENHANCED_MR_IMAGE_STORAGE)  # MR; Enhanced MR, split in frames


def core_aggregate(predictions: Sequence[Prediction]) -> SeriesFinding:
    """``app.core.series.aggregate``, looked up when called (the one rule, defined there)."""
    return core_series.aggregate(predictions)


def slices_of(series: HeldSeries) -> tuple[list[tuple[HeldInstance, int | None]], Ordering]:
    """The series' slices in slice order, (instance, frame) with frame None for a single-frame instance,
    and how they were ordered."""
    slices = [slice_ for instance in series.instances for slice_ in slices_of_instance(instance)]
    geometry = [instance.header.geometry[frame or 0] for instance, frame in slices]
    order, _, ordering = order_slices(geometry)
    return [slices[i] for i in order], ordering


class SeriesClassifier:
    """The model file in this process (ONNX Runtime), run on batches of a series' slices; each slice is
    decoded in an isolated worker process under the service's limits."""

    def __init__(self, model_path: Path, batch_size: int = 8, records: RecordWriter | None = None,
                 max_pixels: int | None = None, tumour_threshold: float | None = None) -> None:
        from app.engine.engine import Engine, EngineOptions
        from app.engine.runner import default_buckets

        options = EngineOptions(tumour_threshold=tumour_threshold)  # None: the model's own (BTD_TUMOUR_THRESHOLD)
        if max_pixels is not None:
            options = replace(options, max_pixels=max_pixels)
        options = replace(options, runtime=replace(options.runtime, buckets=default_buckets(batch_size)))
        self.engine = Engine.load(model_path, options)
        self.batch_size = batch_size
        self.records = records
        meta = self.engine.metadata
        self.description = f"{meta.model_name} {meta.model_version} in process, series of slices in batches " \
                           f"of {batch_size}"
        self._reader = isolated_reader()
        self._reader.warm_up()
        warm_up()  # highdicom's tables, before the first series waits on them
        self._reading = ThreadPoolExecutor(1, thread_name_prefix="btd-series-read")
        self._lock = threading.Lock()  # one ONNX Runtime run at a time (listener workers): it uses every core

    def read_header(self, data: bytes, max_pixels: int) -> InstanceHeader:
        """A received object's header, read in the isolated worker."""
        return self._reader.call(read_instance_header, data, max_pixels)

    def _prepare(self, instance: HeldInstance, frame: int | None, view: bool = False):
        from app.engine.pipeline import prepare

        try:
            return self._reader.call(prepare, instance.read(), DICOM, self.engine.prepare_options, view, True, None,
                                     frame)
        except (ServiceError, OSError) as exc:
            log.warning("a slice could not be read (%s)", type(exc).__name__)
            return None

    def _batches(self, slices: list[tuple[HeldInstance, int | None]]) -> Iterator[list]:
        """Each batch's prepared slices (None: unreadable), the next batch read while this one runs."""
        chunks = [slices[i:i + self.batch_size] for i in range(0, len(slices), self.batch_size)]
        read = lambda chunk: [self._prepare(instance, frame) for instance, frame in chunk]
        pending = self._reading.submit(read, chunks[0]) if chunks else None
        for index in range(len(chunks)):
            prepared = pending.result()  # type: ignore[union-attr]
            pending = self._reading.submit(read, chunks[index + 1]) if index + 1 < len(chunks) else None
            yield prepared

    def _run(self, chunk: list[tuple[HeldInstance, int | None]], prepared: list,
             sr_items: bool = True) -> dict[SliceKey, SliceResult]:
        """One batch through the model: each slice's result (None: unreadable), with its SR group when
        ``sr_items``."""
        results: dict[SliceKey, SliceResult] = {slice_key(*s): None for s in chunk}
        ready = [(slice_, p) for slice_, p in zip(chunk, prepared) if p is not None]
        if not ready:
            return results
        started = time.perf_counter()
        with self._lock:
            outputs = self.engine.infer_prepared([p for _, p in ready], [False] * len(ready))
        for ((instance, frame), p), output in zip(ready, outputs):
            prediction = self.engine.builder.build(p, output, "none", started=started)
            classified = ClassifiedSlice(p.source, frame, prediction)
            if sr_items:
                slice_item(classified)  # its SR group now, while the series may still be arriving
            results[slice_key(instance, frame)] = (classified, p.facts)
        return results

    def read_batch(self, chunk: list[tuple[HeldInstance, int | None]]) -> Future:
        """Start reading a batch of slices (``ClassifyAhead``, while their series still arrives): its
        prepared slices come while the model runs on the previous batch."""
        return self._reading.submit(lambda: [self._prepare(instance, frame) for instance, frame in chunk])

    def classify_batch(self, chunk: list[tuple[HeldInstance, int | None]], reading: Future | None = None,
                       sr_items: bool = True) -> dict[SliceKey, SliceResult]:
        """Classify a batch of slices, read by ``reading`` (``read_batch``) or now."""
        return self._run(chunk, (reading or self.read_batch(chunk)).result(), sr_items)

    def classify(self, series: HeldSeries) -> tuple[list[ClassifiedSlice], int, Ordering]:
        """The slices that could be read, in slice order, with their predictions; how many could not; how
        they were ordered. Slices classified while the series arrived (``series.classified``) are not
        classified again."""
        slices, ordering = slices_of(series)
        with series.busy:  # a batch of it classified ahead now: wait for it rather than redo it
            results = dict(series.classified)
            missing = [s for s in slices if slice_key(*s) not in results]
            done = 0
            for prepared in self._batches(missing):
                results.update(self._run(missing[done:done + len(prepared)], prepared))
                done += len(prepared)
        out, unread = [], 0
        for slice_ in slices:  # slice order, whatever the order they were classified in
            result = results[slice_key(*slice_)]
            if result is None:
                unread += 1
                continue
            classified, facts = result
            out.append(classified)
            if self.records is not None:  # a new request id: no DICOM UID is kept
                self.records.add(prediction_row(request_id=str(uuid.uuid4()), transport="listener",
                                                model=self.engine.model_identity, answer=classified.prediction,
                                                facts=facts))
        return out, unread, ordering

    def add_overlays(self, result: ClassifiedSeries, series: HeldSeries) -> None:
        """Classify the key slices again with their CAM images (``overlay``)."""
        by_uid = {i.header.sop_uid: i for i in series.instances}
        for s in result.key:
            instance = by_uid.get(str(s.source.SOPInstanceUID))
            prepared = None if instance is None else self._prepare(instance, s.frame, view=True)
            if prepared is not None:
                with self._lock:
                    s.overlay = self.engine.predict_prepared(prepared, "png", started=time.perf_counter())

    def close(self) -> None:
        self._reading.shutdown()
        self._reader.close()
        if self.records is not None:
            self.records.close()


class SeriesProcessor:
    """Classify a series, aggregate, build its results and send them; counted per study."""

    def __init__(self, classifier: SeriesClassifier, sender: Sender, tracker: StudyTracker, retry: RetryPolicy,
                 aggregate: Aggregate = core_aggregate) -> None:
        self.classifier = classifier
        self.sender = sender
        self.tracker = tracker
        self.retry = retry
        self.aggregate = aggregate
        self._overlaying = ThreadPoolExecutor(1, thread_name_prefix="btd-series-overlays")

    def process(self, series: HeldSeries) -> bool:
        """True when the series' results reached the destination. Never raises for a bad series."""
        started = time.monotonic()
        study = series.study
        self.tracker.update(study, received=len(series.instances), pending=1)
        try:
            slices, unread, ordering = self.classifier.classify(series)
            self.tracker.update(study, classified=len(slices), failed=unread)
            if not slices:
                log.warning("series %s (study %s): none of its %d slices could be read: no results", series.key,
                            study, unread)
                PACS_SERIES.labels("failed").inc()
                return False
            classified = time.monotonic()
            result = ClassifiedSeries(slices, self.aggregate([s.prediction for s in slices]), unread, ordering)
            # The key overlays (decoded in the reader worker, run through ONNX Runtime: mostly outside the
            # GIL) are made while the SR (pure Python) is built and encoded.
            overlaying = self._overlaying.submit(self.classifier.add_overlays, result, series)
            sr = [encode(ds) for ds in build_series_sr(result)]
            overlaying.result()
            objects = sr + [encode(ds) for build in SERIES_BUILDERS if build is not build_series_sr
                            for ds in build(result)]
            built = time.monotonic()
            finding = result.finding
            self.tracker.finding(study, finding.label or "not assessed", finding.tumour_detected)
            try:
                self.retry.run(f"sending {len(objects)} objects to {self.sender.description}",
                               lambda: self.sender.send(objects))
            except Unavailable as exc:
                log.error("series %s (study %s): results not sent to %s: %s", series.key, study,
                          self.sender.description, exc)
                self.tracker.update(study, send_failed=len(objects))
                PACS_SERIES.labels("failed").inc()
                return False
            self.tracker.update(study, sent=len(objects))
            what = (f"{finding.label}, tumour {'detected' if finding.tumour_detected else 'not detected'}"
                    if finding.assessed else "not assessed")
            log.info("series %s (study %s): %d slices (ordered by %s), %d assessed, %d not assessed, %d unreadable: "
                     "%s; %d key slices; %d objects sent to %s in %.1f s (classify %.1f s, results %.1f s, send %.1f s)",
                     series.key, study, len(slices) + unread, ordering, finding.slices_assessed, finding.slices_not_assessed,
                     unread, what, len(result.key), len(objects), self.sender.description,
                     time.monotonic() - started, classified - started, built - classified, time.monotonic() - built)
            return True
        except Exception as exc:  # a bug must not kill the worker; its message could quote a tag value
            log.error("series %s (study %s): unexpected error processing it (%s)", series.key, study,
                      type(exc).__name__)
            log.debug("traceback", exc_info=True)
            PACS_SERIES.labels("failed").inc()
            self.tracker.update(study, failed=series.slices)
            return False
        finally:
            self.tracker.update(study, pending=-1)
