"""The validation report of the figshare-cheng test rows renders in a browser (issue 25's check).

``btd validate`` runs as a user runs it (a subprocess, the shipped model with the service's default
variant: INT8 on a CPU) on figshare-cheng's test rows (the rows whose group lies in the test split
of brain-mri-4class's ``splits.csv``, column ``in_4class_splits``: what the model card and
``models/release.py`` hold out). For runtime it takes the first ``BTD_VALIDATE_ROWS_PER_CLASS`` rows
of each class (default 20: 60 of the 293 slices, about 10 s on 2 cores; 0 takes all). Then
``validation_report.mjs`` opens the HTML in chromium with the network refused and reports what
rendered; the screenshot lands in ``test-artifacts/browser/validation-report.png``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from app.core import metrics
from app.core.model import ModelFile
from tests.browser.test_web_page import ARTIFACTS, BROWSER_DIR, CHROMIUM, NODE, REPO_ROOT, data_dir

SCRIPT = BROWSER_DIR / "validation_report.mjs"
MODEL = REPO_ROOT / "models" / "btd-resnet50.onnx"
ROWS_PER_CLASS = int(os.environ.get("BTD_VALIDATE_ROWS_PER_CLASS", "20"))
RUN_TIMEOUT_S = 600

pytestmark = [
    pytest.mark.slow,
    pytest.mark.data,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no chromium at {CHROMIUM} (test.sh installs it)"),
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir(),
                       reason="tests/browser/node_modules is missing (scripts/test.sh runs npm ci)"),
    pytest.mark.skipif(not MODEL.is_file(), reason=f"the shipped model {MODEL} is absent"),
]


def figshare_test_rows() -> list[dict[str, str]]:
    index = data_dir() / "figshare-cheng" / "index.csv"
    if not index.is_file():
        pytest.skip(f"figshare-cheng is absent ({index}): see ../shared/data/README.md")
    with open(index, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["in_4class_splits"] == "test"]
    taken: Counter[str] = Counter()
    chosen = []
    for row in rows:
        if ROWS_PER_CLASS <= 0 or taken[row["label"]] < ROWS_PER_CLASS:
            taken[row["label"]] += 1
            chosen.append(row)
    return chosen


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict:
    rows = figshare_test_rows()
    work = tmp_path_factory.mktemp("validate")
    scans = work / "scans"
    for row in rows:  # the site's folder: links to the test rows, labels.csv beside it
        (scans / row["image"]).parent.mkdir(parents=True, exist_ok=True)
        (scans / row["image"]).symlink_to(data_dir() / "figshare-cheng" / row["image"])
    labels = work / "labels.csv"
    with open(labels, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label"])
        writer.writerows((row["image"], row["label"]) for row in rows)
    html = work / "report.html"
    done = subprocess.run([sys.executable, "-m", "app.transports.cli.btd", "validate", str(scans), "--labels",
                           str(labels), "--out", str(html), "--model", str(MODEL), "--no-progress"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "REPORT": str(html), "ARTIFACTS": str(ARTIFACTS), "PROFILE": str(work / "profile"),
           "CHROMIUM": str(CHROMIUM)}
    seen = subprocess.run([NODE, str(SCRIPT)], cwd=BROWSER_DIR, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, check=False)
    assert seen.returncode == 0, f"browser script failed:\n{seen.stderr[-4000:]}"
    return {"seen": json.loads(seen.stdout), "figures": json.loads(html.with_suffix(".json").read_text()),
            "labels": Counter(row["label"] for row in rows), "html": html}


def test_the_figures_render_with_a_size(rendered: dict) -> None:
    figures = {f["id"]: f for f in rendered["seen"]["figures"]}
    assert set(figures) == {"roc-figure", "reliability-figure"}
    for figure in figures.values():
        assert figure["width"] > 200 and figure["height"] > 200 and figure["paths"] > 10, figure


def test_the_confusion_matrix_adds_up_to_the_labelled_images(rendered: dict) -> None:
    cm, overall = rendered["seen"]["confusion"], rendered["figures"]["overall"]
    assert cm["visible"] and cm["labels"] == ["glioma", "meningioma", "notumor", "pituitary"]
    assert all(sum(r["values"]) == r["total"] for r in cm["rows"])
    assert cm["columnTotals"] == [sum(col) for col in zip(*(r["values"] for r in cm["rows"]))]
    assert cm["total"] == sum(r["total"] for r in cm["rows"]) == overall["assessed"]
    # every labelled slice is either in the matrix, under its true label, or counted as not assessed
    assert sum(rendered["labels"].values()) == cm["total"] + overall["not_assessed"]["images"] + overall["failed"]["images"]
    row_totals = {r["label"]: r["total"] for r in cm["rows"]}
    assert all(row_totals[label] <= n for label, n in rendered["labels"].items())
    assert row_totals["notumor"] == 0  # figshare-cheng has no tumour-free slices


def test_the_site_figures_stand_beside_the_model_cards(rendered: dict) -> None:
    comparison, overall = rendered["seen"]["comparison"], rendered["figures"]["overall"]
    stored = ModelFile.load(MODEL).metadata.metrics
    stored = stored.get("fp32_source", stored)
    assert comparison[metrics.ACCURACY]["card"] == f"{100 * stored[metrics.ACCURACY]:.1f}%"
    accuracy = overall["metrics"][metrics.ACCURACY]
    assert comparison[metrics.ACCURACY]["site"].startswith(f"{100 * accuracy['value']:.1f}%")
    low, high = accuracy["ci"]
    assert f"({100 * low:.1f}% to {100 * high:.1f}%)" in comparison[metrics.ACCURACY]["site"]
    assert comparison[metrics.TUMOUR_SPECIFICITY]["site"] == "n/a"  # no tumour-free slice to measure it on


def test_jpeg_slices_fall_in_the_unknown_subgroups(rendered: dict) -> None:
    subgroups = rendered["seen"]["subgroups"]
    assert set(subgroups) == {"subgroup-sequence", "subgroup-plane", "subgroup-manufacturer", "subgroup-field_strength"}
    assert all(values == ["unknown"] for values in subgroups.values())


def test_the_report_is_one_file_that_fetches_nothing(rendered: dict) -> None:
    seen = rendered["seen"]
    assert seen["offsite"] == [] and seen["resources"] == [] and seen["consoleErrors"] == []
    assert seen["counts"]["labelled"] == str(sum(rendered["labels"].values()))
