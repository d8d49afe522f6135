"""``btd predict`` pieces, in process: finding inputs, media types, output formats, CAM files, and
the local mode end to end on the small contract-conforming test model (no server, no torch)."""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from app.core.result import Prediction
from app.transports.cli.predict import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_UNUSABLE,
    CamWriter,
    FileFailed,
    Outcome,
    add_predict_parser,
    classify_all,
    collect_inputs,
    media_type_of,
    result_record,
    write_output,
)
from tests.api.helpers import dicom_testfile, png_bytes
from tests.model_factory import LABELS, build_model


def write_png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(seed=seed))
    return path


def dicom_bytes() -> bytes:
    return dicom_testfile("MR_small.dcm")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="btd")
    add_predict_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["predict", *argv])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "model.onnx")


def test_collect_inputs_finds_images_in_folders_recursively(tmp_path: Path) -> None:
    a = write_png(tmp_path / "scans" / "a.png")
    b = write_png(tmp_path / "scans" / "deep" / "er" / "b.PNG")
    dicom_without_suffix = tmp_path / "scans" / "deep" / "IM0001"
    dicom_without_suffix.write_bytes(dicom_bytes())
    (tmp_path / "scans" / "notes.txt").write_text("not an image")
    write_png(tmp_path / "scans" / ".hidden" / "c.png")

    files, missing = collect_inputs([str(tmp_path / "scans")])

    assert missing == []
    assert sorted(files) == sorted([a, b, dicom_without_suffix])


def test_collect_inputs_expands_globs_and_reports_unmatched_arguments(tmp_path: Path) -> None:
    a = write_png(tmp_path / "x" / "a.png")
    b = write_png(tmp_path / "y" / "b.png")
    write_png(tmp_path / "y" / "c.jpg")

    args = [str(tmp_path / "**" / "*.png"), str(tmp_path / "*.dcm"), str(tmp_path / "nope.png")]
    files, missing = collect_inputs(args)

    assert sorted(files) == sorted([a, b])
    assert [(m.path, m.error) for m in missing] == [
        (str(tmp_path / "*.dcm"), "no image file matches this pattern"),
        (str(tmp_path / "nope.png"), "no such file or folder"),
    ]


def test_collect_inputs_reports_a_folder_without_images(tmp_path: Path) -> None:
    a = write_png(tmp_path / "a.png")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an image")
    write_png(tmp_path / "notes" / ".hidden" / "b.png")

    files, missing = collect_inputs([str(a), str(tmp_path / "notes")])

    assert files == [a]
    assert [(m.path, m.error) for m in missing] == [(str(tmp_path / "notes"), "no image file in this folder")]


def test_collect_inputs_lists_a_file_once_when_named_twice(tmp_path: Path) -> None:
    a = write_png(tmp_path / "a.png")
    files, _ = collect_inputs([str(a), str(tmp_path), str(tmp_path / "*.png")])
    assert files == [a]


def test_media_type_of_prefers_the_signature_over_the_suffix(tmp_path: Path) -> None:
    png = write_png(tmp_path / "a.png").rename(tmp_path / "looks-like.jpg")
    assert media_type_of(png.read_bytes(), png) == "image/png"
    assert media_type_of(dicom_bytes(), tmp_path / "slice") == "application/dicom"
    assert media_type_of(b"garbage", tmp_path / "x.jpeg") == "image/jpeg"
    assert media_type_of(b"garbage", tmp_path / "x.bin") is None


def test_cam_writer_gives_files_with_the_same_name_distinct_names_in_input_order(tmp_path: Path) -> None:
    overlay = base64.b64encode(cv2.imencode(".png", np.zeros((4, 4), np.uint8))[1].tobytes()).decode()
    first, second = Path("a/slice.png"), Path("b/slice.dcm")
    writer = CamWriter(tmp_path / "cams", [first, second])
    cam = fake_result("glioma", {"glioma": 1.0}, overlay=overlay).cam
    second_file = writer.write(second, cam)  # finishing first must not take the name
    first_file = writer.write(first, cam)
    assert Path(first_file).name == "slice.cam.png"
    assert Path(second_file).name == "slice-2.cam.png"
    assert cv2.imread(second_file, cv2.IMREAD_UNCHANGED).shape == (4, 4)


