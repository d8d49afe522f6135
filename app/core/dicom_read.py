"""Reading a client's (or a PACS's) DICOM bytes under limits, for every path that parses them: the
pixel decode, the DICOM-results path (``format=dicom``), ``btd dicom-listen`` and ``btd dicomweb``.
It runs where the host runs DICOM decoding: in an isolated worker process with its address-space and
time limits (``app.engine.host``), never in the server's or the listener's own process.

What pydicom would otherwise do without bound, and the limit put on it first:

- a Deflated Explicit VR dataset is inflated whole (a 1 MB file can inflate to 1 GiB): it is inflated
  once in pieces first, keeping nothing, and refused past what the largest admissible image needs;
- every data element and sequence item becomes a Python object of a few hundred bytes (8 bytes on the
  wire: a 32 MiB body holds 4 million): at most ``MAX_ELEMENTS`` are read, at every nesting level;
- a multi-valued element becomes one Python object per value (``1\\1\\1...`` in a DS: 200 bytes of
  memory per 2 bytes sent): such values are refused past ``MAX_TEXT_VALUE_BYTES`` /
  ``MAX_NUMBER_VALUE_BYTES`` (bulk data, OB/OW/UN/UT..., is read as bytes and is not limited here).

Also here: the header facts the DICOM results need of their source (``results_header``), a small
dataset of the attributes they copy, so that the results are built from it without the source file.
No DICOM tag value is ever put into a message (patient data).
"""

from __future__ import annotations

import contextlib
import io
import threading
import zlib
from collections.abc import Iterator

from app.core.errors import DecodeTooCostly, InvalidImage, PayloadTooLarge

# Data elements plus sequence items one file may hold (every nesting level). Real MR headers hold a few
# thousand; 100,000 empty ones cost pydicom about 60 MiB and 0.3 s.
MAX_ELEMENTS = 100_000
# Values pydicom converts into one Python object per value: text with a value multiplicity (64 KiB of
# "1\" in a DS is ~13 MiB once converted) and binary numbers (256 KiB: a 16-bit LUT of 65,536 entries fits).
MULTI_VALUED_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC", "UI"})
NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT"})
MAX_TEXT_VALUE_BYTES = 64 * 1024
MAX_NUMBER_VALUE_BYTES = 256 * 1024
# Bytes a deflated dataset may inflate to: the largest admissible frame (3 samples of 2 bytes per
# pixel) plus room for the other elements. pydicom inflates the whole dataset at once, unbounded.
DEFLATED_BYTES_PER_PIXEL = 6
DEFLATED_EXTRA_BYTES = 1 << 20
DEFLATED_UID = "1.2.840.10008.1.2.1.99"
# The attributes of the source that DICOM results copy or read (app.transports.pacs.results, through highdicom): the
# root attributes of the Patient and Study information entities' modules of every IOD highdicom knows,
# the General Equipment module and acquisition time (Contributing Equipment), and what the results
# themselves read. tests/unit/test_dicom_read.py checks this list against highdicom's module tables.
RESULTS_KEYWORDS = frozenset({
    # SOP common, series and image attributes the results read
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "InstanceNumber", "ImageOrientationPatient", "Laterality", "AcquisitionDateTime", "AcquisitionDate",
    "AcquisitionTime",
    # image pixel description: highdicom checks that a source is an image with some of them
    "Rows", "Columns", "SamplesPerPixel", "PixelRepresentation", "NumberOfFrames", "BitsAllocated",
    "PhotometricInterpretation",
    # the slice's frame in the patient: a Segmentation of the tumour region lies on it (pacs.segmentation)
    "FrameOfReferenceUID", "PositionReferenceIndicator", "ImagePositionPatient", "PixelSpacing", "SliceThickness",
    "SpacingBetweenSlices",
    # General Equipment
    "Manufacturer", "InstitutionName", "InstitutionAddress", "StationName", "InstitutionalDepartmentName",
    "InstitutionalDepartmentTypeCodeSequence", "ManufacturerModelName", "DeviceSerialNumber", "DeviceUID",
    "GantryID", "UDISequence", "ManufacturerDeviceClassUID", "SoftwareVersions", "SpatialResolution",
    "DateOfLastCalibration", "TimeOfLastCalibration", "DateOfManufacture", "DateOfInstallation",
    "PixelPaddingValue",
    # Patient, Clinical Trial Subject, General Study, Patient Study, Clinical Trial Study
    "AccessionNumber", "AdditionalPatientHistory", "AdmissionID", "AdmittingDiagnosesCodeSequence",
    "AdmittingDiagnosesDescription", "Allergies", "BreedRegistrationSequence",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber", "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolID", "ClinicalTrialProtocolName", "ClinicalTrialSiteID", "ClinicalTrialSiteName",
    "ClinicalTrialSponsorName", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    "ClinicalTrialTimePointDescription", "ClinicalTrialTimePointID", "ClinicalTrialTimePointTypeCodeSequence",
    "ConsentForClinicalTrialUseSequence", "ConsultingPhysicianIdentificationSequence", "ConsultingPhysicianName",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence", "EthnicGroupCodeSequence",
    "GeneticModificationsSequence", "GroupOfPatientsIdentificationSequence", "IssuerOfAccessionNumberSequence",
    "IssuerOfAdmissionIDSequence", "IssuerOfClinicalTrialProtocolID", "IssuerOfClinicalTrialSiteID",
    "IssuerOfClinicalTrialSubjectID", "IssuerOfClinicalTrialSubjectReadingID", "IssuerOfClinicalTrialTimePointID",
    "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "IssuerOfServiceEpisodeIDSequence",
    "LastMenstrualDate", "LongitudinalTemporalEventType", "LongitudinalTemporalOffsetFromEvent",
    "MeasuredAPDimension", "MeasuredLateralDimension", "MedicalAlerts", "NameOfPhysiciansReadingStudy",
    "Occupation", "OtherClinicalTrialProtocolIDsSequence", "OtherPatientIDsSequence", "OtherPatientNames",
    "PatientAge", "PatientAlternativeCalendar", "PatientBirthDate", "PatientBirthDateInAlternativeCalendar",
    "PatientBirthTime", "PatientBodyMassIndex", "PatientBreedCodeSequence", "PatientBreedDescription",
    "PatientComments", "PatientDeathDateInAlternativeCalendar", "PatientID", "PatientIdentityRemoved",
    "PatientName", "PatientSex", "PatientSexNeutered", "PatientSize", "PatientSizeCodeSequence",
    "PatientSpeciesCodeSequence", "PatientSpeciesDescription", "PatientState", "PatientWeight",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "PhysiciansReadingStudyIdentificationSequence", "PregnancyStatus", "ProcedureCodeSequence",
    "QualityControlSubject", "ReasonForPerformedProcedureCodeSequence", "ReasonForVisit",
    "ReasonForVisitCodeSequence", "ReferencedPatientPhotoSequence", "ReferencedPatientSequence",
    "ReferencedStudySequence", "ReferringPhysicianIdentificationSequence", "ReferringPhysicianName",
    "RequestingService", "RequestingServiceCodeSequence", "ResponsibleOrganization", "ResponsiblePerson",
    "ResponsiblePersonRole", "ServiceEpisodeDescription", "ServiceEpisodeID", "SmokingStatus",
    "SourcePatientGroupIdentificationSequence", "StrainAdditionalInformation", "StrainCodeSequence",
    "StrainDescription", "StrainNomenclature", "StrainStockSequence", "StudyDate", "StudyDescription", "StudyID",
    "StudyTime", "TypeOfPatientID",
})
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
MAX_RESULTS_HEADER_BYTES = 256 * 1024  # the copied attributes, encoded: a real header's are a few KiB


