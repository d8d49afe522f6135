"""The monitoring page (/monitoring) in a real browser: it plots what GET /v1/monitoring says, from this
server only. The service runs the small test model stamped with a baseline its answers cannot match,
so the page has drift to show; readers' feedback on some answers gives it live performance to show."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.core.baseline import build_baseline, signal_values
from model_export.baseline import stamp
from tests.api.helpers import ServerProcess, png_bytes
from tests.browser.test_web_page import ARTIFACTS, BROWSER_DIR, CHROMIUM, NODE, SCRIPT_TIMEOUT_S, pytestmark  # noqa: F401
from tests.model_factory import LABELS, build_model

SCRIPT = BROWSER_DIR / "monitoring_page.mjs"
IMAGES = 25  # windows of 10: two full ones in the history, and the current


FEEDBACK = 8  # readings posted, on the first 8 of 10 answers


def browse(server: ServerProcess, tmp_path: Path, shot: str) -> dict:
    """What the browser script saw on /monitoring (its screenshot: ``shot`` in ARTIFACTS)."""
    env = {**os.environ, "BASE_URL": server.url, "ARTIFACTS": str(ARTIFACTS), "PROFILE": str(tmp_path / "profile"),
           "CHROMIUM": str(CHROMIUM), "SHOT": shot}
    done = subprocess.run([NODE, str(SCRIPT)], cwd=BROWSER_DIR, env=env, capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"browser script failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout)


def baselined_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    answers = [signal_values(label=LABELS[0], assessed=True, tumour_probability=float(rng.uniform(0.98, 1.0)),
                             ood_score=None, percentiles=(0.0, 0.0, 50.0, 120.0, 200.0)) for _ in range(300)]
    return stamp(build_model(path), build_baseline(answers, LABELS, source={"split": "val"}))


def test_monitoring_page_plots_each_signals_drift_as_the_api_reports_it(tmp_path):
    model = baselined_model(tmp_path / "model.onnx")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with ServerProcess(model, ready_timeout_s=120, BTD_INTRA_OP_THREADS="1", BTD_RECORDS_DIR=str(tmp_path / "db"),
                       BTD_DRIFT_WINDOW="10", BTD_DRIFT_MIN_RECORDS="5", BTD_DRIFT_INTERVAL_S="0.5") as server:
        for i in range(IMAGES):
            httpx.post(f"{server.url}/v1/predict", content=png_bytes((120, 120), seed=i),
                       headers={"Content-Type": "image/png"}, timeout=60).raise_for_status()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # records written, then drift refreshed from them
            report = httpx.get(f"{server.url}/v1/monitoring").json()
            drift = report["drift"]
            if (drift["window_records"] == 10 and len(drift["signals"]["class_mix"]["history"]) == 2
                    and report["performance"] is not None):  # and live performance refreshed once
                break
            time.sleep(0.2)
        seen = browse(server, tmp_path, "monitoring-page.png")
        api = httpx.get(f"{server.url}/v1/monitoring").json()
    assert seen["offsite"] == [] and seen["consoleErrors"] == []
    assert seen["model"] == "btd-test 0.0.1-test"
    assert seen["status"].startswith("Drift alert: 10 answers in the window") and "error" in seen["statusClass"]
    assert seen["threshold"] == "0.25"
    assert api["performance"]["models"] == {}  # records on, no feedback: the empty state
    assert seen["performance"].startswith("No readers' feedback yet") and seen["models"] == []
    signals = api["drift"]["signals"]
    assert len(seen["charts"]) == len(signals) == 3  # class mix, tumour probability, intensity (no OOD output)
    for chart, (name, signal) in zip(seen["charts"], signals.items()):
        plotted = [p for p in signal["history"] if p["psi"] is not None]
        assert chart["points"] == len(plotted) and chart["tableRows"] == len(signal["history"])
        assert chart["over"] == sum(p["psi"] > signal["threshold"] for p in plotted)
        assert chart["thresholdLine"] == 1 and chart["width"] > 200
        assert f"PSI {signal['psi']:.3f}" in chart["caption"], (name, chart["caption"])
        assert ("over the threshold" in chart["caption"]) == signal["over_threshold"]


def test_monitoring_page_shows_live_performance_against_readers_feedback(tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with ServerProcess(build_model(tmp_path / "model.onnx"), ready_timeout_s=120, BTD_INTRA_OP_THREADS="1",
                       BTD_RECORDS_DIR=str(tmp_path / "db"), BTD_PERFORMANCE_INTERVAL_S="0.3") as server:
        answers = []
        for i in range(10):
            response = httpx.post(f"{server.url}/v1/predict", content=png_bytes((120, 120), seed=i),
                                  headers={"Content-Type": "image/png"}, timeout=60)
            answers.append(response.raise_for_status().json())
        # Readers agree on even answers and find the opposite on odd ones (no keys: no scope needed).
        pairs = []
        for i, answer in enumerate(answers[:FEEDBACK]):
            assert answer["label"] in LABELS  # the test model assesses every slice: each reading counts
            opposite = "glioma" if answer["label"] == "notumor" else "notumor"
            reader = answer["label"] if i % 2 == 0 else opposite
            httpx.post(f"{server.url}/v1/feedback", json={"request_id": answer["request_id"], "label": reader},
                       timeout=30).raise_for_status()
            pairs.append((answer["label"], reader))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the exporter refreshed after the last reading
            models = (httpx.get(f"{server.url}/v1/monitoring").json()["performance"] or {}).get("models", {})
            if models and next(iter(models.values()))["confirmed"] == FEEDBACK:
                break
            time.sleep(0.2)
        seen = browse(server, tmp_path, "monitoring-performance.png")
        api = httpx.get(f"{server.url}/v1/monitoring").json()
    assert seen["offsite"] == [] and seen["consoleErrors"] == []
    model = api["performance"]["models"][api["model_version"]]
    assert model["confirmed"] == FEEDBACK
    assert len(seen["models"]) == 1
    page = seen["models"][0]
    assert page["version"] == api["model_version"] and "(served now)" in page["heading"]
    assert page["confirmed"].startswith(f"{FEEDBACK} confirmed cases from {FEEDBACK} readings")
    # The confusion matrix: the model's label (rows) against the readers' (columns), totals included.
    labels = sorted({label for pair in pairs for label in pair})
    counted = Counter(pairs)
    assert page["confusion"]["columns"] == [*labels, "Total"] and page["confusion"]["rows"] == labels
    assert page["confusion"]["counts"] == [[counted[(m, r)] for r in labels] + [sum(counted[(m, r)] for r in labels)]
                                           for m in labels]
    assert page["confusion"]["totals"] == [sum(counted[(m, r)] for m in labels) for r in labels] + [FEEDBACK]
    assert page["confusion"]["agree"] == sum(m == r for m, r in pairs) == FEEDBACK // 2
    # Class agreement in words: half the readings agree.
    assert page["figures"]["class_agreement"].startswith("0.50 (95% interval ")
    assert page["figures"]["class_agreement"].endswith(f"; {FEEDBACK // 2} of {FEEDBACK})")
    assert page["intervalBars"] == sum(model[k]["value"] is not None
                                       for k in ("sensitivity", "specificity", "class_agreement"))
    # The reliability diagram: one dot per probability bin holding cases, the diagonal, every bin in the table.
    bins = model["calibration"]["reliability"]
    assert page["reliability"]["dots"] == sum(b["cases"] > 0 for b in bins) >= 1
    assert page["reliability"]["diagonal"] == 1 and page["reliability"]["width"] > 200
    assert page["reliability"]["binRows"] == len(bins) == 10
    assert page["reliability"]["binCases"] == model["calibration"]["cases"] == FEEDBACK
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    assert page["reliability"]["bins"] == [[f"{b['lower']:.1f}-{b['upper']:.1f}", str(b["cases"]),
                                            fmt(b["mean_probability"]), fmt(b["observed"])] for b in bins]
    assert sum(b["cases"] * b["observed"] for b in bins if b["cases"]) == pytest.approx(
        sum(reader != "notumor" for _, reader in pairs))  # the observed shares are the readers' tumour findings
    assert f"over {FEEDBACK} cases" in page["reliability"]["caption"]
