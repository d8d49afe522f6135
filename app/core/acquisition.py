"""The intended-use gate, from a DICOM's headers: the plane of a slice (from Image Orientation
(Patient)) and its sequence (from the acquisition attributes), and whether they are what the model
is validated for (``ValidatedUse``, stored in the model's metadata: ``app.core.contract``). Pure
functions on a pydicom ``Dataset`` (anything with ``get``); no tag value ever leaves them, only the
names below (Series Description is free text a site writes: it is read, never answered or logged).

**Plane** (``plane_of``). The slice normal is the cross product of the row and column direction
cosines of Image Orientation (Patient); the slice is *axial* when that normal lies within
``AXIAL_TOLERANCE_DEG`` (30 degrees) of the patient's foot-head axis, *sagittal* or *coronal* when
it lies within 30 degrees of the left-right or the front-back axis, *oblique* otherwise; ``None``
(not checked) when the attribute is missing or is not two unit-length orthogonal directions.
Why 30 degrees: a routine brain axial is planned along an anatomical line (AC-PC, or the
orbitomeatal line), so it sits at the head's tilt in the coil to the scanner's axial plane, which
is what the attribute measures; the training slices (figshare, LGG, Br35H) were planned that way
and carry no headers to measure, so the tolerance is argued, not measured: wide enough for routine
axial-oblique planning, while a slice tilted further is nearer than 60 degrees to coronal or
sagittal and cuts the anatomy differently from anything the model saw (at 45 degrees it is as
coronal as it is axial). The viewers' rule (the largest component of the normal) calls anything up
to 54.7 degrees axial: too loose to state a validated use.

**Sequence** (``sequence_of``), first rule that speaks:

1. *other* when the object marks itself as a localiser or a projection: Image Type holds
   ``LOCALIZER``, ``PROJECTION IMAGE`` or ``MIP``, Angio Flag is ``Y``, or Series Description (or
   Protocol Name) names a localiser (``localizer``, ``localiser``, ``scout``, ``survey``, ``pilot``).
2. Enhanced MR's Acquisition Contrast, when it says: ``T1`` -> T1, ``T2`` -> T2,
   ``FLUID_ATTENUATED`` -> FLAIR, ``UNKNOWN`` / ``MIXED`` -> on to rule 3, any other value
   (``DIFFUSION``, ``PROTON_DENSITY``, ``STIR``, ``T2_STAR``, ``TOF``, ...) -> other.
3. The physics, from Scanning Sequence, Repetition Time (TR), Echo Time (TE) and Inversion Time (TI),
   in ms:

   - echo planar (``EP``) or research mode (``RM``) -> other (diffusion, perfusion, BOLD);
   - inversion recovery (``IR`` in Scanning Sequence, or a TI over 0): TI >= 1500 and TE >= 60 ->
     FLAIR (fluid nulled: CSF's T1 of about 4 s at 1.5-3 T is nulled at TI ~ 1.7-2.8 s, read out
     T2-weighted); 300 <= TI < 1500 and TE <= 30 -> T1 (MPRAGE, T1-FLAIR, IR-SPGR); anything else
     (STIR's TI < 300 ms, ...) -> other; no TI or TE -> on to rule 4;
   - gradient echo (``GR`` without ``SE``): TR < 800 and TE <= 10 -> T1 (spoiled GRE, FLASH, VIBE);
     else other (T2*, susceptibility, proton density);
   - spin echo, or Scanning Sequence absent: TR < 1000 and TE <= 30 -> T1; TR >= 2000 and TE >= 60
     -> T2; else other (proton density, intermediate weighting);
   - TR or TE missing -> on to rule 4.
4. The last resort, Series Description (Protocol Name when it has none), as words (lower case, split
   at anything but letters, digits, ``+`` and ``*``): a word naming another kind (``dwi``, ``adc``,
   ``swi``, ``pd``, ``stir``, ``tof``, ``perf``, ``t2*``, ...) -> other; ``flair`` -> FLAIR (T1 when
   ``t1`` is also named: T1-FLAIR); ``t2`` -> T2; ``t1``, ``mprage``, ``spgr``, ``bravo``, ``vibe`` ->
   T1; nothing -> ``None``: the sequence could not be checked.

A T1 is **T1 post-contrast** when a contrast agent is recorded: Contrast/Bolus Agent (or its code
sequence) not empty (and not ``NONE``, ``NO``, ``N/A``, ...), Enhanced MR's Contrast/Bolus Usage with an agent administered, or ``POST_CONTRAST``
in Image Type; else when Series Description / Protocol Name names one (``post``, ``gad``, ``gd``,
``contrast``, ``ce``, ``km``, ``+c``, ``c+``, ``t1c``, ``t1ce``, ``t1gd``, ...) and does not also
say ``pre`` / ``native``. Otherwise it is T1 pre-contrast: the Contrast/Bolus module is required in
an MR image exactly when contrast media was used (PS3.3 A.4.3), so its absence says none was.

Known limits: balanced SSFP (TrueFISP, FIESTA, CISS: gradient echo, very short TR and TE) reads as
T1 by rule 3; a post-contrast T1 whose headers record no agent and whose name does not say so reads
as T1 pre-contrast (not assessed: the safe side); an Enhanced MR object is read at the classified
frame's functional groups, one nesting level deep.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field

from app.core.contract import ValidatedUse

Plane = Literal["axial", "coronal", "sagittal", "oblique"]  # contract.PLANES (a test checks they agree)
SequenceName = Literal["t1", "t1post", "t2", "flair", "other"]  # contract.SEQUENCES
# How the answers and the SR name them.
PLANE_WORDS = {"axial": "axial", "coronal": "coronal", "sagittal": "sagittal", "oblique": "oblique"}
SEQUENCE_WORDS = {"t1": "T1 pre-contrast", "t1post": "T1 post-contrast", "t2": "T2", "flair": "FLAIR",
                  "other": "another sequence (not T1, T2 or FLAIR)"}

AXIAL_TOLERANCE_DEG = 30.0  # see the module docstring
FLAIR_MIN_TI, FLAIR_MIN_TE = 1500.0, 60.0
IR_T1_TI, IR_T1_MAX_TE = (300.0, 1500.0), 30.0
GRE_T1_MAX_TR, GRE_T1_MAX_TE = 800.0, 10.0
SE_T1_MAX_TR, SE_T1_MAX_TE = 1000.0, 30.0
SE_T2_MIN_TR, SE_T2_MIN_TE = 2000.0, 60.0

_PROJECTION_TYPES = {"LOCALIZER", "PROJECTION IMAGE", "MIP"}
_LOCALISER_WORDS = {"localizer", "localiser", "loc", "scout", "survey", "pilot", "3plane", "tripilot"}
_OTHER_WORDS = {"dwi", "diff", "diffusion", "adc", "trace", "tracew", "dti", "ep2d", "swi", "swan", "pd", "pdw",
                "stir", "tof", "mra", "angio", "perf", "perfusion", "dsc", "asl", "bold", "fmri", "epi", "t2*",
                "t2star", "star", "ssfp", "fiesta", "ciss", "truefisp", "spectro", "svs", "csi", "mrs"}
_T1_WORDS = {"t1", "t1w", "mprage", "spgr", "fspgr", "bravo", "vibe", "tfl"}
_T2_WORDS = {"t2", "t2w"}
_POST_WORDS = {"post", "postcontrast", "gad", "gado", "gd", "contrast", "ce", "km", "kontrast", "mdc", "c+", "+c",
               "+gd", "t1c", "t1ce", "t1gd", "t1post", "t1km", "t1+c", "t1+", "t1+gd"}
_PRE_WORDS = {"pre", "precontrast", "native", "nativ", "plain"}
# What some sites write in Contrast/Bolus Agent when none was given.
_NO_AGENT = {"NONE", "NO", "N/A", "NA", "NIL", "-", "0", "WITHOUT", "NATIVE", "NO CONTRAST"}
_ACQUISITION_CONTRAST = {"T1": "t1", "T2": "t2", "FLUID_ATTENUATED": "flair"}


@dataclass(frozen=True)
class Acquisition:
    """What the DICOM headers say about how the slice was acquired (``app.core.acquisition``)."""

    plane: Annotated[Plane | None, Field(
        description="from Image Orientation (Patient): axial, coronal or sagittal within 30 degrees, else "
                    "oblique; null when the DICOM does not say (the plane could not be checked)")]
    sequence: Annotated[SequenceName | None, Field(
        description="from the acquisition attributes (Scanning Sequence, Repetition / Echo / Inversion Time, "
                    "Contrast/Bolus Agent; Series Description as the last resort): t1 (pre-contrast), t1post, "
                    "t2, flair or other; null when the headers do not say enough (the sequence could not be "
                    "checked)")]


def read_acquisition(ds: Any, frame: int = 0) -> Acquisition:
    """The plane and sequence of frame ``frame`` of an MR dataset."""
    return Acquisition(plane_of(ds, frame), sequence_of(ds, frame))


def outside_validated(acquisition: Acquisition | None, validated: ValidatedUse) -> list[str]:
    """The gate's reasons (``plane``, ``sequence``) when what the headers say is outside the model's
    validated use; what they do not say (``None``) is not a reason (see ``unchecked``)."""
    if acquisition is None:
        return []
    reasons = ["plane"] if acquisition.plane is not None and acquisition.plane not in validated.planes else []
    if acquisition.sequence is not None and acquisition.sequence not in validated.sequences:
        reasons.append("sequence")
    return reasons


def unchecked(acquisition: Acquisition | None) -> list[str]:
    """What an MR DICOM's headers did not say (``plane``, ``sequence``): answered with a warning."""
    if acquisition is None:
        return []
    return [name for name in ("plane", "sequence") if getattr(acquisition, name) is None]


