"""Reading DICOM under limits (app.core.dicom_read): deflate, element count at every nesting
level, multi-valued value sizes; and the results' header, which must give the same DICOM results
as the whole source header."""

from __future__ import annotations

import io

import pydicom
import pytest

from app.core.decode import decode
from app.core.dicom_read import (
    MAX_ELEMENTS,
    RESULTS_KEYWORDS,
    element_limits,
    read_dataset,
)
from app.core.errors import DecodeTooCostly, PayloadTooLarge
from app.engine.engine import Engine
from app.transports.pacs.results import build_results, encode
from tests.hostile_inputs import (
    deflated_dicom_bomb,
    dicom_element_bomb,
    dicom_multivalue_bomb,
    dicom_nested_element_bomb,
)
from tests.model_factory import build_model
from tests.pacs.dicom_checks import SENTINEL_NAME, mr_slice

ELEMENTS = MAX_ELEMENTS + 1000


def test_many_elements_are_refused_before_pydicom_holds_them():
    with pytest.raises(DecodeTooCostly) as error:
        decode(dicom_element_bomb(ELEMENTS))
    assert error.value.status == 422 and str(MAX_ELEMENTS) in error.value.detail


def test_elements_in_an_undefined_length_sequence_are_counted():
    with pytest.raises(DecodeTooCostly):
        decode(dicom_nested_element_bomb(ELEMENTS, defined_length=False))


def test_elements_in_a_sequence_read_lazily_are_counted_when_it_is_read():
    data = dicom_nested_element_bomb(ELEMENTS)
    assert decode(data).pixels.shape == (64, 64)  # the pixels never read the sequence
    with pytest.raises(DecodeTooCostly):
        decode(data, source=True)  # the results copy it: read, and counted


def test_a_huge_multi_valued_element_is_refused_without_quoting_it():
    with pytest.raises(DecodeTooCostly) as error:
        decode(dicom_multivalue_bomb(200_000))
    assert "WindowCenter" in error.value.detail and "1\\1" not in error.value.detail


def test_a_deflated_bomb_is_refused_before_pydicom_inflates_it():
    with pytest.raises(PayloadTooLarge):
        decode(deflated_dicom_bomb(256 << 20), source=True)


def test_the_limits_hold_only_inside_element_limits():
    data = dicom_element_bomb(ELEMENTS)
    assert len(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)) > MAX_ELEMENTS  # pydicom itself: unlimited
    with element_limits(), pytest.raises(DecodeTooCostly):
        read_dataset(data, 4096 * 4096, stop_before_pixels=True)
    with element_limits():  # a new budget for each read
        assert read_dataset(mr_slice(), 4096 * 4096).Rows == 64


def test_results_keywords_cover_what_highdicom_copies():
    from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map

    modules, iods = get_module_attribute_map(), get_iod_module_map()
    copied = {item["keyword"] for iod in set(get_sop_class_iod_map().values()) for module in iods[iod]
              if module["ie"] in ("Patient", "Study") for item in modules[module["key"]] if not item["path"]}
    copied |= {item["keyword"] for item in modules["general-equipment"] if not item["path"]}
    assert copied <= RESULTS_KEYWORDS, sorted(copied - RESULTS_KEYWORDS)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Engine:
    return Engine.load_single(build_model(tmp_path_factory.mktemp("m") / "m.onnx"))


@pytest.mark.parametrize("name", ["MR2_UNCR.dcm", "MR_small.dcm", "CT_small.dcm"])
def test_results_from_the_header_equal_results_from_the_whole_source(predictor, name):
    data = mr_slice(name)
    full = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    decoded = decode(data, source=True)
    assert decoded.source.PatientName == SENTINEL_NAME and "PixelData" not in decoded.source
    finding = predictor.predict(data, cam="png")
    expected = [without_times(ds) for ds in build_results(full, finding)]
    assert [without_times(ds) for ds in build_results(decoded.source, finding)] == expected


CREATION_TIMES = ("InstanceCreationTime", "ContentTime", "TimeOfSecondaryCapture", "ContributionDateTime")


def without_times(ds) -> bytes:
    """The object's Part 10 bytes with the times it was made at blanked."""
    ds = pydicom.dcmread(io.BytesIO(encode(ds)))

    def blank(dataset) -> None:
        for element in dataset:
            if element.keyword in CREATION_TIMES:
                element.value = ""
            elif element.VR == "SQ":
                for item in element.value:
                    blank(item)

    blank(ds)
    return encode(ds)
