"""The PACS round trip in series mode against a real Orthanc (issue 24): a modality C-STOREs a study of
three series (an axial FLAIR series of one lgg-tcga-flair test patient with a tumour, with proper
geometry; the same slices as a sagittal series; and as a T2 series), Orthanc's routing rule sends
each MR instance to the series-mode listener, and the study gets back exactly one SR per series, one
KOS for the one assessed series (flagging 1 to 5 key slices), and an overlay of each key slice; the sagittal and T2
series' SRs say not assessed and why. ``dciodvfy`` and highdicom read every result. Then ``btd dicomweb``'s
series mode fetches the study with QIDO/WADO-RS and stores another model's results with STOW-RS: a
localising model, so the assessed series also gets one DICOM Segmentation of its tumour region.
Skipped, with the reason, without Orthanc or the data set.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import highdicom as hd
import pydicom
import pytest

from app.core.contract import LocalisationSpec
from app.transports.pacs.assembly import SeriesLimits
from app.transports.pacs.dicomweb import process_study_series
from app.transports.pacs.listener import ListenerOptions, SeriesListener
from app.transports.pacs.processing import CStoreSender, DicomNode, RetryPolicy, StowSender, StudyTracker
from app.transports.pacs.results import encode, result_uid
from app.transports.pacs.series_processing import SeriesClassifier, SeriesProcessor
from tests.api.helpers import free_port
from tests.model_factory import build_model
from tests.pacs import orthanc
from tests.pacs.dicom_checks import (
    MR,
    SC,
    SENTINEL_NAME,
    SR,
    assert_no_sentinel,
    dciodvfy_errors,
    sr_texts,
    wait_for,
)
from tests.pacs.series_data import T2, lgg_images, series

pytestmark = pytest.mark.slow
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
STUDY = result_uid("series round trip study")


@pytest.fixture(scope="module")
def pacs(network, tmp_path_factory) -> Iterator[dict]:
    images, labels = lgg_images()  # skips without the data set
    folder = tmp_path_factory.mktemp("series-pacs")
    port = free_port()
    with orthanc.Orthanc(folder / "orthanc", btd_port=port) as server:
        sender = CStoreSender(DicomNode(server.ae_title, "127.0.0.1", server.dicom_port), "BTD")
        classifier = SeriesClassifier(build_model(folder / "model.onnx"), batch_size=4)
        processor = SeriesProcessor(classifier, sender, StudyTracker(sender.description, idle_s=1.0),
                                    RetryPolicy(retries=3, backoff_s=0.2))
        listener = SeriesListener(ListenerOptions(port=port, allowed_calling_aets=(server.ae_title,)), processor,
                                  SeriesLimits(idle_s=2.0), folder / "spill")
        listener.start()
        try:
            yield {"orthanc": server, "images": images, "labels": labels, "listener": listener}
        finally:
            listener.stop(60)
            classifier.close()


def _of(server: orthanc.Orthanc, sop_class: str) -> list[dict]:
    return [i for i in server.instances_of_study(STUDY) if i.get("SOPClassUID") == sop_class]



def test_a_routed_study_gets_one_sr_per_series_and_one_kos_per_assessed_series(pacs, caplog):
    server, images = pacs["orthanc"], pacs["images"]
    axial = series(images, study_uid=STUDY, name="axial flair")
    sagittal = series(images, study_uid=STUDY, name="sagittal flair", plane="sagittal")
    t2 = series(images, study_uid=STUDY, name="axial t2", headers=T2)
    with caplog.at_level(logging.INFO):
        CStoreSender(DicomNode(server.ae_title, "127.0.0.1", server.dicom_port), "MODALITY").send(
            [encode(ds) for ds in (*axial, *sagittal, *t2)])
        wait_for(lambda: len(_of(server, SR)) == 3 and len(_of(server, KOS)) == 1, 180, "3 SRs and 1 KOS in Orthanc",
                 lambda: server.log()[-3000:] + caplog.text[-3000:])
        kos = pydicom.dcmread(io.BytesIO(server.file(_of(server, KOS)[0]["ID"])))
        key = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in kos.ContentSequence
               if i.ValueType == "IMAGE"}
        wait_for(lambda: len(_of(server, SC)) == len(key), 60, "an overlay per key slice in Orthanc")
    assert len(_of(server, MR)) == 3 * len(images)
    srs = {}
    for found in _of(server, SR) + _of(server, KOS) + _of(server, SC):
        data = server.file(found["ID"])
        assert dciodvfy_errors(data) == [], found["SOPClassUID"]
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.StudyInstanceUID == STUDY and ds.PatientName == SENTINEL_NAME
        if ds.SOPClassUID == SR:
            hd.sr.srread(io.BytesIO(data))  # highdicom reads it back
            srs[str(ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID)] = ds
    axial_sr = srs[str(axial[0].SeriesInstanceUID)]
    assert "slices, " in sr_texts(axial_sr) and "most likely class" in sr_texts(axial_sr)
    assert len(axial_sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
               .ReferencedSOPSequence) == len(images)
    for other, reason in ((sagittal, "Plane outside"), (t2, "Sequence outside")):
        text = sr_texts(srs[str(other[0].SeriesInstanceUID)])
        assert "not assessed: no finding is reported" in text
        assert reason in srs[str(other[0].SeriesInstanceUID)].to_json()
    assert key <= {str(ds.SOPInstanceUID) for ds in axial} and 1 <= len(key) <= 5
    overlays = {str(pydicom.dcmread(io.BytesIO(server.file(i["ID"]))).SourceImageSequence[0].ReferencedSOPInstanceUID)
                for i in _of(server, SC)}
    assert overlays == key
    assert_no_sentinel(caplog.text)
    assert not any(uid in caplog.text for uid in (STUDY, str(axial[0].SeriesInstanceUID), str(t2[0].SOPInstanceUID)))


def test_dicomweb_fetches_the_study_series_by_series_and_stows_their_results(pacs, tmp_path):
    server = pacs["orthanc"]
    if len(_of(server, SR)) < 3:  # the study is there after the test above; make it so when run alone
        test_a_routed_study_gets_one_sr_per_series_and_one_kos_per_assessed_series(pacs, logging.getLogger())
    before = {i["SOPInstanceUID"] for i in _of(server, SR) + _of(server, KOS)}
    # A localising model that calls every assessed slice a tumour: the axial series gets a Segmentation.
    model = build_model(tmp_path / "other.onnx", seed=7, version="0.0.2-test", localisation=LocalisationSpec(0.5, 0.001))
    other = SeriesClassifier(model, batch_size=4, tumour_threshold=0.0)
    sender = StowSender(server.dicomweb_url)
    processor = SeriesProcessor(other, sender, StudyTracker(sender.description), RetryPolicy(retries=1))
    try:
        sent = process_study_series(server.dicomweb_url, STUDY, processor, SeriesLimits(), spill_dir=tmp_path)
    finally:
        other.close()
    assert sent == 3  # the three MR series; our own results (SR, KOS, SC) are not MR and are skipped
    new = [i for i in _of(server, SR) + _of(server, KOS) if i["SOPInstanceUID"] not in before]
    assert sorted(i["SOPClassUID"] for i in new) == sorted([SR, SR, SR, KOS])
    for found in new:
        ds = pydicom.dcmread(io.BytesIO(server.file(found["ID"])))
        assert ds.StudyInstanceUID == STUDY and (ds.SOPClassUID == KOS or str(ds.SoftwareVersions) == "0.0.2-test")
    (seg,) = _of(server, SEG)  # one per assessed series with a tumour: the axial one
    data = server.file(seg["ID"])
    assert dciodvfy_errors(data) == []
    read = hd.seg.segread(io.BytesIO(data))
    axial_uid = result_uid("test series", STUDY, "axial flair")  # as tests.pacs.series_data names it
    axial = {i["SOPInstanceUID"] for i in server.instances_of_study(STUDY)
             if i.get("SeriesInstanceUID") == axial_uid and i.get("SOPClassUID") == MR}
    sources = {uid for _, _, uid in read.get_source_image_uids()}
    assert read.StudyInstanceUID == STUDY and 1 <= read.NumberOfFrames == len(sources) and sources <= axial