def validated_words(validated: ValidatedUse) -> tuple[str, str]:
    """(planes, sequences) of the validated use in words, e.g. ("axial", "T1 post-contrast and FLAIR")."""
    return (_and([PLANE_WORDS.get(p, p) for p in validated.planes]),
            _and([SEQUENCE_WORDS.get(s, s) for s in validated.sequences]))


def _and(words: Sequence[str]) -> str:
    if len(words) <= 1:
        return words[0] if words else "nothing"
    return ", ".join(words[:-1]) + " and " + words[-1]


# --- reading the headers ----------------------------------------------------------------------------

def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, (str, bytes)):
        return bool(value.strip())
    try:
        return len(value) > 0
    except TypeError:
        return True


def frame_numbers(ds: Any, keyword: str, frame: int = 0) -> list[float] | None:
    """A numeric attribute of frame ``frame`` (top level, else the Enhanced MR functional groups, as
    ``_find`` looks), as finite floats; None when absent or not numbers. The series ordering reads
    Image Position / Orientation (Patient) with it."""
    return _numbers(_find(ds, keyword, frame))


def _find(ds: Any, keyword: str, frame: int = 0) -> Any:
    """An attribute at the top level, else (Enhanced MR) in the classified frame's per-frame or the
    shared functional groups, one level down (e.g. Plane Orientation Sequence > Image Orientation
    (Patient)); None when nowhere."""
    value = ds.get(keyword)
    if _present(value):
        return value
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if not items or len(items) <= index:
            continue
        item = items[index]
        direct = item.get(keyword)  # a functional group's own sequence (Contrast/Bolus Usage)
        if _present(direct):
            return direct
        for element in item:
            if element.VR != "SQ" or not element.value:
                continue
            nested = element.value[0].get(keyword)
            if _present(nested):
                return nested
    return None


