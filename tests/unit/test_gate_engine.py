"""The intended-use gate in the engine: ``prepare`` reads the plane and sequence of an MR DICOM before
the model runs, the model's own validated use (its metadata) decides, and the answer says why."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.data import get_testdata_file

from app.core.acquisition import Acquisition
from app.core.contract import ModelMetadata, PreprocessSpec, ValidatedUse
from app.core.result import GATE_PHRASE
from app.engine.engine import Engine
from app.engine.pipeline import PrepareOptions, prepare
from tests.model_factory import build_model

SPEC = PreprocessSpec(size=32)
SAGITTAL_T2 = {"ImageOrientationPatient": [0, 1, 0, 0, 0, -1], "RepetitionTime": 4500, "EchoTime": 100}


def mr2(**headers) -> bytes:
    path = get_testdata_file("MR2_UNCR.dcm")
    if path is None:
        pytest.skip("MR2_UNCR.dcm is not installed (pydicom-data)")
    ds = pydicom.dcmread(path)
    for keyword, value in headers.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_prepare_reads_the_headers_and_gives_the_gate_reasons_before_the_model():
    prepared = prepare(mr2(**SAGITTAL_T2), None, PrepareOptions(SPEC))
    assert prepared.acquisition == Acquisition("sagittal", "t2")
    assert prepared.outside == ["plane", "sequence"] and prepared.image_reasons[:2] == ["plane", "sequence"]


def test_a_wider_validated_use_in_the_options_lets_the_slice_through():
    wider = ValidatedUse(planes=("axial", "sagittal"), sequences=("t1post", "flair", "t2"))
    prepared = prepare(mr2(**SAGITTAL_T2), None, PrepareOptions(SPEC, validated=wider))
    assert prepared.outside == [] and not {"plane", "sequence"} & set(prepared.image_reasons)


def test_non_mr_dicom_is_refused_for_its_modality_only():
    prepared = prepare(mr2(Modality="CT", **SAGITTAL_T2), None, PrepareOptions(SPEC))
    assert prepared.acquisition is None and prepared.outside == [] and prepared.image_reasons[:1] == ["modality"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> tuple[Engine, Engine]:
    folder = tmp_path_factory.mktemp("gate")
    plain = Engine.load_single(build_model(folder / "plain.onnx"))
    meta = ModelMetadata(labels=plain.metadata.labels, preprocess=plain.metadata.preprocess, cam_weight="fc.weight",
                         cam_bias="fc.bias", validated=ValidatedUse(("axial", "sagittal"), ("t1post", "flair", "t2")))
    return plain, Engine.load_single(build_model(folder / "wider.onnx", metadata=meta))


def test_the_model_metadata_decides_what_is_assessed(engines):
    plain, wider = engines
    data = mr2(**SAGITTAL_T2)
    refused = plain.predict(data)
    assert not refused.assessed and refused.tumour_detected is None
    assert refused.ood_reasons[:2] == ["plane", "sequence"] and refused.acquisition == Acquisition("sagittal", "t2")
    (warning,) = [w for w in refused.warnings if w.startswith(GATE_PHRASE)]
    assert "the plane is sagittal" in warning and "the sequence is T2" in warning
    assert "validated on axial slices" in warning and "validated on T1 post-contrast and FLAIR" in warning
    accepted = wider.predict(data)
    assert not {"plane", "sequence"} & set(accepted.ood_reasons) and accepted.acquisition == refused.acquisition
    assert not any(w.startswith(GATE_PHRASE) for w in accepted.warnings)
    assert wider.describe()["validated_for"] == {"planes": ("axial", "sagittal"), "sequences": ("t1post", "flair", "t2")}
    assert plain.describe()["validated_for"] == {"planes": ("axial",), "sequences": ("t1post", "flair")}
