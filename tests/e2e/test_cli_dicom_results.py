"""``btd predict --dicom-dir``: each DICOM input's SR and CAM overlay, written beside the usual output,
in local mode (no torch, no FastAPI importable) and against the running service."""

from __future__ import annotations

import json

import pytest

from tests.api.helpers import ServerProcess, png_bytes
from tests.e2e.test_cli_predict import WITHOUT_TORCH, run
from tests.model_factory import build_model
from tests.pacs.dicom_checks import dciodvfy_errors, mr_slice, read


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("model") / "model.onnx")


def _inputs(folder):
    folder.mkdir()
    (folder / "scan").write_bytes(mr_slice())  # DICOM without a suffix: recognised by its bytes
    (folder / "photo.png").write_bytes(png_bytes())
    return folder


def _check(out, tmp_path, records):
    by_file = {r["file"].rsplit("/", 1)[-1]: r for r in records}
    assert by_file["photo.png"]["ok"] and by_file["photo.png"]["dicom_files"] == []  # no DICOM source
    sr_path, sc_path = by_file["scan"]["dicom_files"]
    assert sr_path.endswith("scan.sr.dcm") and sc_path.endswith("scan.cam.dcm")
    source = read(mr_slice())
    for path in (sr_path, sc_path):
        data = (out / path.rsplit("/", 1)[-1]).read_bytes()
        assert dciodvfy_errors(data) == []
        assert read(data).StudyInstanceUID == source.StudyInstanceUID
    assert read((out / "scan.cam.dcm").read_bytes()).SourceImageSequence[0].ReferencedSOPInstanceUID == \
        source.SOPInstanceUID


def test_local_mode_writes_dicom_results(model_path, tmp_path):
    out = tmp_path / "out"
    done = run("predict", "--model", model_path, _inputs(tmp_path / "in"), "--dicom-dir", out, "--format", "json",
               "--no-progress", python_code=WITHOUT_TORCH)
    assert done.returncode == 0, done.stderr
    _check(out, tmp_path, json.loads(done.stdout))


@pytest.mark.slow
def test_url_mode_writes_dicom_results(model_path, tmp_path):
    out = tmp_path / "out"
    with ServerProcess(model_path) as server:
        done = run("predict", "--url", server.url, _inputs(tmp_path / "in"), "--dicom-dir", out, "--format", "json",
                   "--no-progress")
    assert done.returncode == 0, done.stderr
    _check(out, tmp_path, json.loads(done.stdout))