def fake_result(label: str, probabilities: dict[str, float], overlay: str = "AAAA",
                in_distribution: bool | None = None, warnings: tuple[str, ...] = ()) -> Prediction:
    return Prediction.from_dict({
        "model": {"name": "m", "version": "1", "sha256": "0" * 64}, "label": label,
        "probabilities": probabilities, "tumour_probability": 1 - probabilities.get("notumor", 0.0),
        "tumour_detected": None if in_distribution is False else True, "threshold": 0.5,
        "cam": {"format": "png", "label": label, "width": 4, "height": 4, "image_png": "AAAA",
                "heatmap_png": "AAAA", "overlay_png": overlay, "box": {"x": 0, "y": 0, "width": 4, "height": 4}},
        "timings_ms": {"decode": 1, "preprocess": 1, "queue": 0, "inference": 10, "cam": 0.5, "total": 12.5},
        "warnings": list(warnings), "in_distribution": in_distribution})


def test_write_output_csv_has_one_column_per_class_and_the_reason_for_failures() -> None:
    probs = {"glioma": 0.7, "notumor": 0.2, "pituitary": 0.1}
    outcomes = [Outcome("a.png", result=fake_result("glioma", probs), cam_file="cams/a.cam.png"),
                Outcome("b.png", error="Invalid image: truncated")]
    out = io.StringIO()
    write_output(outcomes, "csv", out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["file"] for r in rows] == ["a.png", "b.png"]
    assert rows[0]["ok"] == "True" and float(rows[0]["p_glioma"]) == 0.7 and rows[0]["label"] == "glioma"
    assert float(rows[0]["tumour_probability"]) == pytest.approx(0.8)
    assert rows[0]["cam_file"] == "cams/a.cam.png"
    assert rows[1]["ok"] == "False" and rows[1]["error"] == "Invalid image: truncated"
    assert rows[1]["p_glioma"] == ""


def test_classify_all_keeps_input_order_and_drops_the_base64_images(tmp_path: Path) -> None:
    files = [write_png(tmp_path / f"{i}.png", seed=i) for i in range(5)]
    overlay = base64.b64encode(png_bytes()).decode()

    def classify(path: Path) -> Prediction:
        if path.name == "3.png":
            raise FileFailed("Invalid image: broken")
        return fake_result("glioma", {"glioma": 0.9, "notumor": 0.1}, overlay=overlay)

    outcomes = classify_all(files, classify, jobs=3, progress=False, cams=CamWriter(tmp_path / "cams", files))

    assert [Path(o.path).name for o in outcomes] == [f"{i}.png" for i in range(5)]
    assert [o.ok for o in outcomes] == [True, True, True, False, True]
    assert outcomes[3].error == "Invalid image: broken" and outcomes[3].cam_file is None
    assert result_record(outcomes[0].result)["cam"] == {"format": "png", "label": "glioma", "width": 4, "height": 4,
                                                        "box": {"x": 0, "y": 0, "width": 4, "height": 4}}
    assert outcomes[0].result.cam.overlay_png == ""  # not kept in memory once written
    assert Path(outcomes[4].cam_file).read_bytes() == png_bytes()


def test_write_output_table_shows_failed_files_with_their_reason() -> None:
    outcomes = [Outcome("a.png", result=fake_result("glioma", {"glioma": 0.9, "notumor": 0.1})),
                Outcome("broken.png", error="Invalid image: truncated")]
    out = io.StringIO()
    write_output(outcomes, "table", out)
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:2] == ["FILE", "LABEL"]
    assert lines[1].split()[:3] == ["a.png", "glioma", "0.900"]
    assert lines[2].split()[:2] == ["broken.png", "FAILED"] and lines[2].endswith("Invalid image: truncated")


def test_out_of_distribution_files_show_the_warning_instead_of_a_finding() -> None:
    warning = "the image does not look like a brain MR slice (no head was found in it); the probabilities are not a finding"
    ood = fake_result("glioma", {"glioma": 0.9, "notumor": 0.1}, in_distribution=False, warnings=(warning,))
    outcomes = [Outcome("flat.png", result=ood)]
    out = io.StringIO()
    write_output(outcomes, "table", out)
    row = out.getvalue().splitlines()[1]
    assert row.split()[:3] == ["flat.png", "NOT", "ASSESSED"] and "0.900" not in row and row.endswith("not a finding")
    out = io.StringIO()
    write_output(outcomes, "csv", out)
    (record,) = csv.DictReader(io.StringIO(out.getvalue()))
    assert record["in_distribution"] == "no" and record["tumour_detected"] == "" and record["warning"] == warning


