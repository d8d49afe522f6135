"""The PACS round trip against a real Orthanc, in a private network namespace (loopback only):

Per-instance mode (``--mode instance``); series mode is tests/pacs/test_pacs_series_roundtrip.py.

1. a modality C-STOREs an MR study to Orthanc; Orthanc's routing rule (docs/pacs/route-mr-to-btd.lua)
   forwards each MR slice to ``btd dicom-listen``, which classifies it through the running service and
   C-STOREs the SR and the CAM overlay back; they appear in Orthanc referencing their slices;
2. ``btd dicomweb`` fetches the study with QIDO/WADO-RS, classifies it in process with another model
   and stores the results with STOW-RS.

Everything is started here and stopped here; the sentinel patient never reaches our logs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.transports.http.api_keys import key_line, new_key
from app.transports.pacs.processing import CStoreSender, DicomNode, study_key
from app.transports.pacs.results import result_uid
from tests.api.helpers import ServerProcess, free_port
from tests.model_factory import build_model
from tests.pacs import orthanc
from tests.pacs.dicom_checks import (
    SC,
    SR,
    assert_no_sentinel,
    dciodvfy_errors,
    log_text,
    mr_slice,
    read,
    wait_for,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BTD = [sys.executable, "-m", "app.transports.cli.btd"]
STUDY = result_uid("test study")
SERIES = result_uid("test series")
SLICES = [("MR_small.dcm", 1), ("MR_small_RLE.dcm", 2), ("MR2_UNCR.dcm", 3)]  # real MR pixels, one RLE-compressed


def _logs(pacs: dict) -> str:
    return (f"--- listener\n{log_text(pacs['log'])[-4000:]}\n--- service\n{pacs['service'].log()[-2000:]}"
            f"\n--- orthanc\n{pacs['orthanc'].log()[-4000:]}")


@pytest.fixture(scope="module")
def pacs(network, tmp_path_factory) -> Iterator[dict]:
    folder = tmp_path_factory.mktemp("pacs")
    model = build_model(folder / "model.onnx")
    listen_port = free_port()
    key = new_key()  # the service has API keys, as a hospital runs it; the listener holds one
    with orthanc.Orthanc(folder / "orthanc", btd_port=listen_port) as server, \
            ServerProcess(model, BTD_API_KEYS=key_line("pacs-router", key, ("predict",))) as service:
        log_path = folder / "listen.log"
        with open(log_path, "wb") as log:
            listener = subprocess.Popen(
                [*BTD, "dicom-listen", "--ae-title", "BTD", "--port", str(listen_port), "--url", service.url,
                 "--dest", f"{server.ae_title}@127.0.0.1:{server.dicom_port}", "--allow-aet", server.ae_title,
                 "--study-idle", "2", "--retries", "3", "--backoff", "0.2", "--mode", "instance"],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "BTD_API_KEY": key})
            try:
                wait_for(lambda: "dicom-listen: AE BTD" in log_text(log_path) or listener.poll() is not None, 60,
                         "the listener")
                assert listener.poll() is None, log_text(log_path)
                yield {"orthanc": server, "service": service, "listener": listener, "log": log_path,
                       "folder": folder}
            finally:
                listener.terminate()
                listener.wait(60)


def _store_study(server: orthanc.Orthanc) -> dict[str, str]:
    """C-STORE the study as a modality would; returns {source SOP Instance UID: file name}."""
    sources = {}
    objects = []
    for name, number in SLICES:
        sop = result_uid("test slice", name)
        objects.append(mr_slice(name, study_uid=STUDY, series_uid=SERIES, sop_uid=sop, number=number))
        sources[sop] = name
    CStoreSender(DicomNode(server.ae_title, "127.0.0.1", server.dicom_port), "MODALITY").send(objects)
    return sources


def _results(server: orthanc.Orthanc, sop_class: str) -> list[dict]:
    return [i for i in server.instances_of_study(STUDY) if i.get("SOPClassUID") == sop_class]


def test_orthanc_routes_a_study_through_the_listener_and_gets_sr_and_overlay_back(pacs):
    server = pacs["orthanc"]
    sources = _store_study(server)
    wait_for(lambda: len(_results(server, SR)) == len(SLICES) and len(_results(server, SC)) == len(SLICES), 90,
             "an SR and an overlay per slice in Orthanc", lambda: _logs(pacs))
    referenced = set()
    for found in _results(server, SR) + _results(server, SC):
        data = server.file(found["ID"])
        assert dciodvfy_errors(data) == []
        ds = read(data)
        assert ds.StudyInstanceUID == STUDY and ds.PatientID == read(mr_slice()).PatientID
        if ds.SOPClassUID == SR:
            evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
            assert evidence.SeriesInstanceUID == SERIES
            referenced.add(evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        else:
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in sources
    assert referenced == set(sources)
    # one clear line for the study, once it has gone quiet, and no patient data anywhere in our logs
    key = study_key(STUDY)
    line = wait_for(lambda: [x for x in log_text(pacs["log"]).splitlines() if f"study {key}:" in x], 30,
                    "the study's log line")
    assert len(line) == 1 and "3 received" in line[0] and "3 classified" in line[0] and "6 objects sent" in line[0]
    assert_no_sentinel(log_text(pacs["log"]), pacs["service"].log())
    assert not any(uid in log_text(pacs["log"]) + pacs["service"].log() for uid in (STUDY, SERIES, *sources))


def test_dicomweb_fetch_predict_and_stow(pacs):
    server = pacs["orthanc"]
    if not _results(server, SR):  # the study is there after the test above; make it so when run alone
        test_orthanc_routes_a_study_through_the_listener_and_gets_sr_and_overlay_back(pacs)
    before = {i["SOPInstanceUID"] for i in _results(server, SR)}
    other_model = build_model(pacs["folder"] / "other.onnx", seed=7, version="0.0.2-test")
    run = subprocess.run([*BTD, "dicomweb", "--wado-url", server.dicomweb_url, "--study", STUDY,
                          "--model", str(other_model), "--retries", "2", "--backoff", "0.2", "--mode", "instance"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    new_srs = [i for i in _results(server, SR) if i["SOPInstanceUID"] not in before]
    assert len(new_srs) == len(SLICES)
    for found in new_srs:
        ds = read(server.file(found["ID"]))
        assert str(ds.SoftwareVersions) == "0.0.2-test"
        assert ds.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == STUDY
    line = [x for x in run.stderr.splitlines() if f"study {study_key(STUDY)}:" in x]
    assert len(line) == 1 and "3 classified" in line[0] and "0 failed" in line[0], run.stderr[-2000:]
    assert_no_sentinel(run.stdout, run.stderr)
