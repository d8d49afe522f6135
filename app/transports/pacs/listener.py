"""``btd dicom-listen``: a DICOM C-STORE SCP that a PACS routing rule sends MR slices to. In series mode
(:class:`SeriesListener`, the default) the instances of a series are held on disk until it is complete
and the series is classified as one (``series_processing``); in instance mode (:class:`Listener`) each
slice is acknowledged at once, queued, classified (in process or by a running service) and its SR and
CAM overlay are sent to the configured destination (C-STORE or STOW-RS) with retries and back-off.

Association limits and timeouts are pynetdicom's; a full queue (``queue_size`` slices or
``queue_bytes`` bytes) answers C-STORE 0xA700 (out of resources) so the sender retries later. Each
received object is read once, before it is queued, in an isolated worker process under the service's
limits (``app.core.dicom_read``: bounded inflation of a deflated dataset, element and value caps,
the worker's memory and time limits): a bomb is answered 0xC000 (cannot understand) and never queued;
this process never parses what a sender sends. Objects other than MR Image Storage are accepted and
skipped (a routing rule may send a whole study). One log line per study; no tag value is ever logged.
Who may send: ``--allow-aet`` and TLS (README, "PACS").
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from app.core.decode import DEFAULT_MAX_PIXELS, read_study_uid
from app.core.errors import ServiceError
from app.transports.pacs.network import tcp_handlers
from app.transports.pacs.processing import CLASSIFIED_SOP_CLASSES, Processor, isolated_reader, study_key

T = TypeVar("T")
log = logging.getLogger("btd.pacs")

STATUS_SUCCESS, STATUS_OUT_OF_RESOURCES, STATUS_CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)


@dataclass(frozen=True)
class ListenerOptions:
    ae_title: str = "BTD"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()  # empty: any calling AE may send
    max_associations: int = 8
    timeout_s: float = 30.0  # ACSE, DIMSE and network timeouts
    max_pdu: int = 65536
    queue_size: int = 256
    queue_bytes: int = 256 * 1024 * 1024  # received bytes waiting for classification, at most
    max_pixels: int = DEFAULT_MAX_PIXELS  # as BTD_MAX_PIXELS: bounds a deflated dataset's inflation
    workers: int = 1
    study_idle_s: float = 5.0


def decodable_transfer_syntaxes() -> list[str]:
    """Uncompressed syntaxes, plus every compressed one an installed pydicom decoder reads (RLE always;
    JPEG, JPEG-LS and JPEG 2000 with the dicom-codecs extra), so a slice is only accepted when it can be read."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import AllTransferSyntaxes

    syntaxes = [str(uid) for uid in UNCOMPRESSED]
    for uid in map(UID, AllTransferSyntaxes):
        if not uid.is_compressed or str(uid) in syntaxes:
            continue
        try:
            if get_decoder(uid).is_available:
                syntaxes.append(str(uid))
        except NotImplementedError:  # no decoder for this syntax at all
            pass
    return syntaxes


