"""``btd predict --series DIR`` and NIfTI files given to ``btd predict`` (local mode, a test model)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from app.transports.cli.predict import main
from tests.api.test_api_series import enhanced_mr, mr
from tests.model_factory import build_model

nib = pytest.importorskip("nibabel")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "btd-test.onnx")


def test_a_dicom_series_folder_prints_its_slices_in_order_and_the_finding(tmp_path, model, capsys):
    folder = tmp_path / "series"
    folder.mkdir()
    received = [mr(10.0, 1), mr(-5.0, 3)]
    for i, (data, _) in enumerate(received):
        (folder / f"IM{i}").write_bytes(data)
    (folder / "notes.txt").write_text("not DICOM")  # ignored: a series folder holds its DICOM files
    assert main(["--series", str(folder), "--model", str(model), "--no-progress", "--format", "json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    series = record["series"]
    assert record["ok"] and series["source"] == "dicom" and series["ordering"] == "position"
    assert [s["instance_uid"] for s in series["slices"]] == [received[1][1], received[0][1]]
    assert series["finding"]["slices_assessed"] + series["finding"]["slices_not_assessed"] == 2

    assert main(["--series", str(folder), "--model", str(model), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert f"SERIES {folder} (dicom, 2 slices, ordered by position)" in table
    assert table.strip().splitlines()[-1].startswith("FINDING ")


def test_an_enhanced_mr_folder_gives_one_slice_per_frame(tmp_path, model, capsys):
    (tmp_path / "enh.dcm").write_bytes(enhanced_mr([4.0, 0.0])[0])
    assert main(["--series", str(tmp_path), "--model", str(model), "--no-progress", "--format", "json"]) == 0
    slices = json.loads(capsys.readouterr().out)[0]["series"]["slices"]
    assert [(s["frame_number"], s["position"]) for s in slices] == [(2, 0.0), (1, 4.0)]


def test_a_nifti_file_is_a_series_beside_images(tmp_path, model, capsys):
    data = np.random.default_rng(1).integers(0, 1000, (64, 64, 3)).astype(np.int16)
    volume = tmp_path / "brain.nii.gz"
    volume.write_bytes(gzip.compress(nib.Nifti1Image(data, np.eye(4)).to_bytes()))
    assert main([str(volume), "--model", str(model), "--no-progress", "--format", "json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["series"]["source"] == "nifti" and len(record["series"]["slices"]) == 3


def test_series_failures_are_reported_per_input(tmp_path, model, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one").write_bytes(mr(0.0, 1)[0])
    (tmp_path / "a" / "two").write_bytes(mr(1.0, 2, series_uid="1.2.3.4")[0])
    (tmp_path / "empty").mkdir()
    status = main(["--series", str(tmp_path / "a"), str(tmp_path / "empty"), "--model", str(model), "--no-progress"])
    captured = capsys.readouterr()
    assert status == 1
    assert "2 series" in captured.err and "no DICOM file in this folder" in captured.err
    bad = tmp_path / "bad.nii"
    bad.write_bytes(b"\0" * 400)
    assert main([str(bad), "--model", str(model), "--no-progress"]) == 1
    assert "NIfTI" in capsys.readouterr().err
    assert main([str(bad), "--model", str(model), "--no-progress", "--format", "csv"]) == 2
