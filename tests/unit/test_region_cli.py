"""``btd predict`` with a localising model: the region's box in the table, the CSV and the JSON."""

import csv
import io
import json

from app.core.contract import LocalisationSpec
from app.transports.cli.predict import main
from tests.model_factory import build_model, tumour_slice_png


def test_btd_predict_prints_the_region_box(tmp_path, monkeypatch, capsys):
    model = build_model(tmp_path / "m.onnx", size=64, localisation=LocalisationSpec(0.5, 0.002))
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "a.png").write_bytes(tumour_slice_png(blob=(200, 100)))
    monkeypatch.setenv("BTD_TUMOUR_THRESHOLD", "0")  # every assessed image is a called tumour
    outputs = {}
    for fmt in ("table", "csv", "json"):
        assert main(["--model", str(model), str(tmp_path / "scans"), "--format", fmt, "--no-progress"]) == 0
        outputs[fmt] = capsys.readouterr().out
    region = json.loads(outputs["json"])[0]["result"]["region"]
    box = region["box"]
    text = f"{box['x']},{box['y']} {box['width']}x{box['height']}"
    assert box["x"] <= 185 and 215 <= box["x"] + box["width"] and box["width"] < 80
    assert f"region {text}" in outputs["table"].splitlines()[1]
    assert next(csv.DictReader(io.StringIO(outputs["csv"])))["region_box"] == text
