"""``btd validate``: the labels file's checks, the intervals, the scanner subgroups, and the whole
command on synthetic PNGs and MR DICOMs with the small test model (in process)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from sklearn.metrics import roc_auc_score

from app.core import metrics
from app.core.scanner import field_strength_of, manufacturer_of
from app.engine.engine import Engine
from app.transports.cli.btd import main
from app.transports.cli.predict import Unusable
from app.transports.cli.validate import read_labels
from app.transports.cli.validation_report import model_card_figures
from tests.export.synthetic_mri import LABELS, synthetic_slice
from tests.model_factory import build_model

PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-31415"
AXIAL = [1, 0, 0, 0, 1, 0]
SAGITTAL = [0, 1, 0, 0, 0, -1]


def mr_dicom(path: Path, label: str, seed: int, *, orientation=AXIAL, tr=500.0, te=15.0, agent="GADOVIST",
             manufacturer="SIEMENS", tesla="3") -> Path:
    """A synthetic MR slice (``synthetic_mri``'s head and blob) as a DICOM file with acquisition and
    scanner headers, and patient data that must never reach the report."""
    pixels = synthetic_slice(label, np.random.default_rng(seed), size=128).astype(np.uint16) * 8
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = PATIENT_NAME, PATIENT_ID, "MR"
    ds.ImageOrientationPatient, ds.RepetitionTime, ds.EchoTime = orientation, tr, te
    ds.ScanningSequence = "SE"
    if agent:
        ds.ContrastBolusAgent = agent
    ds.Manufacturer, ds.MagneticFieldStrength = manufacturer, tesla
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_site(root: Path) -> list[tuple[str, str]]:
    """PNGs of every class, axial T1 post-contrast DICOMs (Siemens 3 T) and one sagittal T2 (GE 1.5 T,
    outside the validated use). Returns the (file, label) rows."""
    rows = []
    rng = np.random.default_rng(1)
    for i, label in enumerate(LABELS * 2):
        path = root / "png" / f"{label}-{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), synthetic_slice(label, rng, size=128))
        rows.append((path.relative_to(root).as_posix(), label))
    for i, label in enumerate(LABELS):
        rows.append((mr_dicom(root / "dicom" / f"ax{i}.dcm", label, 10 + i).relative_to(root).as_posix(), label))
    sagittal = mr_dicom(root / "dicom" / "sag.dcm", "glioma", 20, orientation=SAGITTAL, tr=4500.0, te=100.0, agent="",
                        manufacturer="GE MEDICAL SYSTEMS", tesla="15000")  # gauss, as some old files write it
    rows.append((sagittal.relative_to(root).as_posix(), "glioma"))
    return rows


def write_labels(path: Path, rows, header: str = "file,label") -> Path:
    path.write_text(header + "\n" + "".join(f"{f},{label}\n" for f, label in rows))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "model.onnx", size=64, channels=8, stride=8)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("site")
    scans = root / "scans"
    return scans, write_labels(root / "labels.csv", write_site(scans))


@pytest.fixture(scope="module")
def report(site, model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    scans, labels = site
    out = tmp_path_factory.mktemp("out") / "report.html"
    code = main(["validate", str(scans), "--labels", str(labels), "--out", str(out), "--model", str(model),
                 "--no-progress", "--bootstrap", "200"])
    return {"code": code, "html": out.read_text(), "json": json.loads(out.with_suffix(".json").read_text()),
            "json_text": out.with_suffix(".json").read_text()}


# ---------------------------------------------------------------- the command


def test_validate_writes_the_report_and_its_json_with_exit_status_0(report: dict) -> None:
    assert report["code"] == 0
    overall = report["json"]["overall"]
    assert overall["labelled"] == overall["read"] == 13 and overall["failed"]["images"] == 0
    assert overall["assessed"] + overall["not_assessed"]["images"] == 13


def test_figures_are_those_of_the_engines_own_answers(report: dict, site, model: Path) -> None:
    scans, labels = site
    engine = Engine.load_single(model)
    rows = [line.split(",") for line in labels.read_text().splitlines()[1:]]
    answers = [(engine.predict((scans / f).read_bytes()), label) for f, label in rows]
    assessed = [(p, label) for p, label in answers if p.assessed]
    overall = report["json"]["overall"]
    assert overall["assessed"] == len(assessed)
    accuracy = overall["metrics"][metrics.ACCURACY]
    assert accuracy["successes"] == sum(p.label == label for p, label in assessed) and accuracy["of"] == len(assessed)
    sensitivity = overall["metrics"][metrics.TUMOUR_SENSITIVITY]
    tumours = [p for p, label in assessed if label != "notumor"]
    assert sensitivity["successes"] == sum(bool(p.tumour_detected) for p in tumours) and sensitivity["of"] == len(tumours)
    cm = np.array(overall["confusion_matrix"])
    assert cm.sum() == len(assessed) and np.trace(cm) == accuracy["successes"]


def test_the_sagittal_t2_slice_is_not_assessed_and_its_reasons_counted(report: dict) -> None:
    overall = report["json"]["overall"]
    assert overall["not_assessed"]["images"] >= 1
    assert overall["not_assessed"]["reasons"].get("plane") == 1 and overall["not_assessed"]["reasons"].get("sequence") == 1
    sagittal = report["json"]["subgroups"]["plane"]["sagittal"]
    assert sagittal["read"] == 1 and sagittal["not_assessed"]["images"] == 1 and sagittal["assessed"] == 0


def test_subgroups_come_from_the_dicom_headers_and_png_is_unknown(report: dict) -> None:
    groups = report["json"]["subgroups"]
    assert {k: v["read"] for k, v in groups["manufacturer"].items()} == {"GE": 1, "Siemens": 4, "unknown": 8}
    assert {k: v["read"] for k, v in groups["field_strength"].items()} == {"1.5 T": 1, "3 T": 4, "unknown": 8}
    assert {k: v["read"] for k, v in groups["sequence"].items()} == {"t1post": 4, "t2": 1, "unknown": 8}
    assert {k: v["read"] for k, v in groups["plane"].items()} == {"axial": 4, "sagittal": 1, "unknown": 8}


def test_the_report_holds_no_patient_data_no_file_names_and_fetches_nothing(report: dict) -> None:
    for text in (report["html"], report["json_text"]):
        assert PATIENT_NAME not in text and "Doe" not in text and PATIENT_ID not in text
        assert ".dcm" not in text and ".png" not in text and "ax0" not in text
    external = re.findall(r"""(?:src|href)\s*=\s*["'](?!#)[^"']*""", report["html"])
    assert external == [], external  # inline SVG and CSS only: no CDN, no file beside it


def test_the_html_shows_the_figures_and_the_model_cards_beside_the_sites(report: dict) -> None:
    html = report["html"]
    assert html.count("<svg") == 2 and 'id="confusion-matrix"' in html
    card = re.search(r'data-metric="accuracy">.*?<td class="card">([^<]*)</td>', html, re.DOTALL)
    assert card and card.group(1).strip() == "25.0%"  # the test model's btd.metrics: accuracy 0.25
    for kind in ("sequence", "plane", "manufacturer", "field_strength"):
        assert f'id="subgroup-{kind}"' in html


def test_an_unreadable_labelled_file_is_counted_and_exits_1(tmp_path: Path, model: Path, capsys) -> None:
    scans = tmp_path / "scans"
    rows = write_site(scans)[:4]
    (scans / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    labels = write_labels(tmp_path / "labels.csv", [*rows, ("broken.png", "glioma")])
    out = tmp_path / "report.html"
    code = main(["validate", str(scans), "--labels", str(labels), "--out", str(out), "--model", str(model),
                 "--no-progress", "--ignore-unlabelled", "--bootstrap", "0"])
    assert code == 1
    overall = json.loads(out.with_suffix(".json").read_text())["overall"]
    assert overall["failed"]["images"] == 1 and overall["read"] == 4
    assert "broken.png" in capsys.readouterr().err and "broken.png" not in out.read_text()


# ---------------------------------------------------------------- the labels file


@pytest.mark.parametrize(("rows", "header", "message"), [
    ([("png/glioma-0.png", "glioma")], "path,class", "must name the columns file, label"),
    ([("png/glioma-0.png", "astrocytoma")], "file,label", "label 'astrocytoma' is not one of the model's labels"),
    ([("png/absent.png", "glioma")], "file,label", "no file 'png/absent.png'"),
    ([("../labels.csv", "glioma")], "file,label", "is not a path relative to"),
    ([("/etc/passwd", "glioma")], "file,label", "is not a path relative to"),
    ([("png/glioma-0.png", "glioma"), ("png//glioma-0.png", "glioma")], "file,label", "already labelled on line 2"),
    ([], "file,label", "has no rows"),
])
def test_a_bad_labels_file_is_refused_naming_the_line(tmp_path: Path, rows, header: str, message: str) -> None:
    scans = tmp_path / "scans"
    write_site(scans)
    with pytest.raises(Unusable, match=re.escape(message)):
        read_labels(scans, write_labels(tmp_path / "labels.csv", rows, header), LABELS, ignore_unlabelled=True)


def test_unlabelled_images_are_refused_unless_asked_to_ignore_them(tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    rows = write_site(scans)
    labels = write_labels(tmp_path / "labels.csv", rows[:-1])
    with pytest.raises(Unusable, match=r"1 image\(s\) under .* have no row.*\n  dicom/sag.dcm"):
        read_labels(scans, labels, LABELS)
    assert len(read_labels(scans, labels, LABELS, ignore_unlabelled=True)) == len(rows) - 1


def test_bad_input_exits_2_with_the_reason(tmp_path: Path, model: Path, capsys) -> None:
    scans = tmp_path / "scans"
    write_site(scans)
    labels = write_labels(tmp_path / "labels.csv", [("png/glioma-0.png", "tumour")])
    out = tmp_path / "report.html"
    assert main(["validate", str(scans), "--labels", str(labels), "--out", str(out), "--model", str(model)]) == 2
    assert "label 'tumour' is not one of the model's labels" in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------- intervals, scanner, model card


@pytest.mark.parametrize(("k", "n", "low", "high"), [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634),
                                                    (10, 10, 0.7225, 1.0), (81, 263, 0.2553, 0.3662)])
def test_wilson_interval_matches_published_values(k: int, n: int, low: float, high: float) -> None:
    lo, hi = metrics.wilson_interval(k, n)
    assert (lo, hi) == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))
    assert metrics.wilson_interval(0, 0) is None


def test_bootstrap_statistics_equal_the_reports_on_the_unresampled_set() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 200)
    logits = np.eye(4)[y] * 2 + rng.normal(0, 1.5, (200, 4))
    logits[:5] = logits[5]  # ties: counted half, as sklearn does
    report = metrics.classification_report(logits, y, LABELS)
    whole = np.arange(200)[None, :]
    probs = metrics.softmax(logits)
    assert metrics._resampled_macro_auc(y, probs, whole)[0] == pytest.approx(report[metrics.MACRO_AUC])
    assert metrics._resampled_macro_f1(y[whole], probs.argmax(1)[whole], 4)[0] == pytest.approx(report[metrics.MACRO_F1])
    assert report["per_class"]["glioma"]["roc_auc"] == pytest.approx(roc_auc_score(y == 0, probs[:, 0]))
    intervals = metrics.bootstrap_intervals(logits, y, resamples=300)
    for name in (metrics.MACRO_AUC, metrics.MACRO_F1):
        lo, hi = intervals[name]
        assert lo < report[name] < hi and hi - lo < 0.2