def _numbers(value: Any) -> list[float] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") else value
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) else None


def _number(ds: Any, keyword: str, frame: int) -> float | None:
    values = _numbers(_find(ds, keyword, frame))
    return values[0] if values else None


def _strings(value: Any) -> list[str]:
    if not _present(value):
        return []
    values = [value] if isinstance(value, (str, bytes)) else list(value)
    return [str(v).strip().upper() for v in values]


def _words(ds: Any) -> set[str]:
    """Series Description (Protocol Name when it has none) as lower-case words."""
    text = str(ds.get("SeriesDescription") or "").strip() or str(ds.get("ProtocolName") or "").strip()
    return {w for w in re.split(r"[^a-z0-9+*]+", text.lower()) if w}


# --- the plane --------------------------------------------------------------------------------------

def plane_of(ds: Any, frame: int = 0) -> Plane | None:
    """The slice's plane from Image Orientation (Patient) (see the module docstring), None when it
    cannot be read."""
    cosines = _numbers(_find(ds, "ImageOrientationPatient", frame))
    if cosines is None or len(cosines) != 6:
        return None
    row, col = cosines[:3], cosines[3:]
    row_norm, col_norm = math.sqrt(sum(v * v for v in row)), math.sqrt(sum(v * v for v in col))
    if not (0.9 < row_norm < 1.1 and 0.9 < col_norm < 1.1):
        return None
    row, col = [v / row_norm for v in row], [v / col_norm for v in col]
    if abs(sum(r * c for r, c in zip(row, col))) > 0.1:  # not orthogonal (about 84-96 degrees): not a plane
        return None
    normal = [row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2], row[0] * col[1] - row[1] * col[0]]
    length = math.sqrt(sum(v * v for v in normal))
    axis = max(range(3), key=lambda i: abs(normal[i]))
    if abs(normal[axis]) / length < math.cos(math.radians(AXIAL_TOLERANCE_DEG)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]  # patient x: left-right, y: front-back, z: foot-head


