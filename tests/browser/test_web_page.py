"""The clinician page and /docs in a real browser: Debian's chromium driven by npm playwright-core.

One module-scoped run of ``web_page.mjs`` against the real service (``python -m app`` on a free
127.0.0.1 port with the small test model, or ``BTD_BROWSER_MODEL``) uploads a real slice (a
figshare-cheng test image when ``../shared/data`` is present, else a synthetic PNG), a DICOM and a
broken file, a synthetic DICOM series (as several files, then as a folder) and a small NIfTI volume,
and opens /docs with every off-site request refused. The tests check what it saw
against what the API itself answers. Screenshots land in ``test-artifacts/browser/``.

To refresh the README screenshot with the shipped model::

    BTD_BROWSER_MODEL=models/btd-resnet50.onnx .venv/bin/python -m pytest tests/browser
    cp test-artifacts/browser/web-page-result.png docs/web-page.png
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import httpx
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from app.core.contract import LocalisationSpec
from app.engine.records.store import RecordStore
from app.transports.http.api_keys import key_line, new_key
from app.transports.pacs.multipart import encode_related
from tests.api.helpers import ServerProcess
from tests.model_factory import build_model, tumour_slice_png

BROWSER_DIR = Path(__file__).resolve().parent
REPO_ROOT = BROWSER_DIR.parents[1]
SCRIPT = BROWSER_DIR / "web_page.mjs"
ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
CHROMIUM = Path(os.environ.get("BTD_CHROMIUM", "/usr/bin/chromium"))
NODE = shutil.which("node")
SCRIPT_TIMEOUT_S = 240

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no chromium at {CHROMIUM} (test.sh installs it)"),
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir(),
                       reason="tests/browser/node_modules is missing (scripts/test.sh runs npm ci)"),
]


def data_dir() -> Path:
    return Path(os.environ.get("BTD_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


def real_slice() -> Path | None:
    """The first figshare-cheng image of a test-split group (CC BY 4.0, Cheng et al. 2015)."""
    index = data_dir() / "figshare-cheng" / "index.csv"
    if not index.is_file():
        return None
    with open(index, newline="") as f:
        for row in csv.DictReader(f):
            if row["in_4class_splits"] == "test":
                return index.parent / row["image"]
    return None


def synthetic_slice(path: Path) -> Path:
    """A bright ellipse with a brighter blob on noise: shaped like a slice, made in code."""
    rng = np.random.default_rng(7)
    img = (rng.random((256, 256)) * 20).astype(np.float32)
    cv2.ellipse(img, (128, 128), (100, 115), 0, 0, 360, 120, -1)
    cv2.circle(img, (160, 100), 22, 230, -1)
    cv2.imwrite(str(path), np.clip(img, 0, 255).astype(np.uint8))
    return path


SERIES_SLICES = 6  # 256x256 slices the gate admits, then one 64x64 slice it does not ("small-image")


def synthetic_head(k: int, n: int) -> np.ndarray:
    """Slice ``k`` of ``n``: the synthetic slice's ellipse, with a blob that grows and shrinks along the stack."""
    rng = np.random.default_rng(k)
    img = (rng.random((256, 256)) * 20).astype(np.float32)
    cv2.ellipse(img, (128, 128), (100, 115), 0, 0, 360, 120, -1)
    radius = int(30 * np.sin(np.pi * k / max(1, n - 1)))
    if radius > 2:
        cv2.circle(img, (160, 100), radius, 230, -1)
    return img


def synthetic_series(folder: Path) -> Path:
    """One axial FLAIR series (pydicom's MR_small.dcm as the template: an inversion recovery with TI 2500
    and TE 100 ms reads as FLAIR, which the gate admits), written in reverse so the service orders it,
    plus a README.txt that the page must leave out."""
    folder.mkdir()
    series_uid = generate_uid()
    for k in range(SERIES_SLICES + 1):
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        if k < SERIES_SLICES:
            pixels = np.clip(synthetic_head(k, SERIES_SLICES) * 8, 0, 4095).astype(np.uint16)
            ds.Rows, ds.Columns = pixels.shape
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.PixelData = pixels.tobytes()
        ds.ScanningSequence, ds.InversionTime, ds.EchoTime = "IR", 2500, 100
        uid = generate_uid()
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.file_meta.MediaStorageSOPInstanceUID = series_uid, uid, uid
        ds.InstanceNumber, ds.ImageOrientationPatient, ds.ImagePositionPatient = k + 1, [1, 0, 0, 0, 1, 0], [0, 0, 5.0 * k]
        ds.save_as(folder / f"IM{SERIES_SLICES - k:04d}", enforce_file_format=True)  # no suffix, as PACS exports
    (folder / "README.txt").write_text("exported series\n")
    return folder


