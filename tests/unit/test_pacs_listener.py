"""btd dicom-listen's parts on loopback: the C-STORE SCP (pynetdicom on both sides), its queue limit,
skipping of non-MR objects, calling-AE restriction, retries with back-off and the per-study log line."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from app.transports.pacs.listener import STATUS_OUT_OF_RESOURCES, Listener, ListenerOptions
from app.transports.pacs.processing import (
    DicomNode,
    LocalClassifier,
    Processor,
    RetryPolicy,
    StudyTracker,
    Unavailable,
    study_key,
)
from tests.model_factory import build_model
from tests.pacs.dicom_checks import SENTINEL_NAME, mr_slice, read


class RecordingSender:
    """Stands in for the destination: records what it is sent; fails the first ``failures`` sends."""

    description = "recording sender"

    def __init__(self, failures: int = 0, gate: threading.Event | None = None) -> None:
        self.failures, self.gate = failures, gate
        self.sent: list[list[bytes]] = []
        self.calls = 0

    def send(self, objects) -> None:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(30)
        if self.calls <= self.failures:
            raise Unavailable("destination down")
        self.sent.append(list(objects))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Iterator[LocalClassifier]:
    classifier = LocalClassifier(build_model(tmp_path_factory.mktemp("m") / "m.onnx"))
    yield classifier
    classifier.close()


def _listener(classifier, sender, **options) -> Listener:
    tracker = StudyTracker(sender.description, idle_s=0.3)
    processor = Processor(classifier, sender, tracker, RetryPolicy(retries=3, backoff_s=0.01, max_backoff_s=0.05))
    listener = Listener(ListenerOptions(port=0, **{"study_idle_s": 0.3, **options}), processor)
    listener.start()
    return listener


def _store(port: int, datasets, calling: str = "MODALITY") -> list[int]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4.1")  # Enhanced MR
    assoc = ae.associate("127.0.0.1", port, ae_title="BTD")
    if not assoc.is_established:
        return []
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _wait(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_slices_are_classified_sent_and_reported_once_per_study(classifier, caplog):
    sender = RecordingSender(failures=2)  # the destination is down twice: retried with back-off
    listener = _listener(classifier, sender)
    slices = [read(mr_slice(sop_uid=f"1.2.3.4.{i}", number=i)) for i in (1, 2)]
    import pydicom
    from pydicom.data import get_testdata_file

    enhanced = pydicom.dcmread(get_testdata_file("emri_small.dcm"))  # not a single MR slice: skipped
    enhanced.StudyInstanceUID = slices[0].StudyInstanceUID
    key = study_key(str(slices[0].StudyInstanceUID))
    try:
        with caplog.at_level(logging.DEBUG):
            assert _store(listener.port, [*slices, enhanced]) == [0, 0, 0]
            _wait(lambda: len(sender.sent) == 2)
            _wait(lambda: any(r.getMessage().startswith(f"study {key}:") for r in caplog.records))
            time.sleep(0.5)  # a second line for the study would come now
    finally:
        listener.stop(10)
    assert all(len(objects) == 2 for objects in sender.sent)  # SR + overlay per slice
    assert sorted(read(o[0]).CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
                  .ReferencedSOPSequence[0].ReferencedSOPInstanceUID for o in sender.sent) == ["1.2.3.4.1", "1.2.3.4.2"]
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2
    lines = [r.getMessage() for r in caplog.records if "received" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"study {key}: 3 received, 1 not MR slices skipped, 2 classified")
    assert "4 objects sent" in lines[0]
    assert SENTINEL_NAME not in caplog.text and "SENTINEL" not in caplog.text
    assert not any(uid in caplog.text for uid in ("1.2.3.4.1", "1.2.3.4.2", str(slices[0].StudyInstanceUID)))


def test_a_full_queue_answers_out_of_resources(classifier):
    gate = threading.Event()  # the destination hangs: the one worker is busy, the queue fills
    listener = _listener(classifier, RecordingSender(gate=gate), queue_size=1)
    try:
        statuses = _store(listener.port, [read(mr_slice(sop_uid=f"1.2.3.5.{i}")) for i in range(4)])
    finally:
        gate.set()
        listener.stop(10)
    assert statuses[:2] == [0, 0] and STATUS_OUT_OF_RESOURCES in statuses[2:]


def test_queued_bytes_are_bounded_not_only_the_count(classifier):
    gate = threading.Event()  # the destination hangs: the one worker holds the first slice
    size = len(mr_slice())
    listener = _listener(classifier, RecordingSender(gate=gate), queue_size=100, queue_bytes=int(size * 2.5))
    try:
        statuses = _store(listener.port, [read(mr_slice(sop_uid=f"1.2.3.6.{i}")) for i in range(4)])
        assert listener.queued_bytes <= size * 2.5
    finally:
        gate.set()
        listener.stop(10)
    assert statuses[:2] == [0, 0] and statuses[2:] == [STATUS_OUT_OF_RESOURCES] * 2
    assert listener.queued_bytes == 0  # released as the slices were processed


def test_only_allowed_calling_ae_titles_may_send(classifier):
    listener = _listener(classifier, RecordingSender(), allowed_calling_aets=("ORTHANC",))
    try:
        assert _store(listener.port, [read(mr_slice())], calling="STRANGER") == []  # association rejected
        assert _store(listener.port, [read(mr_slice())], calling="ORTHANC") == [0]
    finally:
        listener.stop(10)


def test_retry_policy_backs_off_and_gives_up():
    waits: list[float] = []
    policy = RetryPolicy(retries=3, backoff_s=1.0, max_backoff_s=3.0)

    def always_down():
        raise Unavailable("down", retry_after_s=None)

    with pytest.raises(Unavailable):
        policy.run("x", always_down, sleep=waits.append)
    assert waits == [1.0, 2.0, 3.0]  # doubled, capped
    assert policy.delay(0, asked_s=2.5) == 2.5  # the other side's Retry-After wins when longer


@pytest.mark.parametrize(("text", "node"), [("ORTHANC@pacs.local:4242", DicomNode("ORTHANC", "pacs.local", 4242)),
                                            ("A@[::1]:104", DicomNode("A", "::1", 104))])
def test_dicom_node_parses(text, node):
    assert DicomNode.parse(text) == node


@pytest.mark.parametrize("text", ["ORTHANC", "@host:1", "A@host", "A@host:x", "X" * 17 + "@h:1"])
def test_dicom_node_refuses(text):
    with pytest.raises(ValueError):
        DicomNode.parse(text)
