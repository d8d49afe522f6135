"""Series assembly for the PACS transports (series mode): received instances are grouped by Series
Instance UID and wait on disk, not in memory, until their series is complete, then the whole series
is handed on to be classified as one.

The rules (README, "PACS", series mode):

- **complete**: no instance of the series has arrived for ``idle_s`` (``BTD_SERIES_IDLE_S``): handed on;
- **timed out**: a series still receiving after ``max_age_s`` (``BTD_SERIES_MAX_AGE_S``) is handed on
  with what it has; an instance arriving later starts the series anew (its results get the same UIDs,
  so a PACS that keeps the first copy of an instance keeps the first results);
- **too large**: a series past ``max_slices`` slices (frames) or ``max_bytes`` bytes is dropped: its
  instances are deleted and it is not classified (a finding from part of a series could mislead);
  later instances of it are acknowledged and discarded until it has been quiet for ``idle_s``;
- **classified while arriving**: with an ``on_held`` callback (the listener's ``ClassifyAhead``), each
  held slice waits in ``HeldSeries.waiting`` until a background thread takes a batch of them
  (``take_batch``) and keeps their predictions (``keep``: per-slice predictions, never pixels), so a
  complete series has only its last partial batch left to classify; a dropped series' predictions
  are discarded with its instances;
- **full**: while all series together hold ``total_slices`` slices or ``total_bytes`` bytes (handed-on
  series count until they are released), ``add`` refuses: the listener answers C-STORE 0xA700 and the
  sender retries later.

Each outcome is one log line (counts and sizes, the series named by a short hash of its UID, never a
tag value) and a count in ``btd_pacs_series_total``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.core.decode import InstanceHeader
from app.engine.metrics import PACS_HELD_BYTES, PACS_SERIES
from app.transports.pacs.processing import study_key

log = logging.getLogger("btd.pacs")


@dataclass(frozen=True)
class SeriesLimits:
    idle_s: float = 3.0  # BTD_SERIES_IDLE_S: README, "PACS", the quiet period
    max_age_s: float = 600.0
    max_slices: int = 2000
    max_bytes: int = 1024 * 1024 * 1024
    total_slices: int = 10_000
    total_bytes: int = 4 * 1024 * 1024 * 1024

    @classmethod
    def from_settings(cls, settings) -> SeriesLimits:
        return cls(settings.series_idle_s, settings.series_max_age_s, settings.series_max_slices,
                   settings.series_max_bytes, settings.series_total_slices, settings.series_total_bytes)


@dataclass(frozen=True)
class HeldInstance:
    path: Path  # its bytes, as received
    size: int
    header: InstanceHeader

    def read(self) -> bytes:
        return self.path.read_bytes()


@dataclass
class HeldSeries:
    """A series' instances waiting on disk. ``key`` and ``study`` are short hashes (for logs)."""

    key: str
    study: str
    instances: list[HeldInstance] = field(default_factory=list)
    slices: int = 0
    size: int = 0
    started: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)
    dropped: int = 0  # > 0: dropped as too large; instances discarded since
    outcome: str = "complete"  # one of metrics.SERIES_OUTCOMES once handed on
    sop_uids: set[str] = field(default_factory=set)
    handed_on: bool = False  # no longer open: classified ahead no more
    waiting: list[tuple[HeldInstance, int | None]] = field(default_factory=list)  # slices not yet taken ahead
    classified: dict[tuple[str, int | None], object] = field(default_factory=dict)  # (SOP UID, frame) -> result
    busy: threading.Lock = field(default_factory=threading.Lock)  # held while a batch of it is classified


def slices_of_instance(instance: HeldInstance) -> list[tuple[HeldInstance, int | None]]:
    """The instance's slices: (instance, frame), frame None for a single-frame instance."""
    frames = instance.header.frames
    return [(instance, None if frames == 1 else frame) for frame in range(frames)]


def slice_key(instance: HeldInstance, frame: int | None) -> tuple[str, int | None]:
    return instance.header.sop_uid, frame