def check_deflated_size(data: bytes, max_pixels: int) -> None:
    """A Deflated Explicit VR Little Endian file is a zip bomb candidate: inflate it once in small
    pieces, keeping nothing, and refuse it (413) when it grows past what an admissible image needs."""
    start, syntax = file_meta_end_and_syntax(data)
    if syntax != DEFLATED_UID:
        return
    limit = DEFLATED_BYTES_PER_PIXEL * max_pixels + DEFLATED_EXTRA_BYTES
    inflater, pending, total = zlib.decompressobj(-zlib.MAX_WBITS), data[start:], 0
    try:
        while pending and not inflater.eof:
            total += len(inflater.decompress(pending, 1 << 20))
            pending = inflater.unconsumed_tail
            if total > limit:
                raise PayloadTooLarge(f"the deflated DICOM dataset inflates to more than {limit} bytes")
    except zlib.error:
        raise InvalidImage("the deflated DICOM dataset could not be inflated (corrupt)") from None


def file_meta_end_and_syntax(data: bytes) -> tuple[int, str]:
    """Where the File Meta Information group (0002,xxxx, explicit VR little endian) ends, and its
    Transfer Syntax UID ("" when absent or unreadable: pydicom then reports the problem)."""
    pos, syntax = 132, ""
    while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
        element, vr = int.from_bytes(data[pos + 2 : pos + 4], "little"), data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            length, value_at = int.from_bytes(data[pos + 8 : pos + 12], "little"), pos + 12
        else:
            length, value_at = int.from_bytes(data[pos + 6 : pos + 8], "little"), pos + 8
        if element == 0x0010:
            syntax = data[value_at : value_at + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = value_at + length
    return pos, syntax


# ---------------------------------------------------------------- element limits

_limits = threading.local()  # the element budget of the read in progress on this thread, if any
_install_lock = threading.Lock()


class _Budget:
    def __init__(self, max_elements: int) -> None:
        self.left = max_elements
        self.max_elements = max_elements

    def take(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise DecodeTooCostly(f"the DICOM dataset has more than {self.max_elements} data elements and "
                                  "sequence items; it was not read further")


def _value_vr(raw) -> str | None:
    """The VR pydicom will convert a raw element's value with: the dictionary's for implicit VR and for
    UN (pydicom replaces UN with the known VR)."""
    vr = raw.VR
    if vr is None or vr == "UN":
        from pydicom.datadict import dictionary_VR

        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:  # private or unknown: read as bytes (UN)
            return None
    return vr


def _check_value(raw) -> None:
    length = len(raw.value) if isinstance(raw.value, bytes) else 0
    if length <= MAX_TEXT_VALUE_BYTES:
        return
    vrs = set(str(_value_vr(raw) or "UN").replace(" ", "").split("or"))
    if vrs & {"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"}:  # bulk data (a LUT "US or OW" too)
        return
    if vrs & MULTI_VALUED_TEXT_VRS:
        limit = MAX_TEXT_VALUE_BYTES
    elif vrs & NUMBER_VRS:
        limit = MAX_NUMBER_VALUE_BYTES
    else:
        return
    if length > limit:
        from pydicom.datadict import keyword_for_tag

        name = keyword_for_tag(raw.tag) or "a private element"
        raise DecodeTooCostly(f"the DICOM element {name} has a {length}-byte value; at most {limit} bytes are read "
                              "for its value representation")


def _install() -> None:
    """Wrap pydicom's element reader, through which every element of every nesting level is read (the
    top level, eager undefined-length sequences and lazily converted ones): while a budget is set on
    the thread, each element and each item (a call) is counted, and long multi-valued values refused."""
    from pydicom import filereader

    with _install_lock:
        if getattr(filereader.data_element_generator, "_btd_limited", False):
            return
        original = filereader.data_element_generator

        def limited(*args, **kwargs):
            budget: _Budget | None = getattr(_limits, "budget", None)
            if budget is None:
                yield from original(*args, **kwargs)
                return
            budget.take()  # a dataset: the top level or a sequence item
            for element in original(*args, **kwargs):
                budget.take()
                if type(element).__name__ == "RawDataElement":
                    _check_value(element)
                yield element

        limited._btd_limited = True  # type: ignore[attr-defined]
        filereader.data_element_generator = limited


@contextlib.contextmanager
def element_limits(max_elements: int = MAX_ELEMENTS) -> Iterator[None]:
    """Count every element pydicom reads on this thread meanwhile (lazy conversions included)."""
    _install()
    previous = getattr(_limits, "budget", None)
    _limits.budget = _Budget(max_elements)
    try:
        yield
    finally:
        _limits.budget = previous


def read_dataset(data: bytes, max_pixels: int, *, stop_before_pixels: bool = False):
    """``pydicom.dcmread`` of client bytes after the deflate check, with the element limits set: call
    it inside :func:`element_limits` (which must also cover every later access to the dataset, as
    pydicom converts sequences lazily)."""
    import pydicom

    check_deflated_size(data, max_pixels)
    if getattr(_limits, "budget", None) is None:
        raise RuntimeError("read_dataset must run inside element_limits()")
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)


# ---------------------------------------------------------------- the results' header


def _convert_all(ds) -> None:
    for element in ds:  # iterating converts each raw element
        if element.VR == "SQ":
            for item in element.value:
                _convert_all(item)


def results_header(ds):
    """The attributes of ``ds`` that DICOM results copy or read (``RESULTS_KEYWORDS``), as a new small
    dataset (no pixel data, values converted), checked for the UIDs the results reference; called where
    ``ds`` was read, inside :func:`element_limits`. Messages never quote tag values."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    missing = [k for k in REQUIRED_UIDS if not str(ds.get(k, "") or "").strip()]
    if missing:
        raise InvalidImage(f"the DICOM file has no {', '.join(missing)}; DICOM results must reference their source")
    header = Dataset()
    for keyword in sorted(RESULTS_KEYWORDS):
        tag = tag_for_keyword(keyword)
        if tag is not None and tag in ds:
            header.add(ds[tag])
    _convert_all(header)  # here, under the limits: pydicom converts nested sequence items lazily
    header.set_original_encoding(False, True, ds.get("SpecificCharacterSet"))
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, header)
    if encoded.tell() > MAX_RESULTS_HEADER_BYTES:
        raise InvalidImage(f"the DICOM patient, study and equipment attributes take {encoded.tell()} bytes; "
                           f"DICOM results copy at most {MAX_RESULTS_HEADER_BYTES}")
    return header
