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
    three = ("t1post", "flair", "t2")
    assert wider.describe()["validated_for"] == {"planes": ("axial", "sagittal"), "sequences": three,
                                                 "specific_sequences": three}
    assert plain.describe()["validated_for"] == {"planes": ("axial",), "sequences": ("t1post", "flair"),
                                                 "specific_sequences": ("flair",)}


T1_POST = {"ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "ScanningSequence": "SE", "RepetitionTime": 500,
           "EchoTime": 15, "ContrastBolusAgent": "gadolinium"}
FLAIR = {"ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "ScanningSequence": ["IR", "SE"], "RepetitionTime": 9000,
         "EchoTime": 120, "InversionTime": 2500}


@pytest.fixture(scope="module")
def calls_tumour(tmp_path_factory) -> Engine:
    """The release 1.2.0 validated use (tumour call specific on FLAIR only) with a threshold of 0, so
    every assessed slice is called tumour."""
    folder = tmp_path_factory.mktemp("specific")
    plain = Engine.load_single(build_model(folder / "plain.onnx"))
    meta = ModelMetadata(labels=plain.metadata.labels, preprocess=plain.metadata.preprocess, cam_weight="fc.weight",
                         cam_bias="fc.bias", tumour_threshold=0.0)
    return Engine.load_single(build_model(folder / "always.onnx", metadata=meta))


def test_a_tumour_call_on_a_sequence_where_it_is_not_specific_says_so(calls_tumour):
    t1post = calls_tumour.predict(mr2(**T1_POST))
    assert t1post.acquisition == Acquisition("axial", "t1post") and t1post.tumour_detected is True
    (warning,) = [w for w in t1post.warnings if "not for telling whether there is one" in w]
    assert "tumour is called on a T1 post-contrast slice" in warning
    flair = calls_tumour.predict(mr2(**FLAIR))
    assert flair.acquisition == Acquisition("axial", "flair") and flair.tumour_detected is True
    assert not any("not for telling" in w for w in flair.warnings)


@pytest.mark.parametrize("sequence,tumour_detected,warned", [
    ("t1post", True, True), ("t1post", False, False), ("t1post", None, False),  # no call, or not assessed
    ("flair", True, False), (None, True, False),  # specific there; the headers do not say
    ("t2", True, False),  # outside the validated use: not assessed, the gate's warning says why
])
def test_specificity_warning_only_for_a_tumour_called_on_a_validated_non_specific_sequence(
        sequence, tumour_detected, warned):
    from app.core.contract import DEFAULT_VALIDATED
    from app.engine.pipeline import specificity_warnings

    said = specificity_warnings(Acquisition("axial", sequence), DEFAULT_VALIDATED, tumour_detected)
    assert bool(said) is warned
    assert specificity_warnings(Acquisition("axial", sequence), ValidatedUse(), tumour_detected) == []  # all specific


def test_specific_sequences_are_validated_ones_and_travel_in_the_metadata():
    use = ValidatedUse(sequences=("t1", "flair"), specific_sequences=("flair",))
    assert ValidatedUse.from_json(use.to_json()) == use and use.specific == ("flair",)
    assert ValidatedUse(sequences=("t1", "flair")).specific == ("t1", "flair")
    older = '{"planes": ["axial"], "sequences": ["t1post", "flair"]}'  # written before specific_sequences
    assert ValidatedUse.from_json(older).specific == ("t1post", "flair")
    with pytest.raises(ValueError, match="specific_sequences must be validated"):
        ValidatedUse(sequences=("flair",), specific_sequences=("t1post",))