class SeriesAssembler:
    """Groups instances by series; ``on_ready(series)`` gets each complete (or timed-out) series, whose
    files stay until ``release(series)``. Thread safe; ``reap`` is called periodically."""

    def __init__(self, limits: SeriesLimits, on_ready: Callable[[HeldSeries], None],
                 spill_dir: Path | None = None, clock: Callable[[], float] = time.monotonic,
                 on_held: Callable[[HeldSeries], None] | None = None) -> None:
        self.limits = limits
        self.on_ready = on_ready
        self.on_held = on_held  # told (outside the lock) each time a series holds one more instance
        self.clock = clock
        if spill_dir is not None:
            spill_dir.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="btd-series-", dir=spill_dir))
        self._open: dict[str, HeldSeries] = {}
        self._lock = threading.Lock()
        self._count = 0
        self.held_slices = 0  # every series' slices on disk, handed-on ones until released
        self.held_bytes = 0

    def add(self, header: InstanceHeader, data: bytes) -> bool:
        """Hold one instance; False when all series together are at their bounds (refuse it, retry later)."""
        series = self._add(header, data)
        if series is None:
            return False
        if series is not False and self.on_held is not None:
            self.on_held(series)
        return True

    def _add(self, header: InstanceHeader, data: bytes) -> HeldSeries | bool | None:
        """The series that now holds the instance; False: acknowledged, not held; None: refused."""
        key = study_key(header.series_uid or header.sop_uid)  # no series UID: a series of its own
        now = self.clock()
        with self._lock:
            series = self._open.get(key)
            if series is None:
                series = self._open[key] = HeldSeries(key, study_key(header.study_uid or "no study uid"),
                                                      started=now, last=now)
            series.last = now
            if series.dropped:
                series.dropped += 1
                return False
            if header.sop_uid in series.sop_uids:  # sent again (a retry): held once
                return False
            if (self.held_slices + header.frames > self.limits.total_slices
                    or self.held_bytes + len(data) > self.limits.total_bytes):
                if not series.instances:
                    del self._open[key]
                log.warning("series waiting hold %d slices, %d bytes (at most %d, %d): an instance was refused "
                            "(0xA700), the sender will retry", self.held_slices, self.held_bytes,
                            self.limits.total_slices, self.limits.total_bytes)
                return None
            if (series.slices + header.frames > self.limits.max_slices
                    or series.size + len(data) > self.limits.max_bytes):
                self._drop(series)
                return False
            path = self.folder / f"{key}-{self._count:06d}.dcm"
            self._count += 1
            try:
                path.write_bytes(data)
            except OSError as exc:
                path.unlink(missing_ok=True)
                log.error("an instance could not be written to %s (%s): refused (0xA700)", self.folder,
                          type(exc).__name__)
                return None
            instance = HeldInstance(path, len(data), header)
            series.instances.append(instance)
            series.waiting.extend(slices_of_instance(instance))
            series.sop_uids.add(header.sop_uid)
            series.slices += header.frames
            series.size += len(data)
            self._hold(header.frames, len(data))
        return series

    def _hold(self, slices: int, size: int) -> None:
        self.held_slices += slices
        self.held_bytes += size
        PACS_HELD_BYTES.set(self.held_bytes)

    def _drop(self, series: HeldSeries) -> None:
        """Too large: delete what it holds, discard what comes (the lock is held)."""
        log.warning("series %s (study %s): more than %d slices or %d bytes (%d instances, %d slices, %d bytes "
                    "so far): dropped, not classified", series.key, series.study, self.limits.max_slices,
                    self.limits.max_bytes, len(series.instances), series.slices, series.size)
        PACS_SERIES.labels("dropped-too-large").inc()
        for instance in series.instances:
            instance.path.unlink(missing_ok=True)
        self._hold(-series.slices, -series.size)
        series.instances, series.slices, series.size, series.dropped = [], 0, 0, 1
        series.sop_uids.clear()
        series.waiting.clear()
        series.classified.clear()  # a batch being classified now is discarded by ``keep``

    def take_batch(self, series: HeldSeries, size: int) -> list[tuple[HeldInstance, int | None]]:
        """The next ``size`` slices of an open series to classify ahead, in arrival order; none while it
        waits for fewer (its last partial batch is classified once it is complete), or once it is
        dropped or handed on."""
        with self._lock:
            if series.dropped or series.handed_on or len(series.waiting) < size:
                return []
            batch, series.waiting = series.waiting[:size], series.waiting[size:]
            return batch

    def keep(self, series: HeldSeries, results: dict[tuple[str, int | None], object]) -> bool:
        """Keep a batch's results, unless the series was dropped meanwhile (False: discarded)."""
        with self._lock:
            if series.dropped:
                return False
            series.classified.update(results)
            return True

    def reap(self, now: float | None = None) -> None:
        """Hand on the series that are complete or timed out; forget dropped ones gone quiet."""
        now = self.clock() if now is None else now
        ready = []
        with self._lock:
            for key, series in list(self._open.items()):
                quiet, old = now - series.last >= self.limits.idle_s, now - series.started >= self.limits.max_age_s
                if series.dropped and quiet:
                    del self._open[key]
                    log.warning("series %s (study %s): %d more instances discarded after it was dropped",
                                key, series.study, series.dropped - 1)
                elif not series.dropped and (quiet or old):
                    series.outcome = "complete" if quiet else "timed-out"
                    series.handed_on = True
                    ready.append(self._open.pop(key))
        for series in ready:
            self._hand_on(series, now)

    def flush(self) -> None:
        """Hand on every series still open (at stop, or when a study has been fetched whole)."""
        with self._lock:
            ready = [s for s in self._open.values() if not s.dropped]
            self._open.clear()
            for series in ready:
                series.handed_on = True
        for series in ready:
            self._hand_on(series, self.clock())

    def _hand_on(self, series: HeldSeries, now: float) -> None:
        PACS_SERIES.labels(series.outcome).inc()
        why = ("complete" if series.outcome == "complete"
               else f"still receiving after {self.limits.max_age_s:g} s: processed with what it has")
        frames = f" ({series.slices} slices)" if series.slices != len(series.instances) else ""
        log.log(logging.INFO if series.outcome == "complete" else logging.WARNING,
                "series %s (study %s): %s: %d instances%s, %.1f MB, received over %.1f s",
                series.key, series.study, why, len(series.instances), frames, series.size / 1e6,
                series.last - series.started)
        self.on_ready(series)

    def release(self, series: HeldSeries) -> None:
        """Delete a handed-on series' files (it has been processed)."""
        for instance in series.instances:
            instance.path.unlink(missing_ok=True)
        with self._lock:
            self._hold(-series.slices, -series.size)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
