"""The README's sample inputs, and the answers the shipped model gives for them, kept true by a test.

    .venv/bin/python -m scripts.readme_samples --inputs /tmp   # write /tmp/slice.png and /tmp/MR_small.dcm
    .venv/bin/python -m scripts.readme_samples                 # check the README's samples (exit 1 if stale)
    .venv/bin/python -m scripts.readme_samples --write         # rewrite them (after shipping a new model)

Each generated sample in README.md is the fenced block right after a line ``<!-- sample: NAME -->``.
The check compares what is stable: model name, version and file hash, labels, probabilities and
CAM values to the printed precision, decisions, warnings and the fields present; not timings.
The answers come from the service's own code with default settings, whatever ``BTD_*`` says.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHIPPED_MODEL = REPO / "models" / "btd-resnet50.onnx"
DIGITS = 3  # probabilities, CAM values: printed to 3 decimals, compared to +-1 in the last one
TOLERANCE = 1.5 * 10 ** -DIGITS
VOLATILE_KEYS = ("timings_ms", "request_id")  # shown as they came, compared by their keys (or not at all)
REQUEST_ID = "pacs-0001"  # the X-Request-ID of the README's DICOM example
CAM_VALUES_SHOWN = 3  # first values of the CAM grid's first row; the rest is elided
MARKER = re.compile(r"^<!-- sample: ([a-z0-9-]+) -->\n```[a-z]*\n(.*?)^```$", re.MULTILINE | re.DOTALL)


# ---------------------------------------------------------------- the inputs


def synthetic_slice() -> bytes:
    """A 256x256 8-bit PNG: one bright Gaussian blob (a stand-in that anyone can make, not anatomy)."""
    y, x = np.mgrid[:256, :256]
    blob = 255 * np.exp(-((x - 128.0) ** 2 + (y - 110.0) ** 2) / 3000)
    return cv2.imencode(".png", blob.astype(np.uint8))[1].tobytes()


def write_inputs(folder: Path) -> dict[str, Path]:
    """The README's two inputs: the synthetic slice and pydicom's bundled MR test file (a 64x64 crop)."""
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True, exist_ok=True)
    png, dicom = folder / "slice.png", folder / "MR_small.dcm"
    png.write_bytes(synthetic_slice())
    shutil.copyfile(get_testdata_file("MR_small.dcm"), dicom)
    return {"png": png, "dicom": dicom}


# ---------------------------------------------------------------- the samples


def rounded(value: Any, digits: int = DIGITS) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, 1 if k in VOLATILE_KEYS else digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def render_prediction(body: dict[str, Any]) -> str:
    """The response one key a line, numbers rounded, the CAM grid cut to its first values."""
    shown = rounded(body)
    cam = shown.get("cam") or {}
    if "grid" in cam:
        cam["grid"] = [[*cam["grid"][0][:CAM_VALUES_SHOWN], "..."], "..."]
    lines = [f"{json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}" for key, value in shown.items()]
    return "{" + ",\n ".join(lines) + "}\n"


def post(model_path: Path, url: str, body: bytes, headers: dict[str, str]):
    """The service's answer to one request, from the app in this process."""
    import warnings

    with warnings.catch_warnings():  # starlette's advice to move its test client to httpx2: not ours
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
        from fastapi.testclient import TestClient

    from app.transports.http.main import create_app

    # As the README's curl sends it (Host 127.0.0.1:8000); not a served prediction, so no audit line.
    app = create_app(default_settings(model_path).model_copy(update={"audit_log": "off"}), background_load=False)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        return client.post(url, content=body, headers=headers)


def predict_dicom_grid(model_path: Path, inputs: dict[str, Path]) -> str:
    """``curl ... -H 'X-Request-ID: pacs-0001' '.../v1/predict?cam=grid'`` with the DICOM."""
    response = post(model_path, "/v1/predict?cam=grid", inputs["dicom"].read_bytes(),
                    {"Content-Type": "application/dicom", "X-Request-ID": REQUEST_ID})
    response.raise_for_status()
    return render_prediction(response.json())


def problem_not_an_image(model_path: Path, inputs: dict[str, Path]) -> str:
    """``curl -s -i --data-binary 'hello' -H 'Content-Type: text/plain' .../v1/predict``: the body."""
    response = post(model_path, "/v1/predict", b"hello", {"Content-Type": "text/plain"})
    assert response.status_code == 415, response.text
    return render_prediction(response.json())


def btd_predict_table(model_path: Path, inputs: dict[str, Path]) -> str:
    """``btd predict /tmp/slice.png /tmp/MR_small.dcm``: the table, with the README's paths."""
    import io

    from app.transports.cli.predict import Outcome, local_classifier, write_table

    classify, _, close = local_classifier(model_path, "none")
    try:
        outcomes = [Outcome(f"/tmp/{path.name}", result=classify(path)) for path in inputs.values()]
    finally:
        close()
    out = io.StringIO()
    write_table(outcomes, out)
    return out.getvalue()


SAMPLES: dict[str, Callable[[Path, dict[str, Path]], str]] = {
    "predict-dicom-grid": predict_dicom_grid,
    "btd-predict-table": btd_predict_table,
    "problem-not-an-image": problem_not_an_image,
}