def test_bootstrap_intervals_narrow_with_more_images() -> None:
    rng = np.random.default_rng(4)

    def width(n: int) -> float:
        y = rng.integers(0, 4, n)
        lo, hi = metrics.bootstrap_intervals(np.eye(4)[y] + rng.normal(0, 1, (n, 4)), y, resamples=300)[metrics.MACRO_F1]
        return hi - lo

    assert width(1600) < width(100) / 2


@pytest.mark.parametrize(("text", "vendor"), [("SIEMENS", "Siemens"), ("GE MEDICAL SYSTEMS", "GE"),
                                              ("Philips Medical Systems", "Philips"), ("TOSHIBA_MEC", "Canon (Toshiba)"),
                                              ("United Imaging Healthcare", "United Imaging"),
                                              ("St Elsewhere research build", "other"), ("", "unknown")])
def test_manufacturer_is_a_vendor_name_never_the_sites_text(text: str, vendor: str) -> None:
    ds = pydicom.Dataset()
    if text:
        ds.Manufacturer = text
    assert manufacturer_of(ds) == vendor


@pytest.mark.parametrize(("value", "words"), [("3", "3 T"), ("1.5", "1.5 T"), ("15000", "1.5 T"), ("0.55", "0.6 T"),
                                              ("", "unknown"), ("-1", "unknown")])
def test_field_strength_in_tesla_rounded(value: str, words: str) -> None:
    ds = pydicom.Dataset()
    if value:
        ds.MagneticFieldStrength = value
    assert field_strength_of(ds) == words


def test_a_quantised_models_card_figures_are_its_float_sources() -> None:
    card = model_card_figures({"fp32_source": {"accuracy": 0.97, "images": 1129, "split": "test"}})
    assert card["metrics"][metrics.ACCURACY] == 0.97 and card["images"] == 1129 and "quantised" in card["source"]
    assert model_card_figures({"accuracy": 0.9})["source"] == "measured on this file"