def synthetic_nifti(path: Path, slices: int = 4) -> Path:
    nib = pytest.importorskip("nibabel")
    volume = np.stack([synthetic_head(k, slices) for k in range(slices)], axis=-1).astype(np.int16)
    path.write_bytes(gzip.compress(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 3.0, 1.0])).to_bytes()))
    return path


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix != ".txt")


@pytest.fixture(scope="module")
def browser_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs the browser script once; returns its report plus the API's own answers for the same files."""
    work = tmp_path_factory.mktemp("browser")
    model = Path(os.environ.get("BTD_BROWSER_MODEL") or build_model(work / "model.onnx"))
    image = real_slice() or synthetic_slice(work / "synthetic-slice.png")
    from pydicom.data import get_testdata_file

    dicom = Path(get_testdata_file("MR_small.dcm"))
    broken = work / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # a PNG signature, then nothing decodable
    series = synthetic_series(work / "series")
    nifti = synthetic_nifti(work / "volume.nii.gz")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):  # so a stale screenshot cannot pass for a new one
        old.unlink()

    # A model with a tumour map (high where the slice is bright) that calls every assessed image a tumour.
    region_model = build_model(work / "region.onnx", size=64, localisation=LocalisationSpec(0.5, 0.002))
    region_image = work / "tumour-slice.png"
    region_image.write_bytes(tumour_slice_png(blob=(200, 100)))
    key, predict_only = new_key(), new_key()
    keys = "\n".join([key_line("clinician", key), key_line("pacs", predict_only, ("predict",))])
    records = work / "records"
    with ServerProcess(model, ready_timeout_s=120, BTD_INTRA_OP_THREADS="1", BTD_RECORDS_DIR=str(records)) as server, \
            ServerProcess(model, ready_timeout_s=120, BTD_INTRA_OP_THREADS="1", BTD_API_KEYS=keys,
                          BTD_RECORDS_DIR=str(work / "keyed-records")) as keyed, \
            ServerProcess(region_model, ready_timeout_s=120, BTD_INTRA_OP_THREADS="1",
                          BTD_TUMOUR_THRESHOLD="0", BTD_RECORDS_DIR=str(work / "region-records")) as localising:
        base_url = server.url
        env = {**os.environ, "BASE_URL": base_url, "IMAGE": str(image), "DICOM": str(dicom),
               "BROKEN": str(broken), "SERIES_DIR": str(series), "NIFTI": str(nifti), "ARTIFACTS": str(ARTIFACTS),
               "PROFILE": str(work / "profile"), "CHROMIUM": str(CHROMIUM), "KEYED_URL": keyed.url, "API_KEY": key,
               "PREDICT_ONLY_KEY": predict_only, "REGION_URL": localising.url, "REGION_IMAGE": str(region_image)}
        done = subprocess.run([NODE, str(SCRIPT)], cwd=BROWSER_DIR, env=env, capture_output=True, text=True,
                              timeout=SCRIPT_TIMEOUT_S, check=False)
        assert done.returncode == 0, f"browser script failed:\n{done.stderr[-4000:]}"
        api_model = httpx.get(f"{base_url}/v1/model").json()
        media_type = "image/jpeg" if image.suffix == ".jpg" else "image/png"
        api_image = httpx.post(f"{base_url}/v1/predict", params={"cam": "png"}, content=image.read_bytes(),
                               headers={"Content-Type": media_type}, timeout=60).json()
        api_broken = httpx.post(f"{base_url}/v1/predict", content=broken.read_bytes(),
                                headers={"Content-Type": "image/png"}, timeout=60).json()
        api_dicom = httpx.post(f"{base_url}/v1/predict", content=dicom.read_bytes(),
                               headers={"Content-Type": "application/dicom"}, timeout=60).json()
        api_region = httpx.post(f"{localising.url}/v1/predict", params={"cam": "png"},
                                content=region_image.read_bytes(), headers={"Content-Type": "image/png"},
                                timeout=60).json()
        body, content_type = encode_related([p.read_bytes() for p in dicom_files(series)])
        api_series = httpx.post(f"{base_url}/v1/predict/series", params={"cam": "png"}, content=body,
                                headers={"Content-Type": content_type}, timeout=60).json()
        api_nifti = httpx.post(f"{base_url}/v1/predict/series", content=nifti.read_bytes(),
                               headers={"Content-Type": "application/gzip"}, timeout=60).json()
    with RecordStore(f"sqlite:///{records / 'btd.db'}") as store:
        predictions, feedback = store.rows(), store.feedback()
    return {"report": json.loads(done.stdout), "model": api_model, "image": api_image, "broken": api_broken,
            "dicom": api_dicom, "region": api_region, "series": api_series, "nifti": api_nifti,
            "predictions": predictions, "feedback": feedback}