def default_settings(model_path: Path):
    """The default settings for this model, whatever BTD_* variables the shell has (arguments win)."""
    from app.settings import Settings

    fields = Settings.model_fields.items()
    defaults = {name: field.get_default(call_default_factory=True) for name, field in fields}
    return Settings(**{**defaults, "model_path": model_path})


def generate(model_path: Path, workdir: Path) -> dict[str, str]:
    inputs = write_inputs(workdir)
    return {name: make(model_path, inputs) for name, make in SAMPLES.items()}


# ---------------------------------------------------------------- the README


def readme_samples(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in MARKER.finditer(text)}


def with_samples(text: str, samples: dict[str, str]) -> str:
    def replace(m: re.Match) -> str:
        head, tail = m.start(2) - m.start(0), m.end(2) - m.start(0)
        return m.group(0)[:head] + samples.get(m.group(1), m.group(2)) + m.group(0)[tail:]

    return MARKER.sub(replace, text)


def parse_sample(text: str) -> Any:
    """A sample as data: the JSON document, or the table's rows as lists of cells."""
    if text.lstrip().startswith("{"):
        return json.loads(text)
    return [re.split(r"\s{2,}", line.strip()) for line in text.strip().splitlines()]


def number(text: Any) -> float | None:
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text)
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def differences(shown: Any, fresh: Any, where: str = "") -> list[str]:
    """Where the README's sample and the fresh one differ beyond the printed precision."""
    if isinstance(shown, dict) and isinstance(fresh, dict):
        if shown.keys() != fresh.keys():
            return [f"{where or 'top'}: keys {sorted(shown)} != {sorted(fresh)}"]
        found = []
        for key in fresh:
            if key in VOLATILE_KEYS:  # the same kind of value (the same timings), whatever it is this time
                a, b = shown[key], fresh[key]
                if type(a) is not type(b) or (isinstance(a, dict) and a.keys() != b.keys()):
                    found.append(f"{where}.{key}: {a!r} != {b!r}")
            else:
                found += differences(shown[key], fresh[key], f"{where}.{key}")
        return found
    if isinstance(shown, list) and isinstance(fresh, list):
        if len(shown) != len(fresh):
            return [f"{where}: {len(shown)} items != {len(fresh)}"]
        return [d for i, (a, b) in enumerate(zip(shown, fresh, strict=True)) for d in differences(a, b, f"{where}[{i}]")]
    a, b = number(shown), number(fresh)
    if a is not None and b is not None:
        return [] if abs(a - b) <= TOLERANCE else [f"{where}: {shown} != {fresh}"]
    return [] if shown == fresh else [f"{where}: {shown!r} != {fresh!r}"]


def table_differences(shown: list[list[str]], fresh: list[list[str]]) -> list[str]:
    """Tables: every cell but the MS column (a timing)."""
    if not shown or not fresh or shown[0] != fresh[0]:
        return [f"table header {shown[:1]} != {fresh[:1]}"]
    ms = fresh[0].index("MS")
    strip = [[cell for i, cell in enumerate(row) if i != ms] for row in shown]
    return differences(strip, [[cell for i, cell in enumerate(row) if i != ms] for row in fresh], "table")


def stale(readme_text: str, fresh: dict[str, str]) -> dict[str, list[str]]:
    """Per sample name, what the README shows that the model no longer answers (empty: all true)."""
    shown = readme_samples(readme_text)
    problems: dict[str, list[str]] = {}
    for name, text in fresh.items():
        if name not in shown:
            problems[name] = [f"no '<!-- sample: {name} -->' block in the README"]
            continue
        a, b = parse_sample(shown[name]), parse_sample(text)
        found = differences(a, b) if isinstance(b, dict) else table_differences(a, b)
        if found:
            problems[name] = found
    for name in shown.keys() - fresh.keys():
        problems[name] = ["the README has this sample, the generator does not"]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=Path, metavar="DIR", help="only write the sample inputs into DIR")
    parser.add_argument("--write", action="store_true", help="rewrite the README's samples")
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL,
                        help="model file (default: the shipped one)")
    args = parser.parse_args(argv)
    if args.inputs:
        for path in write_inputs(args.inputs).values():
            print(path)
        return 0
    import tempfile

    with tempfile.TemporaryDirectory() as workdir:
        fresh = generate(args.model, Path(workdir))
    text = README.read_text()
    if args.write:
        README.write_text(with_samples(text, fresh))
        print(f"wrote {len(fresh)} samples into {README.relative_to(REPO)}: {', '.join(fresh)}")
        return 0
    problems = stale(text, fresh)
    shown = readme_samples(text)
    for name, found in problems.items():
        print(f"{name}: " + "; ".join(found), file=sys.stderr)
        diff = difflib.unified_diff(shown.get(name, "").splitlines(), fresh.get(name, "").splitlines(),
                                    "README.md", "the model now", lineterm="")
        print("\n".join(diff), file=sys.stderr)
    if problems:
        print("refresh them: .venv/bin/python -m scripts.readme_samples --write", file=sys.stderr)
        return 1
    print(f"the README's {len(fresh)} samples match {args.model.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
