"""The intended-use gate's rules (app.core.acquisition): the plane from Image Orientation (Patient) and
the sequence from the acquisition attributes, on real headers (pydicom's and pydicom-data's MR files)
and on synthetic ones for each plane and sequence; the validated use in the model's metadata."""

from __future__ import annotations

import math
import typing
import warnings

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from app.core.acquisition import (
    AXIAL_TOLERANCE_DEG,
    Acquisition,
    Plane,
    SequenceName,
    outside_validated,
    plane_of,
    read_acquisition,
    sequence_of,
    unchecked,
    validated_words,
)
from app.core.contract import (
    DEFAULT_VALIDATED,
    META_VALIDATED,
    PLANES,
    SEQUENCES,
    ModelMetadata,
    PreprocessSpec,
    ValidatedUse,
)


def _real(name: str) -> Dataset:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=True)


# --- real headers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,plane,sequence", [
    # pydicom's 64x64 crop: spin echo, TR 4000 ms, TE 240 ms, no contrast: T2 (in every encoding)
    ("MR_small.dcm", "axial", "t2"),
    ("MR_small_RLE.dcm", "axial", "t2"),
    ("MR_small_implicit.dcm", "axial", "t2"),
    # pydicom-data's shoulder slice: spin echo, TR 350 ms, TE 27 ms, no contrast agent; the normal lies
    # 35 degrees from the left-right axis ("T1W/SE" says its protocol name)
    ("MR2_UNCR.dcm", "oblique", "t1"),
    ("MR2_J2KI.dcm", "oblique", "t1"),
    # Siemens VIBE (gradient echo, TR 5.53 ms, TE 2.81 ms), Contrast/Bolus Agent "11 ml Omniscan", transverse
    ("examples_overlay.dcm", "axial", "t1post"),
    ("MR-SIEMENS-DICOM-WithOverlays.dcm", "axial", "t1post"),
    # Enhanced MR: Acquisition Contrast T1; its functional groups (and so the orientation) were stripped
    ("emri_small.dcm", None, "t1"),
    # pydicom's DICOMDIR test series (GE): a fast localizer (sagittal), a T/S/C pilot (coronal and axial
    # slices), time-of-flight angiography projections (Image Type PROJECTION IMAGE, oblique)
    ("4919", "sagittal", "other"),
    ("15820", "sagittal", "other"),
    ("4950", "coronal", "other"),
    ("4981", "axial", "other"),
    ("4467", "oblique", "other"),
    ("4558", "coronal", "other"),
])
def test_real_headers_give_their_plane_and_sequence(name, plane, sequence):
    ds = _real(name)
    assert (plane_of(ds), sequence_of(ds)) == (plane, sequence)
    assert read_acquisition(ds) == Acquisition(plane, sequence)


def test_real_headers_only_the_axial_t1_post_contrast_slice_passes_the_default_gate():
    gate = {name: outside_validated(read_acquisition(_real(name)), DEFAULT_VALIDATED)
            for name in ("MR_small.dcm", "MR2_UNCR.dcm", "examples_overlay.dcm", "emri_small.dcm", "4919", "4981")}
    assert gate == {"MR_small.dcm": ["sequence"], "MR2_UNCR.dcm": ["plane", "sequence"], "examples_overlay.dcm": [],
                    "emri_small.dcm": ["sequence"], "4919": ["plane", "sequence"], "4981": ["sequence"]}
    assert unchecked(read_acquisition(_real("emri_small.dcm"))) == ["plane"]


