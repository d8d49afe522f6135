"""Classify a series' slices while it still arrives (series mode of ``btd dicom-listen``): the series is
complete only after its quiet period (``BTD_SERIES_IDLE_S``), and a 150-slice series takes seconds to
classify, so each full batch of held slices is read and classified by one background thread as soon
as it is on disk. When the series is complete only its last partial batch is left
(``SeriesClassifier.classify`` skips what is in ``HeldSeries.classified``).

Bounded as the series are: it only classifies slices the :class:`SeriesAssembler` holds (within its
per-series and total bounds), keeps per-slice predictions and their slice's header (no pixels, about
25 kB a slice: 250 MB at BTD_SERIES_TOTAL_SLICES' default 10,000) and, within ``SR_ITEMS_AHEAD_SLICES``,
their SR groups; a series dropped meanwhile loses them (``SeriesAssembler.keep``). Batches go in arrival order; the
finding is made later, in slice order.
"""

from __future__ import annotations

import logging
import queue
import threading

from app.transports.pacs.assembly import HeldSeries, SeriesAssembler

log = logging.getLogger("btd.pacs")

# A slice's SR group (``series_results.slice_item``) is about 60 kB against 25 kB for its prediction and
# header, so it is built ahead only while the series held total at most this many slices: the groups
# built ahead then take about 120 MB at most, however many series wait (the rest are built at the end).
SR_ITEMS_AHEAD_SLICES = 2000


class ClassifyAhead:
    """One thread that classifies full batches of the series ``notify`` names, while they arrive."""

    def __init__(self, classifier, batch_size: int) -> None:
        self.classifier = classifier  # SeriesClassifier: classify_batch
        self.batch_size = batch_size
        self.assembler: SeriesAssembler | None = None  # set by the listener (its assembler calls notify)
        self._series: queue.SimpleQueue[HeldSeries | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="btd-series-ahead", daemon=True)

    def start(self, assembler: SeriesAssembler) -> None:
        self.assembler = assembler
        self._thread.start()

    def notify(self, series: HeldSeries) -> None:
        """A series holds one more instance: classify a batch of it once it has a full one waiting."""
        if len(series.waiting) >= self.batch_size:
            self._series.put(series)

    def _work(self) -> None:
        while (series := self._series.get()) is not None:
            try:
                self._classify(series)
            except Exception as exc:  # noqa: BLE001 - the series is classified whole when complete instead
                log.warning("series %s: classifying ahead failed (%s); done when it is complete", series.key,
                            type(exc).__name__)

    def _classify(self, series: HeldSeries) -> None:
        """Its full batches, each read while the model runs on the one before."""
        assert self.assembler is not None
        with series.busy:  # its final classification waits for these batches rather than redoing them
            batch = self.assembler.take_batch(series, self.batch_size)
            reading = self.classifier.read_batch(batch) if batch else None
            while batch:
                following = self.assembler.take_batch(series, self.batch_size)
                next_reading = self.classifier.read_batch(following) if following else None
                sr_items = self.assembler.held_slices <= SR_ITEMS_AHEAD_SLICES
                self.assembler.keep(series, self.classifier.classify_batch(batch, reading, sr_items))
                batch, reading = following, next_reading

    def stop(self) -> None:
        if self._thread.is_alive():
            self._series.put(None)
            self._thread.join(timeout=60)