def percent(p: float) -> str:
    return f"{100 * p:.1f}%"


def test_page_shows_the_apis_result_for_a_real_slice(browser_run: dict) -> None:
    seen, api = browser_run["report"]["result"], browser_run["image"]
    assert seen["label"] == {"glioma": "Glioma", "meningioma": "Meningioma", "notumor": "No tumour",
                             "pituitary": "Pituitary tumour"}.get(api["label"], api["label"])
    by_probability = sorted(api["probabilities"], key=api["probabilities"].get, reverse=True)
    assert [bar["label"] for bar in seen["bars"]] == by_probability
    for bar in seen["bars"]:
        p = api["probabilities"][bar["label"]]
        assert bar["value"] == percent(p)
        assert bar["width"] == pytest.approx(p * bar["track"], abs=1.5)
    assert percent(api["tumour_probability"]) in seen["decision"]
    assert ("Tumour suspected" if api["tumour_detected"] else "No tumour suspected") in seen["decision"]
    assert "ms" in seen["timing"] and api["model"]["version"] in seen["model"]


def test_page_stacks_the_servers_heatmap_over_its_image(browser_run: dict) -> None:
    seen, cam = browser_run["report"]["result"], browser_run["image"]["cam"]
    assert seen["camVisible"] and seen["image"]["loaded"]
    assert seen["heatmap"]["loaded"] and seen["heatmap"]["shown"]
    assert (seen["image"]["width"], seen["image"]["height"]) == (cam["width"], cam["height"])
    assert (seen["heatmap"]["width"], seen["heatmap"]["height"]) == (cam["width"], cam["height"])
    assert seen["heatmap"]["opacity"] == "1"


def test_heatmap_opacity_and_toggle_work_from_the_keyboard(browser_run: dict) -> None:
    report = browser_run["report"]
    assert report["opacityAfterKeys"] == {"slider": "80", "output": "80%", "heatmap": "0.8"}
    assert report["toggledOff"] == {"checked": False, "heatmapVisible": False, "sliderDisabled": True}
    assert report["toggledOn"] == {"checked": True, "heatmapVisible": True}
    assert "file-input" in report["tabOrderBefore"]
    # the file picker offers what the service reads, from /v1/model (app.core.formats), not a copy, and the
    # NIfTI volumes of /v1/predict/series
    from app.core.formats import FORMATS

    assert set(report["accept"].split(",")) == {x for f in FORMATS for x in (*f.suffixes, f.media_type)} | {
        ".nii", ".nii.gz"}


def test_page_shows_a_dropped_dicom_through_the_servers_rendering(browser_run: dict) -> None:
    dicom = browser_run["report"]["dicom"]
    assert browser_run["report"]["dicomState"] == "done", browser_run["report"].get("dicomError")
    assert dicom["label"] and dicom["camVisible"] and dicom["image"]["loaded"]
    assert (dicom["image"]["width"], dicom["image"]["height"]) == (64, 64)  # MR_small.dcm


DISPLAY_NAMES = ("Glioma", "Meningioma", "No tumour", "Pituitary tumour")


