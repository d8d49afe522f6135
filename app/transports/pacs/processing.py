"""Classify a received DICOM slice and send its result objects on: the part of the PACS round trip that
``btd dicom-listen`` (DICOM in) and ``btd dicomweb`` (WADO-RS in) share.

- a *classifier* turns a slice's Part 10 bytes into its result objects: in this process with the
  model file (:class:`LocalClassifier`) or through a running service's ``format=dicom`` answer
  (:class:`ServiceClassifier`);
- a *sender* stores them at the destination: DICOM C-STORE (:class:`CStoreSender`) or DICOMweb
  STOW-RS (:class:`StowSender`), retried with exponential back-off;
- a :class:`StudyTracker` counts per study and logs one line when a study has gone quiet.

Logs name a study by a short hash of its Study Instance UID and never carry a tag value.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from app.core.decode import DICOM, quiet_pydicom
from app.core.errors import ServiceError
from app.engine.records.rows import prediction_row
from app.engine.records.writer import RecordWriter
from app.transports.pacs.multipart import decode_related
from app.transports.pacs.network import tcp_handlers
from app.transports.pacs.results import build_results, encode

log = logging.getLogger("btd.pacs")

MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
CLASSIFIED_SOP_CLASSES = (MR_IMAGE_STORAGE,)  # single MR slices; other objects are accepted and skipped

T = TypeVar("T")


class SliceFailed(Exception):
    """This slice cannot be classified (bad data, refused by the service): retrying will not help."""


class Unavailable(Exception):
    """A temporary failure (service overloaded or unreachable, destination down): worth retrying."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class RetryPolicy:
    """Up to ``retries`` more tries after the first, waiting ``backoff_s`` * 2^k (at most ``max_backoff_s``,
    or what the other side's Retry-After asks for)."""

    retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def delay(self, attempt: int, asked_s: float | None = None) -> float:
        wait = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return min(self.max_backoff_s, max(wait, asked_s or 0.0))

    def run(self, what: str, action: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
        for attempt in range(self.retries + 1):
            try:
                return action()
            except Unavailable as exc:
                if attempt == self.retries:
                    raise
                wait = self.delay(attempt, exc.retry_after_s)
                log.warning("%s failed (%s); retry %d of %d in %.1f s", what, exc, attempt + 1, self.retries, wait)
                sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover


def study_key(study_uid: str) -> str:
    """A short, stable name for a study in logs: not its UID (an identifier of the patient's study)."""
    return hashlib.sha256(study_uid.encode("ascii", "replace")).hexdigest()[:12]


def read_header(data: bytes) -> Dataset:
    with quiet_pydicom():
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def sr_summary(sr: Dataset) -> tuple[str, bool | None]:
    """(the finding's code meaning, tumour present?) read back from one of our SRs."""
    finding, tumour = "", None
    stack = list(sr.get("ContentSequence", []))
    while stack:
        item = stack.pop()
        name = item.ConceptNameCodeSequence[0].CodeValue if item.get("ConceptNameCodeSequence") else ""
        if item.get("ValueType") == "CODE" and item.get("ConceptCodeSequence"):
            value = item.ConceptCodeSequence[0]
            if name == "121071":
                finding = str(value.CodeMeaning)
            elif name == "108369006":
                tumour = value.CodeValue == "52101004"
        stack.extend(item.get("ContentSequence", []))
    return finding, tumour


# ---------------------------------------------------------------- classifiers


class Classifier(Protocol):
    description: str

    def classify(self, data: bytes) -> list[bytes]:
        """A DICOM slice's bytes -> its result objects (Part 10 bytes, the SR first)."""


def isolated_reader(workers: int = 1):
    """Worker processes where received DICOM is parsed, with the service's limits (BTD_HOST_TASK_TIMEOUT_S,
    BTD_HOST_MEMORY_LIMIT_BYTES): neither the listener nor the in-process classifier parses it itself."""
    from app.engine.host import ProcessHost
    from app.settings import Settings

    settings = Settings()
    return ProcessHost(workers, task_timeout_s=settings.host_task_timeout_s,
                       memory_limit_bytes=settings.host_memory_limit_bytes or None)


class LocalClassifier:
    """The model file, in this process (ONNX Runtime; no server). The slice is decoded, and the attributes
    its results copy are read, in an isolated worker process (``prepare(..., source=True)``)."""

    def __init__(self, model_path: Path, records: RecordWriter | None = None) -> None:
        from app.engine.engine import Engine

        self.engine = Engine.load_single(model_path)
        self.records = records  # each answer's prediction record (``--store``), or None
        meta = self.engine.metadata
        self.description = f"{meta.model_name} {meta.model_version} in process"
        self._lock = threading.Lock()  # one ONNX Runtime run at a time: it already uses every core
        self._reader = isolated_reader()
        self._reader.warm_up()

    def classify(self, data: bytes) -> list[bytes]:
        from app.engine.pipeline import prepare

        engine = self.engine
        try:
            started = time.perf_counter()
            prepared = self._reader.call(prepare, data, DICOM, engine.prepare_options, True, True)
            with self._lock:
                result = engine.predict_prepared(prepared, "png", started=started)
            objects = [encode(ds) for ds in build_results(prepared.source, result)]
        except ServiceError as exc:
            raise SliceFailed(f"{exc.title}: {exc.detail}") from None
        if self.records is not None:  # a new request id: no DICOM UID is kept
            self.records.add(prediction_row(request_id=str(uuid.uuid4()), transport="listener",
                                            model=engine.model_identity, answer=result, facts=prepared.facts))
        return objects

    def close(self) -> None:
        self._reader.close()
        if self.records is not None:
            self.records.close()


class ServiceClassifier:
    """A running btd service: ``POST /v1/predict?format=dicom``."""

    def __init__(self, url: str, timeout_s: float = 60.0, api_key: str | None = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.description = f"service {self.url}"
        headers = {"X-API-Key": api_key} if api_key else {}  # a service with API keys (README, Security)
        self.client = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers)

    def classify(self, data: bytes) -> list[bytes]:
        import httpx

        try:
            response = self.client.post("/v1/predict", params={"format": "dicom"}, content=data,
                                        headers={"Content-Type": DICOM})
        except httpx.HTTPError as exc:
            raise Unavailable(f"service unreachable: {type(exc).__name__}") from None
        if response.status_code in (429, 502, 503, 504):
            retry_after = response.headers.get("retry-after", "")
            raise Unavailable(f"service answered {response.status_code}",
                              float(retry_after) if retry_after.isdigit() else None)
        if response.status_code in (401, 403):  # every slice would fail alike: say what to do
            raise SliceFailed(f"the service refused the API key (HTTP {response.status_code}): pass --api-key or "
                              "set BTD_API_KEY to a key with the predict scope")
        if response.status_code != 200:
            try:
                reason = f"{response.json().get('title')}: {response.json().get('detail')}"
            except ValueError:
                reason = response.reason_phrase
            raise SliceFailed(f"{reason} (HTTP {response.status_code})")
        return [part for _, part in decode_related(response.content, response.headers.get("content-type", ""))]

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------- senders


class Sender(Protocol):
    description: str

    def send(self, objects: Sequence[bytes]) -> None:
        """Store every object; ``Unavailable`` for a failure worth retrying."""


@dataclass(frozen=True)
class DicomNode:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> DicomNode:
        """``AET@HOST:PORT``."""
        ae_title, at, address = text.partition("@")
        host, colon, port = address.rpartition(":")
        if not (at and colon and ae_title and host and port.isdigit()) or len(ae_title) > 16:
            raise ValueError(f"expected AET@HOST:PORT (AE title of at most 16 characters), got {text!r}")
        return cls(ae_title, host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class CStoreSender:
    """DICOM C-STORE to a node (one association per slice's objects)."""

    def __init__(self, node: DicomNode, calling_ae_title: str = "BTD", timeout_s: float = 30.0) -> None:
        self.node = node
        self.calling_ae_title = calling_ae_title
        self.timeout_s = timeout_s
        self.description = f"C-STORE {node}"

    def send(self, objects: Sequence[bytes]) -> None:
        from pynetdicom import AE

        datasets = [read_dataset(data) for data in objects]
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout_s
        syntaxes: dict[str, set[str]] = {}
        for ds in datasets:  # each object travels in its own transfer syntax
            syntaxes.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
        for sop_class, transfer_syntaxes in sorted(syntaxes.items()):
            for syntax in sorted(transfer_syntaxes):  # one context each: the peer accepts one syntax per context
                ae.add_requested_context(sop_class, [syntax])
        assoc = ae.associate(self.node.host, self.node.port, ae_title=self.node.ae_title, evt_handlers=tcp_handlers())
        if not assoc.is_established:
            raise Unavailable(f"no association with {self.node}")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = int(status.Status) if status and "Status" in status else None
                if code is None:
                    raise Unavailable(f"no C-STORE response from {self.node}")
                if code not in (0x0000, 0xB000, 0xB007, 0xB006):  # success and warnings
                    raise Unavailable(f"C-STORE status 0x{code:04X} from {self.node}")
        finally:
            assoc.release()


def dicomweb_client(url: str, timeout_s: float = 30.0, auth: tuple[str, str] | None = None):
    """A dicomweb-client for ``url``, with HTTP basic credentials ``auth`` (user, password) when given
    (the commands take them from ``Settings``: ``BTD_DICOMWEB_USER`` / ``BTD_DICOMWEB_PASSWORD``)."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if auth is not None:
        session.auth = auth
    return DICOMwebClient(url.rstrip("/"), session=session, timeout=timeout_s)


class StowSender:
    """DICOMweb STOW-RS (``POST {url}/studies``) with dicomweb-client."""

    def __init__(self, url: str, timeout_s: float = 30.0, auth: tuple[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self.description = f"STOW-RS {self.url}"
        self.client = dicomweb_client(self.url, timeout_s, auth)

    def send(self, objects: Sequence[bytes]) -> None:
        import requests

        try:
            self.client.store_instances([read_dataset(data) for data in objects])
        except (requests.RequestException, OSError) as exc:
            raise Unavailable(f"STOW-RS failed: {type(exc).__name__}") from None


def read_dataset(data: bytes) -> Dataset:
    with quiet_pydicom():
        return pydicom.dcmread(io.BytesIO(data))


# ---------------------------------------------------------------- per-study accounting


@dataclass
class StudyStats:
    received: int = 0
    skipped: int = 0
    classified: int = 0
    failed: int = 0
    sent: int = 0
    send_failed: int = 0
    pending: int = 0
    findings: Counter = field(default_factory=Counter)
    tumours: int = 0
    started: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)


class StudyTracker:
    """Counts what happens to each study's slices; one log line per study once it has been quiet for
    ``idle_s`` with nothing pending (and for every study still open at :meth:`flush`)."""

    def __init__(self, destination: str, idle_s: float = 5.0) -> None:
        self.destination = destination
        self.idle_s = idle_s
        self._studies: dict[str, StudyStats] = {}
        self._lock = threading.Lock()
        self.closed: list[tuple[str, StudyStats]] = []  # what was reported (for the caller's summary)

    def update(self, study: str, **changes: int) -> None:
        with self._lock:
            stats = self._studies.setdefault(study, StudyStats())
            for name, delta in changes.items():
                setattr(stats, name, getattr(stats, name) + delta)
            stats.last = time.monotonic()

    def finding(self, study: str, label: str, tumour: bool | None) -> None:
        with self._lock:
            stats = self._studies.setdefault(study, StudyStats())
            stats.findings[label or "no finding"] += 1
            stats.tumours += bool(tumour)

    def reap(self, now: float | None = None) -> None:
        """Report the studies that have gone quiet."""
        now = time.monotonic() if now is None else now
        with self._lock:
            done = [k for k, s in self._studies.items() if s.pending == 0 and now - s.last >= self.idle_s]
            finished = [(k, self._studies.pop(k)) for k in done]
        for key, stats in finished:
            self._report(key, stats)

    def flush(self) -> None:
        with self._lock:
            finished = list(self._studies.items())
            self._studies.clear()
        for key, stats in finished:
            self._report(key, stats)

    def _report(self, key: str, stats: StudyStats) -> None:
        self.closed.append((key, stats))
        findings = ", ".join(f"{label} {n}" for label, n in sorted(stats.findings.items()))
        what = f"{stats.classified} classified" + (f" ({findings}; tumour in {stats.tumours})" if findings else "")
        extra = f", {stats.skipped} not MR slices skipped" if stats.skipped else ""
        failures = stats.failed + stats.send_failed
        level = logging.WARNING if failures else logging.INFO
        log.log(level, "study %s: %d received%s, %s, %d failed; %d objects sent to %s (%d not sent) in %.1f s",
                key, stats.received, extra, what, stats.failed, stats.sent, self.destination, stats.send_failed,
                stats.last - stats.started)


class Processor:
    """Classify one slice and send its results on, counting per study."""

    def __init__(self, classifier: Classifier, sender: Sender, tracker: StudyTracker, retry: RetryPolicy) -> None:
        self.classifier = classifier
        self.sender = sender
        self.tracker = tracker
        self.retry = retry

    def process(self, study: str, data: bytes) -> bool:
        """True when the slice's results reached the destination. Never raises for a bad slice."""
        try:
            try:
                objects = self.retry.run("classifying a slice", lambda: self.classifier.classify(data))
            except (SliceFailed, Unavailable) as exc:
                log.warning("study %s: a slice could not be classified: %s", study, exc)
                self.tracker.update(study, failed=1)
                return False
            self.tracker.update(study, classified=1)
            self.tracker.finding(study, *sr_summary(read_header(objects[0])))
            try:
                self.retry.run(f"sending {len(objects)} objects to {self.sender.description}",
                               lambda: self.sender.send(objects))
            except Unavailable as exc:
                log.error("study %s: results not sent to %s: %s", study, self.sender.description, exc)
                self.tracker.update(study, send_failed=len(objects))
                return False
            self.tracker.update(study, sent=len(objects))
            return True
        except Exception as exc:  # a bug must not kill the worker; its message could quote a tag value
            log.error("study %s: unexpected error processing a slice (%s)", study, type(exc).__name__)
            log.debug("traceback", exc_info=True)
            self.tracker.update(study, failed=1)
            return False
        finally:
            self.tracker.update(study, pending=-1)
