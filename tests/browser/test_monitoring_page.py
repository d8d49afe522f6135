"""The monitoring page (/monitoring) in a real browser: it plots what GET /v1/monitoring says, from this
server only. The service runs the small test model stamped with a baseline its answers cannot match,
so the page has drift to show."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np

from app.core.baseline import build_baseline, signal_values
from model_export.baseline import stamp
from tests.api.helpers import ServerProcess, png_bytes
from tests.browser.test_web_page import ARTIFACTS, BROWSER_DIR, CHROMIUM, NODE, SCRIPT_TIMEOUT_S, pytestmark  # noqa: F401
from tests.model_factory import LABELS, build_model

SCRIPT = BROWSER_DIR / "monitoring_page.mjs"
IMAGES = 25  # windows of 10: two full ones in the history, and the current


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
            drift = httpx.get(f"{server.url}/v1/monitoring").json()["drift"]
            if drift["window_records"] == 10 and len(drift["signals"]["class_mix"]["history"]) == 2:
                break
            time.sleep(0.2)
        env = {**os.environ, "BASE_URL": server.url, "ARTIFACTS": str(ARTIFACTS), "PROFILE": str(tmp_path / "profile"),
               "CHROMIUM": str(CHROMIUM)}
        done = subprocess.run([NODE, str(SCRIPT)], cwd=BROWSER_DIR, env=env, capture_output=True, text=True,
                              timeout=SCRIPT_TIMEOUT_S, check=False)
        assert done.returncode == 0, f"browser script failed:\n{done.stderr[-4000:]}"
        api = httpx.get(f"{server.url}/v1/monitoring").json()
    seen = json.loads(done.stdout)
    assert seen["offsite"] == [] and seen["consoleErrors"] == []
    assert seen["model"] == "btd-test 0.0.1-test"
    assert seen["status"].startswith("Drift alert: 10 answers in the window") and "error" in seen["statusClass"]
    assert seen["threshold"] == "0.25"
    assert "Not measured yet" in seen["performance"] and api["performance"] is None
    signals = api["drift"]["signals"]
    assert len(seen["charts"]) == len(signals) == 3  # class mix, tumour probability, intensity (no OOD output)
    for chart, (name, signal) in zip(seen["charts"], signals.items()):
        plotted = [p for p in signal["history"] if p["psi"] is not None]
        assert chart["points"] == len(plotted) and chart["tableRows"] == len(signal["history"])
        assert chart["over"] == sum(p["psi"] > signal["threshold"] for p in plotted)
        assert chart["thresholdLine"] == 1 and chart["width"] > 200
        assert f"PSI {signal['psi']:.3f}" in chart["caption"], (name, chart["caption"])
        assert ("over the threshold" in chart["caption"]) == signal["over_threshold"]