def test_predict_local_classifies_files_and_writes_cam_overlays(
    tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_png(tmp_path / "in" / "a.png", seed=1)
    (tmp_path / "in" / "b.dcm").write_bytes(dicom_bytes())
    args = parse(["--model", str(model_path), str(tmp_path / "in"), "--format", "json",
                  "--cam-dir", str(tmp_path / "cams"), "--no-progress"])

    assert args.run(args) == EXIT_OK

    records = json.loads(capsys.readouterr().out)
    assert [Path(r["file"]).name for r in records] == ["a.png", "b.dcm"]
    for record in records:
        result = record["result"]
        assert record["ok"] and result["label"] in LABELS
        assert sum(result["probabilities"].values()) == pytest.approx(1.0)
        overlay = cv2.imread(record["cam_file"], cv2.IMREAD_UNCHANGED)
        assert overlay is not None and overlay.shape[:2] == (result["cam"]["height"], result["cam"]["width"])
    assert records[1]["result"]["cam"]["width"] == 64  # MR_small.dcm is 64x64


def test_predict_local_exits_1_and_names_the_reason_when_a_file_is_broken(
    tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_png(tmp_path / "good.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:40])
    args = parse(["--model", str(model_path), str(good), str(broken), "--format", "csv", "--no-progress"])

    assert args.run(args) == EXIT_SOME_FAILED

    captured = capsys.readouterr()
    rows = {Path(r["file"]).name: r for r in csv.DictReader(io.StringIO(captured.out))}
    assert rows["good.png"]["ok"] == "True"
    assert rows["broken.png"]["ok"] == "False" and "Invalid image" in rows["broken.png"]["error"]
    assert "1 of 2 files failed" in captured.err and f"{broken}: Invalid image" in captured.err


def test_predict_local_exits_2_when_the_model_file_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = write_png(tmp_path / "a.png")
    args = parse(["--model", str(tmp_path / "absent.onnx"), str(image), "--no-progress"])
    assert args.run(args) == EXIT_UNUSABLE
    assert "model file not found" in capsys.readouterr().err


def test_predict_url_exits_2_when_the_service_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    image = write_png(tmp_path / "a.png")
    args = parse(["--url", f"http://127.0.0.1:{port}", str(image), "--no-progress", "--timeout", "5"])
    assert args.run(args) == EXIT_UNUSABLE
    assert "cannot reach the service" in capsys.readouterr().err


def test_parser_refuses_model_and_url_together() -> None:
    with pytest.raises(SystemExit):
        parse(["--model", "m.onnx", "--url", "http://127.0.0.1:1", "a.png"])


def test_predict_url_sends_the_api_key_from_the_option_or_the_environment(
    tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a keyed service (in process, through httpx's ASGI transport): no key exits 2 and says
    how to give one; a wrong one exits 2; the right one, as --api-key or BTD_API_KEY, classifies."""
    import httpx

    from app.transports.http.api_keys import key_line, new_key
    from tests.api.helpers import running_app

    key = new_key()
    image = write_png(tmp_path / "a.png")
    with running_app(model_path, api_keys=key_line("cli", key), audit_log="off") as service:
        real_client = httpx.Client

        def in_process(*args, **kwargs):  # the CLI's httpx client, talking to the app in this process
            return real_client(*args, **{**kwargs, "transport": service._transport})

        monkeypatch.setattr(httpx, "Client", in_process)
        url = "http://testserver"
        args = parse(["--url", url, str(image), "--no-progress"])
        assert args.run(args) == EXIT_UNUSABLE
        assert "--api-key or set BTD_API_KEY" in capsys.readouterr().err
        args = parse(["--url", url, str(image), "--no-progress", "--api-key", "btd_wrong"])
        assert args.run(args) == EXIT_UNUSABLE and "refused" in capsys.readouterr().err
        args = parse(["--url", url, str(image), "--no-progress", "--format", "json", "--api-key", key])
        assert args.run(args) == EXIT_OK and json.loads(capsys.readouterr().out)[0]["ok"]
        monkeypatch.setenv("BTD_API_KEY", key)
        args = parse(["--url", url, str(image), "--no-progress", "--format", "json"])
        assert args.run(args) == EXIT_OK and json.loads(capsys.readouterr().out)[0]["ok"]
