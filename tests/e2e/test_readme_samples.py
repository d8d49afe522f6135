"""The README's sample outputs are what the shipped model answers (scripts/readme_samples.py), and
the check that says so catches a stale sample."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

from scripts import readme_samples as samples

README_TEXT = samples.README.read_text()


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return samples.generate(samples.SHIPPED_MODEL, tmp_path_factory.mktemp("inputs"))


def test_readme_samples_are_what_the_shipped_model_answers(fresh: dict[str, str]) -> None:
    problems = samples.stale(README_TEXT, fresh)
    assert not problems, f"{problems}: run .venv/bin/python -m scripts.readme_samples --write"


def test_readme_has_every_sample_once() -> None:
    names = [line.removeprefix("<!-- sample: ").removesuffix(" -->")
             for line in README_TEXT.splitlines() if line.startswith("<!-- sample: ")]
    assert sorted(names) == sorted(samples.SAMPLES)


def _edited(fresh: dict[str, str], name: str, old: str, new: str) -> str:
    assert old in fresh[name], old
    return samples.with_samples(README_TEXT, {**fresh, name: fresh[name].replace(old, new, 1)})


@pytest.mark.parametrize("name,field", [("predict-dicom-grid", "version"), ("predict-dicom-grid", "label"),
                                        ("predict-dicom-grid", "probability"), ("predict-dicom-grid", "warnings"),
                                        ("predict-dicom-grid", "timings"),
                                        ("btd-predict-table", "label"), ("btd-predict-table", "probability")])
def test_check_catches_a_stale_sample(fresh: dict[str, str], name: str, field: str) -> None:
    if name == "predict-dicom-grid":
        body = json.loads(fresh[name])
        label, p = body["label"], body["probabilities"][body["label"]]
        old, new = {"version": (f'"{body["model"]["version"]}"', '"0.9.0"'),
                    "label": (f'"label": "{label}"', '"label": "other"'),
                    "probability": (f'"{label}": {p}', f'"{label}": {round(p - 0.01, 3)}'),
                    "warnings": (f'"warnings": {json.dumps(body["warnings"])}', '"warnings": ["the image is small"]'),
                    "timings": ('"total": ', '"all": ')}[field]
    else:
        header, row = samples.parse_sample(fresh[name])[:2]
        label, p = row[header.index("LABEL")], row[header.index("P")]
        if field == "label":
            old, new = f"  {label}  ", "  other  "
        elif samples.number(p) is not None:
            old, new = f"  {p}  ", f"  {float(p) - 0.01:.3f}  "
        else:  # not assessed: no probability is shown, the note says why
            old, new = row[-1], "a note the model no longer writes"
    assert name in samples.stale(_edited(fresh, name, old, new), fresh)


def test_check_ignores_timings_and_rounding_in_the_last_digit(fresh: dict[str, str]) -> None:
    body = json.loads(fresh["predict-dicom-grid"])
    label, p = body["label"], body["probabilities"][body["label"]]
    timings = json.dumps(body["timings_ms"])
    slower = json.dumps({k: v * 3 + 1 for k, v in body["timings_ms"].items()})
    text = samples.with_samples(README_TEXT, {
        **fresh, "predict-dicom-grid": fresh["predict-dicom-grid"].replace(timings, slower).replace(
            f'"{label}": {p}', f'"{label}": {round(p + 0.001, 3)}')})
    assert samples.stale(text, fresh) == {}


def test_write_replaces_only_the_sample_blocks() -> None:
    text = "intro\n<!-- sample: a -->\n```json\n{\"x\": 1}\n```\nmiddle\n<!-- sample: b -->\n```text\n```\nend\n"
    written = samples.with_samples(text, {"a": '{"x": 2}\n', "b": "T\n"})
    assert written == "intro\n<!-- sample: a -->\n```json\n{\"x\": 2}\n```\nmiddle\n<!-- sample: b -->\n```text\nT\n```\nend\n"
    assert samples.readme_samples(written) == {"a": '{"x": 2}\n', "b": "T\n"}


def test_inputs_are_a_slice_and_pydicoms_mr_crop(tmp_path: Path) -> None:
    inputs = samples.write_inputs(tmp_path)
    assert cv2.imread(str(inputs["png"]), cv2.IMREAD_UNCHANGED).shape == (256, 256)
    assert inputs["dicom"].read_bytes()[128:132] == b"DICM"