def test_page_shows_not_assessed_without_a_class_a_map_or_jargon(browser_run: dict) -> None:
    # MR_small.dcm is 64x64: too small to be a whole slice, so the service makes no finding for it
    seen, api = browser_run["report"]["dicom"], browser_run["dicom"]
    assert api["in_distribution"] is False and api["tumour_detected"] is None
    assert seen["label"] == "Not assessed"
    assert "Not assessed" in seen["decision"] and "too small to be a whole MR slice" in seen["decision"]
    assert "Tumour suspected" not in seen["decision"] and "No tumour suspected" not in seen["decision"]
    # No class named anywhere a reader looks: no bars, no heatmap, no caption naming a class.
    assert not seen["barsVisible"] and not seen["heatmap"]["loaded"] and not seen["heatmap"]["shown"]
    assert "class activation map for" not in seen["camCaption"] and "not assessed" in seen["camCaption"]
    visible = seen["page"]
    assert not any(name in visible for name in DISPLAY_NAMES), visible
    assert "threshold" not in seen["decision"] and "score" not in seen["decision"]
    # The service's own (technical) warning stays available, collapsed.
    assert seen["details"]["visible"] and not seen["details"]["open"]
    assert "does not look like a brain MR slice" in seen["details"]["text"]


def test_page_explains_a_broken_file_in_words(browser_run: dict) -> None:
    report, problem = browser_run["report"], browser_run["broken"]
    assert report["brokenState"] == "error"
    assert problem["status"] == 400
    error = report["error"]
    assert error["visible"] and error["role"] == "alert" and error["resultHidden"]
    assert "broken.png could not be analysed" in error["text"]
    assert problem["detail"][1:] in error["text"] and "(HTTP 400)" in error["text"]


def test_page_states_decision_support_and_the_model(browser_run: dict) -> None:
    report, model = browser_run["report"], browser_run["model"]
    assert "Decision support, not a diagnosis" in report["notice"]
    assert f"{model['name']} {model['version']}" in report["modelHeader"]


def test_page_controls_are_labelled_and_text_has_aa_contrast(browser_run: dict) -> None:
    report = browser_run["report"]
    assert report["unlabelled"] == [] and report["unlabelledAfter"] == []
    assert report["lowContrast"] == [] and report["lowContrastError"] == []


def test_page_and_docs_work_offline_without_script_errors(browser_run: dict) -> None:
    report = browser_run["report"]
    assert report["offsite"] == []
    # A 4xx answer is logged by chromium as a failed resource load; anything else is a real error.
    assert [m for m in report["consoleErrors"] if not m.startswith("Failed to load resource")] == []
    assert "btd" in report["docs"]["title"]
    assert "/v1/predict" in report["docs"]["operations"] and "/v1/model" in report["docs"]["operations"]


def test_screenshots_are_saved_as_artifacts(browser_run: dict) -> None:
    for name in ("web-page-result", "web-page-dicom", "web-page-error", "web-page-series", "docs"):
        shot = cv2.imread(str(ARTIFACTS / f"{name}.png"))
        assert shot is not None and shot.shape[1] == 1280 and shot.std() > 5  # a real, non-blank page


def test_page_asks_for_an_api_key_when_the_service_needs_one(browser_run: dict) -> None:
    keyed, model = browser_run["report"]["keyed"], browser_run["model"]
    assert "asks for an API key" in keyed["askedFirst"] and "waiting for an API key" in keyed["header"]
    assert "not accepted" in keyed["wrongKey"]
    assert keyed["formHiddenAfter"] and f"{model['name']} {model['version']}" in keyed["modelHeader"]
    assert keyed["state"] == "done" and keyed["label"]
    assert keyed["unlabelled"] == []
    assert keyed["keyInStorage"] and not keyed["keyInLocalStorage"]  # this tab only, never persisted


def test_a_readers_agreement_and_correction_reach_the_records(browser_run: dict) -> None:
    seen, api = browser_run["report"]["feedback"], browser_run["image"]
    assert seen["visible"] and seen["formOpen"] and seen["unlabelled"] == []
    assert seen["options"] == [label for label in api["probabilities"] if label != api["label"]]
    assert seen["agreed"].startswith("Recorded: you agree"), seen["agreed"]
    assert seen["correctedStatus"].startswith("Correction recorded"), seen["correctedStatus"]
    assert seen["formHiddenAfter"] and browser_run["report"]["lowContrastFeedback"] == []
    # The database: one reading by that reader (the correction replaced the agreement), joined to the
    # prediction the page showed.
    by_id = {r["id"]: r for r in browser_run["predictions"]}
    (reading,) = browser_run["feedback"]
    assert reading["reader_id"] == "reader-17" and reading["label"] == seen["corrected"]
    assert reading["tumour_present"] is (seen["corrected"] != "notumor")
    assert by_id[reading["prediction_id"]]["request_id"] == seen["requestId"]
    assert reading["updated_at"] >= reading["created_at"]


