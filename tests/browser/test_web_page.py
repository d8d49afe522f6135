"""The clinician page and /docs in a real browser: Debian's chromium driven by npm playwright-core.

One module-scoped run of ``web_page.mjs`` against the real service (``python -m app`` on a free
127.0.0.1 port with the small test model, or ``BTD_BROWSER_MODEL``) uploads a real slice (a
figshare-cheng test image when ``../shared/data`` is present, else a synthetic PNG), a DICOM and a
broken file, and opens /docs with every off-site request refused. The tests check what it saw
against what the API itself answers. Screenshots land in ``test-artifacts/browser/``.

To refresh the README screenshot with the shipped model::

    BTD_BROWSER_MODEL=models/btd-resnet50.onnx .venv/bin/python -m pytest tests/browser
    cp test-artifacts/browser/web-page-result.png docs/web-page.png
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from app.transports.http.api_keys import key_line, new_key
from tests.api.helpers import ServerProcess
from app.core.contract import LocalisationSpec
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
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):  # so a stale screenshot cannot pass for a new one
        old.unlink()

    # A model with a tumour map (high where the slice is bright) that calls every assessed image a tumour.
    region_model = build_model(work / "region.onnx", size=64, localisation=LocalisationSpec(0.5, 0.002))
    region_image = work / "tumour-slice.png"
    region_image.write_bytes(tumour_slice_png(blob=(200, 100)))
    key = new_key()
    with ServerProcess(model, ready_timeout_s=120, BTD_INTRA_OP_THREADS="1") as server, \
            ServerProcess(model, ready_timeout_s=120, BTD_INTRA_OP_THREADS="1",
                          BTD_API_KEYS=key_line("clinician", key)) as keyed, \
            ServerProcess(region_model, ready_timeout_s=120, BTD_INTRA_OP_THREADS="1",
                          BTD_TUMOUR_THRESHOLD="0") as localising:
        base_url = server.url
        env = {**os.environ, "BASE_URL": base_url, "IMAGE": str(image), "DICOM": str(dicom),
               "BROKEN": str(broken), "ARTIFACTS": str(ARTIFACTS), "PROFILE": str(work / "profile"),
               "CHROMIUM": str(CHROMIUM), "KEYED_URL": keyed.url, "API_KEY": key,
               "REGION_URL": localising.url, "REGION_IMAGE": str(region_image)}
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
    return {"report": json.loads(done.stdout), "model": api_model, "image": api_image, "broken": api_broken,
            "dicom": api_dicom, "region": api_region}


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
    # the file picker offers what the service reads, from /v1/model (app.core.formats), not a copy
    from app.core.formats import FORMATS

    assert set(report["accept"].split(",")) == {x for f in FORMATS for x in (*f.suffixes, f.media_type)}


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
    for name in ("web-page-result", "web-page-dicom", "web-page-error", "docs"):
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