# --- the sequence -----------------------------------------------------------------------------------

def sequence_of(ds: Any, frame: int = 0) -> SequenceName | None:
    """The slice's sequence from its acquisition attributes (see the module docstring), None when
    they do not say enough."""
    words = _words(ds)
    image_type = set(_strings(ds.get("ImageType")))
    if image_type & _PROJECTION_TYPES or _strings(ds.get("AngioFlag"))[:1] == ["Y"] or words & _LOCALISER_WORDS:
        return "other"
    kind = _by_acquisition_contrast(ds, frame) or _by_timing(ds, frame) or _by_description(words)
    if kind == "t1" and _contrast_given(ds, frame, words, image_type):
        return "t1post"
    return kind


def _by_acquisition_contrast(ds: Any, frame: int) -> SequenceName | None:
    stated = _strings(_find(ds, "AcquisitionContrast", frame))
    if not stated or stated[0] in ("UNKNOWN", "MIXED"):
        return None
    return _ACQUISITION_CONTRAST.get(stated[0], "other")  # type: ignore[return-value]


def _by_timing(ds: Any, frame: int) -> SequenceName | None:
    scanning = set(_strings(ds.get("ScanningSequence")))
    pulse = set(_strings(_find(ds, "EchoPulseSequence", frame)))  # Enhanced MR: SPIN, GRADIENT, BOTH
    if scanning & {"EP", "RM"} or _strings(_find(ds, "EchoPlanarPulseSequence", frame))[:1] == ["YES"]:
        return "other"
    tr, te = _number(ds, "RepetitionTime", frame), _number(ds, "EchoTime", frame)
    if te is None:
        te = _number(ds, "EffectiveEchoTime", frame)
    ti = _number(ds, "InversionTime", frame)
    if ti is None:
        ti = _number(ds, "InversionTimes", frame)
    inversion = ("IR" in scanning or (ti is not None and ti > 0)
                 or _strings(_find(ds, "InversionRecovery", frame))[:1] == ["YES"])
    if inversion:
        if ti is None or te is None:
            return None
        if ti >= FLAIR_MIN_TI and te >= FLAIR_MIN_TE:
            return "flair"
        if IR_T1_TI[0] <= ti < IR_T1_TI[1] and te <= IR_T1_MAX_TE:
            return "t1"
        return "other"
    if tr is None or te is None:
        return None
    if ("GR" in scanning and "SE" not in scanning) or pulse == {"GRADIENT"}:
        return "t1" if tr < GRE_T1_MAX_TR and te <= GRE_T1_MAX_TE else "other"
    if tr < SE_T1_MAX_TR and te <= SE_T1_MAX_TE:
        return "t1"
    if tr >= SE_T2_MIN_TR and te >= SE_T2_MIN_TE:
        return "t2"
    return "other"


def _by_description(words: set[str]) -> SequenceName | None:
    if words & _OTHER_WORDS:
        return "other"
    if any("flair" in w for w in words):
        return "t1" if words & _T1_WORDS else "flair"
    if words & _T2_WORDS:
        return "t2"
    if words & _T1_WORDS or words & {"t1c", "t1ce", "t1gd", "t1post", "t1km", "t1+c", "t1+", "t1+gd"}:
        return "t1"
    return None


def _contrast_given(ds: Any, frame: int, words: set[str], image_type: set[str]) -> bool:
    agent = str(ds.get("ContrastBolusAgent") or "").strip().upper()
    if (agent and agent not in _NO_AGENT) or _present(ds.get("ContrastBolusAgentSequence")):
        return True
    if "POST_CONTRAST" in image_type:
        return True
    usage = _find(ds, "ContrastBolusUsageSequence", frame) or []
    try:
        if any(_strings(item.get("ContrastBolusAgentAdministered"))[:1] == ["YES"] for item in usage):
            return True
    except (TypeError, AttributeError):
        pass
    return bool(words & _POST_WORDS) and not words & _PRE_WORDS