def test_page_offers_no_feedback_on_an_image_not_assessed(browser_run: dict) -> None:
    assert browser_run["report"]["dicom"]["feedbackVisible"] is False


def test_page_says_a_key_without_the_feedback_scope_cannot_send_feedback(browser_run: dict) -> None:
    refused = browser_run["report"]["keyed"]["feedbackRefused"]
    assert "feedback scope" in refused and "(HTTP 403)" in refused


def test_page_draws_the_tumour_region_over_the_image_with_its_own_toggle(browser_run: dict) -> None:
    seen, region = browser_run["report"]["region"], browser_run["region"]["region"]
    assert region is not None and seen["state"] == "done" and seen["visible"] and seen["heatmapVisible"]
    assert seen["viewBox"] == f"0 0 {region['image_width']} {region['image_height']}"
    assert len(seen["polygons"]) == len(region["contours"])
    first = [tuple(float(v) for v in point.split(",")) for point in seen["polygons"][0].split()]
    assert first == [(x + 0.5, y + 0.5) for x, y in region["contours"][0]]
    assert seen["box"] == region["box"]
    # The overlay covers the picture exactly, so image pixels land where they belong on the screen.
    assert seen["overlayRect"] == pytest.approx(seen["imageRect"], abs=0.5)
    scale = seen["imageRect"]["width"] / region["image_width"]
    points = np.array(region["contours"][0]) + 0.5
    on_screen = seen["contoursRect"]
    assert on_screen["x"] == pytest.approx(seen["imageRect"]["x"] + points[:, 0].min() * scale, abs=2)
    assert on_screen["y"] == pytest.approx(seen["imageRect"]["y"] + points[:, 1].min() * scale, abs=2)
    assert on_screen["width"] == pytest.approx(np.ptp(points[:, 0]) * scale, abs=3)
    # The disc of the slice (centre 200, 100; radius 20) is inside the drawn box.
    box = region["box"]
    assert box["x"] <= 185 and 215 <= box["x"] + box["width"] and box["y"] <= 85 and 115 <= box["y"] + box["height"]
    assert f"{box['width']} × {box['height']} pixels" in seen["caption"]
    # Its toggle hides the region only; the heatmap stays.
    assert seen["toggledOff"] == {"checked": False, "visible": False, "heatmapVisible": True}
    assert seen["toggledOn"] == {"checked": True, "visible": True}
    assert seen["unlabelled"] == [] and seen["lowContrast"] == []
    assert browser_run["report"]["regionControlWithoutMap"] is False  # a model without a map: no region control


# ------------------------------------------------------------------------------------------- series

FINDING_WORDS = {True: "Tumour suspected", False: "No tumour suspected"}


def assert_strip_shows(seen: dict, api: dict) -> None:
    """One cell per slice of the API's answer, in its order: key slices and slices not assessed marked,
    each bar as high as the slice's tumour probability."""
    finding = api["finding"]
    assert [c["index"] for c in seen["cells"]] == [s["index"] for s in api["slices"]]
    assert [c["index"] for c in seen["cells"] if c["key"]] == finding["key_slices"]
    for cell, item in zip(seen["cells"], api["slices"]):
        result = item["result"]
        assert cell["assessed"] is (result["in_distribution"] is not False)
        if not cell["assessed"]:
            assert cell["mark"] == "\u2715" and "not assessed" in cell["label"] and cell["barHeight"] is None
        else:
            assert cell["mark"] == ("\u2605" if cell["key"] else "")
            assert cell["barHeight"] == pytest.approx(result["tumour_probability"] * cell["boxHeight"], abs=1.5)
            assert cell["over"] is (result["tumour_probability"] >= finding["threshold"])
        assert cell["label"].startswith(f"Slice {item['index'] + 1} of {len(api['slices'])}")
        assert ("key slice" in cell["label"]) is cell["key"]