def test_every_mr_file_pydicom_and_pydicom_data_ship_is_read_and_only_the_axial_t1_post_contrast_passes():
    from pathlib import Path

    import pydicom.data

    # pydicom's own test files and pydicom-data's (found by one of its files: listing them through
    # get_testdata_files would try to download what is not installed)
    folders = [Path(pydicom.data.__file__).parent]
    external = get_testdata_file("MR2_UNCR.dcm")
    folders += [Path(external).parent] if external else []
    passing, seen = set(), 0
    for path in sorted(str(p) for folder in folders for p in folder.rglob("*") if p.is_file()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001, S112 - not DICOM, or deliberately broken test data
            continue
        if str(ds.get("Modality", "")) != "MR":
            continue
        seen += 1
        acquisition = read_acquisition(ds)
        if not outside_validated(acquisition, DEFAULT_VALIDATED):
            passing.add((path.rsplit("/", 1)[-1], acquisition.plane, acquisition.sequence))
    assert seen >= 20
    assert passing <= {("examples_overlay.dcm", "axial", "t1post"),
                       ("MR-SIEMENS-DICOM-WithOverlays.dcm", "axial", "t1post")}
    assert ("examples_overlay.dcm", "axial", "t1post") in passing


# --- synthetic planes -----------------------------------------------------------------------------

def _tilted(degrees: float, axis: str = "x") -> list[float]:
    """Image Orientation (Patient) of an axial slice tilted by ``degrees`` about the patient's x (left-
    right: towards coronal) or y (front-back: towards sagittal) axis."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    if axis == "x":
        return [1.0, 0.0, 0.0, 0.0, c, -s]
    return [c, 0.0, -s, 0.0, 1.0, 0.0]


def _oriented(cosines) -> Dataset:
    ds = Dataset()
    ds.ImageOrientationPatient = cosines
    return ds


@pytest.mark.parametrize("cosines,plane", [
    ([1, 0, 0, 0, 1, 0], "axial"),
    ([-1, 0, 0, 0, -1, 0], "axial"),  # flipped rows and columns: the same plane
    ([0, 1, 0, 0, 0, -1], "sagittal"),
    ([1, 0, 0, 0, 0, -1], "coronal"),
    (_tilted(15), "axial"),
    (_tilted(AXIAL_TOLERANCE_DEG - 1), "axial"),
    (_tilted(AXIAL_TOLERANCE_DEG - 1, "y"), "axial"),
    (_tilted(AXIAL_TOLERANCE_DEG + 1), "oblique"),
    (_tilted(45), "oblique"),
    (_tilted(45, "y"), "oblique"),
    (_tilted(70), "coronal"),
    (_tilted(75, "y"), "sagittal"),
    ([2, 0, 0, 0, 2, 0], None),  # not unit vectors
    ([1, 0, 0, 1, 0, 0], None),  # not orthogonal
    ([0, 0, 0, 0, 0, 0], None),
    ([1, 0, 0, 0, 1], None),
])
def test_plane_from_image_orientation(cosines, plane):
    assert plane_of(_oriented(cosines)) == plane


def test_plane_is_none_without_image_orientation():
    assert plane_of(Dataset()) is None


def test_plane_of_an_enhanced_mr_frame_comes_from_its_functional_groups():
    def group(cosines) -> Dataset:
        orientation, item = Dataset(), Dataset()
        orientation.ImageOrientationPatient = cosines
        item.PlaneOrientationSequence = [orientation]
        return item

    ds = Dataset()
    ds.PerFrameFunctionalGroupsSequence = [group([1, 0, 0, 0, 1, 0]), group([0, 1, 0, 0, 0, -1])]
    assert plane_of(ds, 0) == "axial" and plane_of(ds, 1) == "sagittal"
    shared = Dataset()
    shared.SharedFunctionalGroupsSequence = [group([1, 0, 0, 0, 0, -1])]
    assert plane_of(shared, 3) == "coronal"


# --- synthetic sequences --------------------------------------------------------------------------

def _mr(scanning=None, tr=None, te=None, ti=None, *, agent=None, description=None, **more) -> Dataset:
    ds = Dataset()
    if scanning is not None:
        ds.ScanningSequence = scanning
    for keyword, value in (("RepetitionTime", tr), ("EchoTime", te), ("InversionTime", ti),
                           ("ContrastBolusAgent", agent), ("SeriesDescription", description)):
        if value is not None:
            setattr(ds, keyword, value)
    for keyword, value in more.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize("ds,sequence", [
    # spin echo
    (_mr("SE", 500, 15), "t1"),
    (_mr("SE", 500, 15, agent="Gadovist 7.5 ml"), "t1post"),
    (_mr("SE", 500, 15, agent=""), "t1"),  # present but empty (type 2): no agent recorded
    (_mr("SE", 500, 15, agent="NONE"), "t1"),  # what some sites write when none was given
    (_mr("SE", 500, 15, agent="n/a"), "t1"),
    (_mr("SE", 4500, 100), "t2"),
    (_mr("SE", 4500, 100, agent="gadolinium"), "t2"),
    (_mr("SE", 2500, 15), "other"),  # proton density
    (_mr("SE", 1500, 45), "other"),  # intermediate
    (_mr(None, 600, 12), "t1"),  # no Scanning Sequence: read as spin echo
    # gradient echo
    (_mr("GR", 8, 3), "t1"),  # 3-D spoiled gradient echo
    (_mr("GR", 8, 3, agent="Dotarem"), "t1post"),
    (_mr("GR", 40, 25), "other"),  # T2* / susceptibility
    (_mr("GR", 500, 15), "other"),
    # inversion recovery
    (_mr(["IR", "SE"], 9000, 120, 2500), "flair"),
    (_mr(["IR", "SE"], 9000, 120, 2500, agent="gadolinium"), "flair"),
    (_mr(["SE", "IR"], 5000, 390, 1800), "flair"),  # 3-D FLAIR, long echo train
    (_mr(["GR", "IR"], 2300, 3, 900), "t1"),  # MPRAGE
    (_mr(["GR", "IR"], 2300, 3, 900, agent="gadolinium"), "t1post"),
    (_mr(["IR", "SE"], 2000, 20, 800), "t1"),  # T1-FLAIR
    (_mr(["IR", "SE"], 4000, 60, 150), "other"),  # STIR
    (_mr("SE", 9000, 120, 2500), "flair"),  # an inversion time says inversion recovery
    (_mr(["IR", "SE"], 9000, 120), None),  # no inversion time, no name: cannot say
    # echo planar, research mode
    (_mr(["EP", "SE"], 6000, 90), "other"),  # diffusion
    (_mr(["EP", "GR"], 1500, 30), "other"),  # perfusion / BOLD
    (_mr("RM", 500, 10), "other"),
])
def test_sequence_from_the_acquisition_attributes(ds, sequence):
    assert sequence_of(ds) == sequence


@pytest.mark.parametrize("description,sequence", [
    ("AX T1 SE", "t1"),
    ("T1 MPRAGE +C", "t1post"),
    ("AX T1 C+", "t1post"),
    ("t1_se_tra_KM", "t1post"),
    ("T1CE", "t1post"),
    ("T1 POST GAD", "t1post"),
    ("T1 pre", "t1"),
    ("T1 pre and post", "t1"),  # says both: the name decides nothing about contrast
    ("AX T2 TSE", "t2"),
    ("t2_tse_tra", "t2"),
    ("AX FLAIR", "flair"),
    ("t2_flair_tra", "flair"),
    ("T1 FLAIR", "t1"),
    ("DWI b1000", "other"),
    ("ADC", "other"),
    ("SWI", "other"),
    ("AX T2*", "other"),
    ("PD TSE", "other"),
    ("3-plane localizer", "other"),
    ("head routine", None),
    ("", None),
])
def test_series_description_is_the_last_resort(description, sequence):
    assert sequence_of(_mr(description=description)) == sequence


def test_protocol_name_stands_in_for_an_empty_series_description():
    assert sequence_of(_mr(description="", ProtocolName="t2_flair_tra")) == "flair"


def test_timing_outranks_the_series_description_and_contrast_words_still_count():
    assert sequence_of(_mr("SE", 4500, 100, description="AX T1")) == "t2"  # the physics, not the name
    assert sequence_of(_mr("SE", 500, 15, description="AX T1 POST")) == "t1post"  # no agent recorded, name says
    assert sequence_of(_mr("SE", 500, 15, description="AX T1 PRE", agent="gadolinium")) == "t1post"  # recorded


@pytest.mark.parametrize("more", [
    {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]},
    {"ImageType": ["DERIVED", "SECONDARY", "PROJECTION IMAGE"]},
    {"ImageType": ["DERIVED", "PRIMARY", "MIP"]},
    {"AngioFlag": "Y"},
    {"SeriesDescription": "SCOUT"},
])
def test_localisers_and_projections_are_other_whatever_their_timing(more):
    assert sequence_of(_mr("GR", 8, 3, agent="gadolinium", **more)) == "other"


def _enhanced(**top) -> Dataset:
    ds = _mr(**top)
    timing, echo, item = Dataset(), Dataset(), Dataset()
    timing.RepetitionTime = 550
    echo.EffectiveEchoTime = 12
    item.MRTimingAndRelatedParametersSequence = [timing]
    item.MREchoSequence = [echo]
    ds.SharedFunctionalGroupsSequence = [item]
    return ds


@pytest.mark.parametrize("ds,sequence", [
    (_mr(AcquisitionContrast="T1"), "t1"),
    (_mr(AcquisitionContrast="T2"), "t2"),
    (_mr(AcquisitionContrast="FLUID_ATTENUATED"), "flair"),
    (_mr(AcquisitionContrast="DIFFUSION"), "other"),
    (_mr(AcquisitionContrast="PROTON_DENSITY"), "other"),
    (_mr(AcquisitionContrast="UNKNOWN"), None),
    (_mr(AcquisitionContrast="T1", ImageType=["ORIGINAL", "PRIMARY", "POST_CONTRAST", "NONE"]), "t1post"),
    (_enhanced(EchoPulseSequence="SPIN", AcquisitionContrast="MIXED"), "t1"),  # timing in the shared groups
    (_enhanced(EchoPulseSequence="GRADIENT"), "other"),  # gradient echo, TE 12 ms
])
def test_enhanced_mr_acquisition_contrast_and_functional_groups(ds, sequence):
    assert sequence_of(ds) == sequence


def test_enhanced_mr_contrast_usage_with_an_agent_administered_is_post_contrast():
    ds = _enhanced(EchoPulseSequence="SPIN")
    usage = Dataset()
    usage.ContrastBolusAgentAdministered = "YES"
    ds.SharedFunctionalGroupsSequence[0].ContrastBolusUsageSequence = [usage]
    assert sequence_of(ds) == "t1post"
    usage.ContrastBolusAgentAdministered = "NO"
    assert sequence_of(ds) == "t1"


def test_malformed_numbers_do_not_raise_and_say_nothing():
    ds = _mr("SE", description="")
    ds.add_new(0x00180080, "DS", None)  # Repetition Time present but empty
    assert sequence_of(ds) is None


# --- the gate and the validated use ---------------------------------------------------------------

@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize("sequence", SEQUENCES)
def test_default_gate_assesses_axial_t1_post_contrast_and_flair_only(plane, sequence):
    reasons = outside_validated(Acquisition(plane, sequence), DEFAULT_VALIDATED)  # type: ignore[arg-type]
    expected = ([] if plane == "axial" else ["plane"]) + ([] if sequence in ("t1post", "flair") else ["sequence"])
    assert reasons == expected


def test_what_the_headers_do_not_say_is_a_warning_not_a_reason():
    assert outside_validated(Acquisition(None, None), DEFAULT_VALIDATED) == []
    assert unchecked(Acquisition(None, None)) == ["plane", "sequence"]
    assert unchecked(Acquisition("axial", "flair")) == [] and unchecked(None) == []
    assert outside_validated(None, DEFAULT_VALIDATED) == []  # PNG, JPEG, another modality: no headers read


def test_names_agree_between_the_rules_and_the_contract():
    assert typing.get_args(Plane) == PLANES and typing.get_args(SequenceName) == SEQUENCES
    assert validated_words(DEFAULT_VALIDATED) == ("axial", "T1 post-contrast and FLAIR")


def test_validated_use_round_trips_through_the_model_metadata_and_older_models_get_the_default():
    wider = ValidatedUse(planes=("axial",), sequences=("t1", "t1post", "flair"))
    meta = ModelMetadata(labels=("a", "notumor"), preprocess=PreprocessSpec(), cam_weight="w", cam_bias="b",
                         validated=wider)
    props = meta.to_props()
    assert ModelMetadata.from_props(props).validated == wider
    del props[META_VALIDATED]
    assert ModelMetadata.from_props(props).validated == DEFAULT_VALIDATED == ValidatedUse(("axial",), ("t1post", "flair"),
                                                                                          ("flair",))
    assert outside_validated(Acquisition("axial", "t1"), wider) == []


def test_validated_use_refuses_unknown_names():
    with pytest.raises(ValueError):
        ValidatedUse(planes=("transverse",))
    with pytest.raises(ValueError):
        ValidatedUse(sequences=("dwi",))


def test_the_model_card_states_the_default_validated_use():
    from pathlib import Path

    card = (Path(__file__).resolve().parents[2] / "models" / "MODEL_CARD.md").read_text()
    planes, sequences = validated_words(DEFAULT_VALIDATED)
    assert f"### Validated for: {planes} {sequences}" in card
