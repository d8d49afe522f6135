"""Series mode: slices classified while their series still arrives (``ClassifyAhead``) give the same
results as a series classified once complete, whatever order the slices come in; a series dropped for
its bounds keeps nothing of what was classified; a slice sent twice is classified once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.transports.pacs import classify_ahead
from app.transports.pacs.assembly import HeldSeries, SeriesAssembler, SeriesLimits
from app.transports.pacs.classify_ahead import ClassifyAhead
from app.transports.pacs.results import encode
from app.transports.pacs.series_processing import SeriesClassifier, core_aggregate
from app.transports.pacs.series_results import ClassifiedSeries, build_series_sr
from tests.model_factory import build_model
from tests.pacs.series_data import series, synthetic_images
from tests.unit.test_pacs_listener import _wait
from tests.unit.test_pacs_series import _header

BATCH = 4


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Iterator[SeriesClassifier]:
    classifier = SeriesClassifier(build_model(tmp_path_factory.mktemp("m") / "m.onnx"), batch_size=BATCH)
    yield classifier
    classifier.close()


@pytest.fixture(scope="module")
def instances(classifier) -> list[tuple]:
    """Eleven axial slices (two full batches and a partial one), in slice order: (header, bytes)."""
    encoded = [encode(ds) for ds in series(synthetic_images(11, 64), study_uid="1.2.826.0.1.3680043.8.498.7",
                                            name="ahead", shuffle=False)]
    return [(classifier.read_header(data, 10**7), data) for data in encoded]


def _complete(classifier, instances, tmp_path, ahead: bool) -> tuple[HeldSeries, SeriesAssembler, ClassifyAhead]:
    ready: list[HeldSeries] = []
    worker = ClassifyAhead(classifier, BATCH)
    assembler = SeriesAssembler(SeriesLimits(), ready.append, tmp_path, on_held=worker.notify if ahead else None)
    worker.start(assembler)
    for header, data in instances:
        assert assembler.add(header, data)
    if ahead:  # every full batch classified before the series is complete
        _wait(lambda: assembler._open and len(next(iter(assembler._open.values())).classified) == 8)
    assembler.flush()
    (held,) = ready
    return held, assembler, worker


def test_slices_classified_while_arriving_give_the_results_of_a_series_classified_once_complete(
        classifier, instances, tmp_path):
    at_end, at_end_assembler, at_end_worker = _complete(classifier, instances, tmp_path / "end", ahead=False)
    assert at_end.classified == {}
    shuffled = [instances[i] for i in (7, 2, 10, 0, 5, 9, 1, 4, 8, 3, 6)]
    shuffled[6:6] = [instances[2], instances[9]]  # a retry: each sent again, held and classified once
    ahead, assembler, worker = _complete(classifier, shuffled, tmp_path / "ahead", ahead=True)
    assert len(ahead.instances) == 11 and len(ahead.waiting) == 3  # the last partial batch, left for the end
    try:
        expected, expected_unread, expected_order = classifier.classify(at_end)
        got, unread, order = classifier.classify(ahead)
    finally:
        for a, w, s in ((at_end_assembler, at_end_worker, at_end), (assembler, worker, ahead)):
            a.release(s)
            w.stop()
            a.close()
    assert (unread, order) == (expected_unread, expected_order) == (0, "position")
    uids = lambda slices: [str(s.source.SOPInstanceUID) for s in slices]
    assert uids(got) == uids(expected) == [h.sop_uid for h, _ in instances]  # slice order, not arrival order
    for g, e in zip(got, expected, strict=True):
        assert g.prediction.label == e.prediction.label
        assert g.prediction.probabilities == pytest.approx(e.prediction.probabilities, abs=1e-5)
        assert g.sr_item is not None  # its SR group made with it
    finding, expected_finding = (core_aggregate([s.prediction for s in x]) for x in (got, expected))
    assert finding.key_slices == expected_finding.key_slices and finding.label == expected_finding.label


def test_a_series_dropped_while_classified_ahead_keeps_nothing(classifier, instances, tmp_path):
    ready: list[HeldSeries] = []
    worker = ClassifyAhead(classifier, BATCH)
    assembler = SeriesAssembler(SeriesLimits(idle_s=0.01, max_slices=6), ready.append, tmp_path, on_held=worker.notify)
    worker.start(assembler)
    try:
        for header, data in instances[:4]:
            assembler.add(header, data)
        (held,) = assembler._open.values()
        _wait(lambda: len(held.classified) == 4)
        for header, data in instances[4:8]:  # the seventh slice passes max_slices=6: dropped
            assert assembler.add(header, data)
        assert held.dropped and held.classified == {} and held.waiting == [] and held.instances == []
        assert assembler.held_slices == 0 and not any(assembler.folder.iterdir())
        assembler.reap(held.last + 1)
        assert ready == []
    finally:
        worker.stop()
        assembler.close()


def test_a_batch_classified_when_its_series_is_dropped_is_discarded(tmp_path):
    assembler = SeriesAssembler(SeriesLimits(max_slices=5), lambda s: None, tmp_path)
    for i in range(4):
        assembler.add(_header(sop=f"1.2.9.{i}"), b"x")
    (held,) = assembler._open.values()
    batch = assembler.take_batch(held, 4)
    assert [i.header.sop_uid for i, _ in batch] == [f"1.2.9.{i}" for i in range(4)] and held.waiting == []
    assert assembler.take_batch(held, 4) == []  # nothing more waiting
    for i in range(4, 6):  # the sixth slice drops it while the batch is being classified
        assembler.add(_header(sop=f"1.2.9.{i}"), b"x")
    assert not assembler.keep(held, {("1.2.9.0", None): None}) and held.classified == {}
    assembler.close()


def test_a_series_handed_on_gives_no_more_batches_ahead(tmp_path):
    ready: list[HeldSeries] = []
    notified: list[HeldSeries] = []
    assembler = SeriesAssembler(SeriesLimits(), ready.append, tmp_path, on_held=notified.append)
    for i in range(3):
        assembler.add(_header(sop=f"1.2.9.{i}"), b"x")
    assembler.add(_header(sop="1.2.9.1"), b"x")  # a resend: not held, nothing new to classify
    assert len(notified) == 3 and len(notified[0].waiting) == 3
    assembler.flush()
    assert ready[0].handed_on and assembler.take_batch(ready[0], 1) == []
    assert assembler.keep(ready[0], {("1.2.9.0", None): None})  # the batch in flight when it was handed on
    assembler.close()


def test_multi_frame_instances_wait_one_slice_per_frame(tmp_path):
    assembler = SeriesAssembler(SeriesLimits(), lambda s: None, tmp_path)
    assembler.add(_header(sop="1.2.9.1", frames=3), b"x")
    (held,) = assembler._open.values()
    assert [frame for _, frame in held.waiting] == [0, 1, 2]
    assembler.close()


def test_sr_groups_are_built_ahead_only_within_their_bound(classifier, instances, tmp_path, monkeypatch):
    monkeypatch.setattr(classify_ahead, "SR_ITEMS_AHEAD_SLICES", 5)  # 8 slices held when the first batch runs
    held, assembler, worker = _complete(classifier, instances, tmp_path, ahead=True)
    try:
        assert len(held.classified) == 8 and all(r[0].sr_item is None for r in held.classified.values())
        slices, _, ordering = classifier.classify(held)
        result = ClassifiedSeries(slices, core_aggregate([s.prediction for s in slices]), 0, ordering)
        (sr,) = build_series_sr(result)  # the groups not built ahead are built now
        assert len(sr.ContentSequence[-1].ContentSequence) >= 1 + 11
    finally:
        assembler.release(held)
        worker.stop()
        assembler.close()