def assert_finding_shows(seen: dict, api: dict) -> None:
    finding = api["finding"]
    assert seen["visible"] and seen["singleHidden"]
    if finding["assessed"]:
        assert seen["finding"] == FINDING_WORDS[finding["tumour_detected"]]
        assert f"series tumour probability {percent(finding['tumour_probability'])}" in seen["decision"]
    else:
        assert seen["finding"] == "Not assessed"
    assert seen["assessed"] == f"{finding['slices_assessed']} of {len(api['slices'])}"
    assert seen["notAssessed"] == str(finding["slices_not_assessed"])
    assert seen["rule"].lower().startswith(finding["rule"][:40].lower())


def test_page_shows_a_series_finding_and_one_cell_per_slice(browser_run: dict) -> None:
    seen, api = browser_run["report"]["series"]["shown"], browser_run["series"]
    assert len(api["slices"]) == SERIES_SLICES + 1 and api["ordering"] == "position"
    assert api["finding"]["key_slices"], "the synthetic series should give the test model key slices"
    assert_finding_shows(seen, api)
    assert_strip_shows(seen, api)
    # the 64x64 slice: not assessed, and the page says why in words
    assert api["finding"]["not_assessed_reasons"] == {"small-image": 1}
    assert seen["reasons"] == ["1 slice: It is too small to be a whole MR slice."]
    # it opens on the first key slice, with the server's image of it and its heatmap
    first_key = api["finding"]["key_slices"][0]
    assert seen["selected"] == [first_key] and seen["activedescendant"] == f"slice-{first_key}"
    assert seen["caption"].startswith(f"Slice {first_key + 1} of {SERIES_SLICES + 1}") and "key slice" in seen["caption"]
    assert seen["image"]["loaded"] and seen["image"]["width"] == api["slices"][first_key]["result"]["cam"]["width"]
    assert seen["heatmapShown"]


def test_series_slices_move_with_arrow_keys_a_click_and_the_wheel(browser_run: dict) -> None:
    series = browser_run["report"]["series"]
    last = SERIES_SLICES  # the index of the last slice
    assert [(k["key"], k["selected"]) for k in series["keys"]] == [
        ("Home", [0]), ("ArrowRight", [1]), ("ArrowRight", [2]), ("ArrowLeft", [1]), ("End", [last]),
        ("ArrowRight", [last]), ("ArrowDown", [last]), ("ArrowUp", [last - 1])]
    for k in series["keys"]:
        assert k["caption"].startswith(f"Slice {k['selected'][0] + 1} of {last + 1}")
    assert "not assessed" in series["keys"][4]["caption"]  # the last slice is the 64x64 one
    assert series["clicked"] == [1] and series["wheeled"] == [2]
    assert series["wheelCaption"].startswith(f"Slice 3 of {last + 1}")


def test_a_folder_of_a_series_is_sent_without_its_other_files(browser_run: dict) -> None:
    series, api = browser_run["report"]["series"], browser_run["series"]
    assert series["droppedState"] == "done"  # the same files dropped together: the same series
    assert_strip_shows(series["dropped"], api)
    assert series["folderState"] == "done"
    assert_finding_shows(series["folder"], api)
    assert_strip_shows(series["folder"], api)
    assert "1 file that is not DICOM images (e.g. README.txt) left out" in series["folder"]["status"]


def test_a_series_refused_by_the_service_is_explained_in_its_words(browser_run: dict) -> None:
    series = browser_run["report"]["series"]
    assert series["mixedState"] == "error"
    error = series["mixedError"]
    assert error["role"] == "alert" and error["seriesHidden"]
    assert "could not be analysed. The instances belong to 2 series (Series Instance UID); send one series." in error["text"]
    assert "(HTTP 400)" in error["text"]


def test_a_nifti_volume_is_shown_as_a_series(browser_run: dict) -> None:
    seen, api = browser_run["report"]["nifti"], browser_run["nifti"]
    assert api["source"] == "nifti" and len(api["slices"]) == 4
    assert_finding_shows(seen, api)
    assert_strip_shows(seen, api)


def test_series_view_is_labelled_and_has_aa_contrast(browser_run: dict) -> None:
    series = browser_run["report"]["series"]
    assert series["unlabelled"] == [] and series["lowContrast"] == []
