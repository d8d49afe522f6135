"""Series mode of the PACS transports: series assembly on disk with its bounds, and the
listener end to end on loopback (one SR + one KOS + key overlays per assessed series, an SR alone for a
series not assessed, an Enhanced MR object split into its frames)."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from prometheus_client import REGISTRY
from pydicom.data import get_testdata_file

from app.core.decode import InstanceHeader, read_instance_header
from app.core.series import SliceGeometry
from app.transports.pacs.assembly import SeriesAssembler, SeriesLimits
from app.transports.pacs.listener import STATUS_OUT_OF_RESOURCES, ListenerOptions, SeriesListener
from app.transports.pacs.processing import RetryPolicy, StudyTracker, study_key
from app.transports.pacs.results import encode
from app.transports.pacs.series_processing import SeriesClassifier, SeriesProcessor
from tests.model_factory import build_model
from tests.pacs.dicom_checks import SENTINEL_NAME, dciodvfy_errors, sr_texts
from tests.pacs.series_data import T2, series, synthetic_images
from tests.unit.test_pacs_listener import RecordingSender, _store, _wait

KOS, SR, SC = "1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.7"


def _header(series_uid: str = "1.2.9", sop: str = "1.2.9.1", frames: int = 1) -> InstanceHeader:
    return InstanceHeader("1.2.8", series_uid, sop, "1.2.840.10008.5.1.4.1.1.4",
                          tuple(SliceGeometry(sop) for _ in range(frames)))


def _count(outcome: str) -> float:
    return REGISTRY.get_sample_value("btd_pacs_series_total", {"outcome": outcome}) or 0.0


# --- assembly --------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def assembled(tmp_path) -> Iterator[tuple[SeriesAssembler, list, Clock]]:
    ready: list = []
    clock = Clock()
    assembler = SeriesAssembler(SeriesLimits(idle_s=5, max_age_s=60, max_slices=3, max_bytes=1000, total_slices=5,
                                             total_bytes=10_000), ready.append, tmp_path, clock)
    yield assembler, ready, clock
    assembler.close()


def test_a_series_waits_on_disk_until_it_has_been_quiet(assembled, caplog):
    assembler, ready, clock = assembled
    with caplog.at_level(logging.INFO):
        assert assembler.add(_header(sop="1.2.9.1"), b"a" * 100)
        clock.now = 4.0
        assert assembler.add(_header(sop="1.2.9.2"), b"b" * 100)
        assert assembler.add(_header(sop="1.2.9.2"), b"b" * 100)  # a resend is held once
        assembler.reap(8.9)
        assert ready == []  # 4.9 s since its last instance
        before = _count("complete")
        assembler.reap(9.0)
    (series,) = ready
    assert [i.read() for i in series.instances] == [b"a" * 100, b"b" * 100]  # on disk, as received
    assert all(i.path.parent == assembler.folder for i in series.instances) and assembler.held_bytes == 200
    assert _count("complete") == before + 1
    line = [r.getMessage() for r in caplog.records if "complete" in r.getMessage()]
    assert line == [(f"series {study_key('1.2.9')} (study {study_key('1.2.8')}): complete: 2 instances, 0.0 MB, "
                     "received over 4.0 s")]
    assembler.release(series)
    assert assembler.held_bytes == 0 and not any(assembler.folder.iterdir())


def test_a_series_past_its_bounds_is_dropped_not_classified(assembled, caplog):
    assembler, ready, clock = assembled
    before = _count("dropped-too-large")
    with caplog.at_level(logging.WARNING):
        for i in range(5):  # the fourth slice passes max_slices=3
            assert assembler.add(_header(sop=f"1.2.9.{i}"), b"x" * 10)
    assert _count("dropped-too-large") == before + 1
    assert assembler.held_slices == 0 and not any(assembler.folder.iterdir())
    clock.now = 10.0
    assembler.reap()
    assert ready == []
    assert "dropped, not classified" in caplog.text and "1 more instances discarded" in caplog.text
    assert assembler.add(_header(sop="1.2.9.9"), b"x" * 10)  # once quiet and forgotten, it may come again


def test_all_series_together_are_bounded_and_refused_beyond(assembled):
    assembler, _, _ = assembled
    assert assembler.add(_header("1.2.10", "a", frames=3), b"x" * 10)
    assert assembler.add(_header("1.2.11", "b", frames=2), b"x" * 10)
    assert not assembler.add(_header("1.2.12", "c"), b"x" * 10)  # 6 slices > total_slices=5: C-STORE 0xA700
    assert not assembler.add(_header("1.2.13", "d"), b"x" * 20_000)  # past total_bytes


def test_a_series_that_never_goes_quiet_is_processed_with_what_it_has(assembled):
    assembler, ready, clock = assembled
    before = _count("timed-out")
    for t in range(0, 62, 4):
        clock.now = float(t)
        assembler.add(_header(sop=f"1.2.9.{t % 3}"), b"x")
        assembler.reap()
    assert len(ready) == 1 and ready[0].outcome == "timed-out" and len(ready[0].instances) == 3
    assert _count("timed-out") == before + 1


def test_an_enhanced_mr_header_gives_each_frame_a_slice():
    header = read_instance_header(Path(get_testdata_file("emri_small.dcm")).read_bytes())
    assert header.frames == 10 and [g.frame_number for g in header.geometry] == list(range(1, 11))


# --- the listener, series mode ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Iterator[SeriesClassifier]:
    classifier = SeriesClassifier(build_model(tmp_path_factory.mktemp("m") / "m.onnx"), batch_size=4)
    yield classifier
    classifier.close()


def _read(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def test_the_listener_answers_each_series_with_one_sr_one_kos_and_key_overlays(classifier, tmp_path, caplog):
    sender = RecordingSender()
    processor = SeriesProcessor(classifier, sender, StudyTracker(sender.description, idle_s=0.3),
                                RetryPolicy(retries=1, backoff_s=0.01))
    listener = SeriesListener(ListenerOptions(port=0), processor, SeriesLimits(idle_s=0.5), tmp_path)
    study = "1.2.826.0.1.3680043.8.498.1"
    axial = series(synthetic_images(5), study_uid=study, name="axial")
    sagittal = series(synthetic_images(4), study_uid=study, name="sagittal", plane="sagittal")
    t2 = series(synthetic_images(3), study_uid=study, name="t2", headers=T2)
    enhanced = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    enhanced.StudyInstanceUID = study
    listener.start()
    try:
        with caplog.at_level(logging.INFO):
            assert _store(listener.port, [*axial, *sagittal, *t2, enhanced]) == [0] * 13
            _wait(lambda: len(sender.sent) == 4, 120)
    finally:
        listener.stop(30)
    by_series = {}
    for objects in sender.sent:
        datasets = [_read(o) for o in objects]
        assert all(dciodvfy_errors(o) == [] for o in objects)
        sr = datasets[0]
        assert sr.SOPClassUID == SR and sr.StudyInstanceUID == study and sr.PatientName in (SENTINEL_NAME, enhanced.PatientName)
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        by_series[str(evidence.SeriesInstanceUID)] = datasets
    axial_sr, axial_kos, *overlays = by_series[str(axial[0].SeriesInstanceUID)]
    report = hd.sr.srread(io.BytesIO(encode(axial_sr)))  # highdicom reads it back
    assert len(report.content.get_observations() if hasattr(report.content, "get_observations") else [1]) > 0
    assert len(axial_sr.ContentSequence[-1].ContentSequence) >= 1 + 5  # the series group, then one per slice
    assert axial_kos.SOPClassUID == KOS and {o.SOPClassUID for o in overlays} == {SC}
    kos_refs = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in axial_kos.ContentSequence
                if i.ValueType == "IMAGE"}
    assert kos_refs == {str(o.SourceImageSequence[0].ReferencedSOPInstanceUID) for o in overlays}
    assert 1 <= len(kos_refs) <= 5 and kos_refs <= {str(ds.SOPInstanceUID) for ds in axial}
    for ds in (sagittal, t2):  # outside the validated use: an SR saying not assessed, no KOS, no overlay
        (sr,) = by_series[str(ds[0].SeriesInstanceUID)]
        assert "not assessed" in sr_texts(sr)
    assert "Plane outside" in str(by_series[str(sagittal[0].SeriesInstanceUID)][0].to_json())
    frames = by_series[str(enhanced.SeriesInstanceUID)][0]  # 10 frames: 10 slice groups referencing frames
    assert '"00081160"' in frames.to_json()  # Referenced Frame Number
    assert "ordered by Instance Number" in sr_texts(frames)  # it has no positions: the SR says so
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("series ")]
    assert sum("complete: 5 instances" in x for x in lines) == 1 and sum("10 slices" in x for x in lines) >= 1
    assert SENTINEL_NAME not in caplog.text and study not in caplog.text
    assert not any(str(ds.SeriesInstanceUID) in caplog.text for ds in (axial[0], sagittal[0], t2[0]))



def test_listener_refuses_with_out_of_resources_past_the_overall_bounds(classifier, tmp_path):
    sender = RecordingSender()
    processor = SeriesProcessor(classifier, sender, StudyTracker(sender.description), RetryPolicy(retries=0))
    listener = SeriesListener(ListenerOptions(port=0), processor, SeriesLimits(idle_s=30, total_slices=2), tmp_path)
    listener.start()
    try:
        statuses = _store(listener.port, series(synthetic_images(3), study_uid="1.2.3", name="x"))
    finally:
        time.sleep(0.1)
        listener.stop(30)
    assert statuses == [0, 0, STATUS_OUT_OF_RESOURCES]