class Listener:
    """The SCP, its queue and its workers. ``start()`` returns at once; ``stop()`` drains and reports."""

    def __init__(self, options: ListenerOptions, processor: Processor) -> None:
        self.options = options
        self.processor = processor
        self.tracker = processor.tracker
        self.jobs: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=options.queue_size)
        self.queued_bytes = 0  # bytes of the objects in ``jobs`` or being processed
        self._bytes_lock = threading.Lock()
        self._reader = isolated_reader()  # where a received object is parsed
        self._server = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server is not None else self.options.port

    def _ae(self):
        from pynetdicom import AE, AllStoragePresentationContexts
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.options.ae_title)
        ae.maximum_associations = self.options.max_associations
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.options.timeout_s
        ae.maximum_pdu_size = self.options.max_pdu
        ae.require_called_aet = True
        if self.options.allowed_calling_aets:
            ae.require_calling_aet = list(self.options.allowed_calling_aets)
        syntaxes = decodable_transfer_syntaxes()
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        return ae

    def start(self) -> None:
        from pynetdicom import evt

        self._reader.warm_up()  # its worker started before the first object arrives
        for noisy in ("pynetdicom", "httpx", "urllib3"):  # their INFO lines are per association or request
            logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
        for i in range(self.options.workers):
            thread = threading.Thread(target=self._work, name=f"btd-listen-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        reaper = threading.Thread(target=self._reap, name="btd-listen-reaper", daemon=True)
        reaper.start()
        self._threads.append(reaper)
        self._server = self._ae().start_server((self.options.host, self.options.port), block=False,
                                               evt_handlers=[(evt.EVT_C_STORE, self._on_store), *tcp_handlers()])
        log.info("dicom-listen: AE %s on %s:%d (at most %d associations), classifying with %s, results to %s",
                 self.options.ae_title, self.options.host, self.port, self.options.max_associations,
                 self.processor.classifier.description, self.processor.sender.description)

    def _read(self, event, reader: Callable[..., T]) -> tuple[str, bytes, T] | int:
        """(SOP class, the encoded object, what ``reader`` read of its header in the isolated worker), or
        the C-STORE status refusing an object that cannot be read (a bomb, an undecodable dataset): the
        log says why without its content."""
        try:
            sop_class = str(event.request.AffectedSOPClassUID)
            data = event.encoded_dataset(include_meta=True)
            return sop_class, data, self._reader.call(reader, data, self.options.max_pixels)
        except ServiceError as exc:
            log.warning("a received object was refused (%s: %s)", exc.title, exc.detail)
            return STATUS_CANNOT_UNDERSTAND
        except Exception as exc:  # noqa: BLE001 - its message could quote a tag value
            log.warning("a received object could not be read (%s); refused", type(exc).__name__)
            return STATUS_CANNOT_UNDERSTAND

    def _on_store(self, event) -> int:
        read = self._read(event, read_study_uid)
        if isinstance(read, int):
            return read
        sop_class, data, study_uid = read
        study = study_key(study_uid or "no study uid")
        if sop_class not in CLASSIFIED_SOP_CLASSES:
            self.tracker.update(study, received=1, skipped=1)
            return STATUS_SUCCESS
        if self._stopping.is_set():
            return STATUS_OUT_OF_RESOURCES
        with self._bytes_lock:
            full = self.queued_bytes + len(data) > self.options.queue_bytes
            if not full:
                self.queued_bytes += len(data)
        if full:
            log.warning("queue full (%d bytes waiting, at most %d): C-STORE answered 0xA700, the sender will retry",
                        self.queued_bytes, self.options.queue_bytes)
            return STATUS_OUT_OF_RESOURCES
        self.tracker.update(study, received=1, pending=1)
        try:
            self.jobs.put_nowait((study, data))
        except queue.Full:
            self._release(len(data))
            self.tracker.update(study, received=-1, pending=-1)
            log.warning("queue full (%d slices waiting): C-STORE answered 0xA700, the sender will retry",
                        self.options.queue_size)
            return STATUS_OUT_OF_RESOURCES
        return STATUS_SUCCESS

    def _release(self, size: int) -> None:
        with self._bytes_lock:
            self.queued_bytes -= size

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                self.processor.process(*job)
            finally:
                if job is not None:
                    self._release(len(job[1]))
                self.jobs.task_done()

    def _reap(self) -> None:
        while not self._stopping.wait(min(1.0, max(0.1, self.options.study_idle_s / 4))):
            self.tracker.reap()

    def stop(self, drain_timeout_s: float = 60.0) -> None:
        """Refuse new associations, finish the queued slices (up to ``drain_timeout_s``), report every study."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
        for _ in range(self.options.workers):
            try:
                self.jobs.put(None, timeout=drain_timeout_s)
            except queue.Full:
                break
        for thread in self._threads:
            thread.join(timeout=drain_timeout_s)
        self._reader.close()
        self.tracker.flush()


class SeriesListener(Listener):
    """Series mode: each received MR (or Enhanced MR) instance is read once in the isolated worker (its
    UIDs and geometry), held on disk by the :class:`SeriesAssembler` until its series is complete, and
    each complete series is queued whole for the :class:`SeriesProcessor`. The assembler's bounds
    replace the queue's: past them C-STORE answers 0xA700. Meanwhile :class:`ClassifyAhead` classifies
    the held slices in batches, so a complete series has little left to classify."""

    def __init__(self, options: ListenerOptions, processor, limits, spill_dir=None) -> None:
        from app.transports.pacs.assembly import SeriesAssembler
        from app.transports.pacs.classify_ahead import ClassifyAhead

        super().__init__(options, processor)
        self.series_jobs: queue.Queue = queue.Queue()  # bounded by the assembler's totals
        self.ahead = ClassifyAhead(processor.classifier, processor.classifier.batch_size)
        self.assembler = SeriesAssembler(limits, self.series_jobs.put, spill_dir, on_held=self.ahead.notify)

    def start(self) -> None:
        self.ahead.start(self.assembler)
        super().start()
        log.info("dicom-listen: series mode: a series is complete %g s after its last instance; instances wait "
                 "in %s", self.assembler.limits.idle_s, self.assembler.folder)

    def _on_store(self, event) -> int:
        from app.core.decode import read_instance_header
        from app.transports.pacs.series_processing import SERIES_SOP_CLASSES

        read = self._read(event, read_instance_header)
        if isinstance(read, int):
            return read
        sop_class, data, header = read
        if sop_class not in SERIES_SOP_CLASSES:
            self.tracker.update(study_key(header.study_uid or "no study uid"), received=1, skipped=1)
            return STATUS_SUCCESS
        if self._stopping.is_set() or not self.assembler.add(header, data):
            return STATUS_OUT_OF_RESOURCES
        return STATUS_SUCCESS

    def _work(self) -> None:
        while True:
            series = self.series_jobs.get()
            try:
                if series is None:
                    return
                self.processor.process(series)
            finally:
                if series is not None:
                    self.assembler.release(series)

    def _reap(self) -> None:
        while not self._stopping.wait(min(1.0, max(0.1, self.assembler.limits.idle_s / 4))):
            self.assembler.reap()
            self.tracker.reap()

    def stop(self, drain_timeout_s: float = 60.0) -> None:
        """Refuse new associations, process every series held (up to ``drain_timeout_s``), report."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
        self.assembler.flush()
        for _ in range(self.options.workers):
            self.series_jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=drain_timeout_s)
        self.ahead.stop()
        self._reader.close()
        self.assembler.close()
        self.tracker.flush()
