"""``btd predict`` as a user runs it: the installed console script, in a subprocess, in local mode
(without torch or FastAPI importable) and in URL mode against the real service started by the test."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from tests.api.helpers import ServerProcess, png_bytes
from tests.model_factory import LABELS, build_model

REPO_ROOT = Path(__file__).resolve().parents[2]
BTD = Path(sys.executable).parent / "btd"
RUN_TIMEOUT_S = 180
# Runs the same entry point as the console script, with torch and fastapi made unimportable.
WITHOUT_TORCH = ("import sys; sys.modules['torch'] = None; sys.modules['fastapi'] = None; "
                 "from app.transports.cli.btd import main; sys.argv[0] = 'btd'; sys.exit(main())")


def write_slices(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"slice{i}.png"
        path.write_bytes(png_bytes(shape=(120, 100), seed=i))
        paths.append(path)
    return paths


def run(*args: str | Path, python_code: str | None = None, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    """``btd ARGS`` (or ``python -c python_code ARGS``), captured."""
    program = [sys.executable, "-c", python_code] if python_code else [str(BTD)]
    return subprocess.run([*program, *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, env=env, check=False)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "model.onnx")


def test_btd_is_installed() -> None:
    assert BTD.is_file(), "the btd console script is missing: pip install -e . creates it"


def test_predict_local_mode_works_without_torch_or_fastapi(tmp_path: Path, model_path: Path) -> None:
    write_slices(tmp_path / "scans" / "nested", 3)

    done = run("predict", "--model", model_path, tmp_path / "scans", "--format", "json",
               python_code=WITHOUT_TORCH)

    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    assert [Path(r["file"]).name for r in records] == ["slice0.png", "slice1.png", "slice2.png"]
    assert all(r["ok"] and r["result"]["label"] in LABELS for r in records)
    assert "100%" in done.stderr and "3/3" in done.stderr  # the progress bar, on stderr


@pytest.mark.slow
def test_predict_url_mode_matches_local_mode_and_reports_failures(tmp_path: Path, model_path: Path) -> None:
    slices = write_slices(tmp_path / "scans", 3)
    broken = tmp_path / "scans" / "broken.png"
    broken.write_bytes(slices[0].read_bytes()[:50])
    pattern = str(tmp_path / "scans" / "*.png")

    local = run("predict", "--model", model_path, pattern, "--format", "csv", "--no-progress")
    with ServerProcess(model_path, BTD_INTRA_OP_THREADS="1") as server:
        remote = run("predict", "--url", server.url, pattern, "--format", "csv", "--cam-dir", tmp_path / "cams")
        quiet = run("predict", "--url", server.url, slices[0], "--format", "json", "--no-progress")

    # stderr is for the user's failures and the progress bar only: no library's log line per request.
    assert quiet.returncode == 0 and quiet.stderr == "" and json.loads(quiet.stdout)[0]["ok"]
    assert "HTTP Request" not in remote.stderr and " INFO " not in remote.stderr, remote.stderr

    for done in (local, remote):
        assert done.returncode == 1, done.stderr
        assert f"1 of 4 files failed:\n  {broken}: Invalid image" in done.stderr
    local_rows = {Path(r["file"]).name: r for r in csv.DictReader(io.StringIO(local.stdout))}
    remote_rows = {Path(r["file"]).name: r for r in csv.DictReader(io.StringIO(remote.stdout))}
    assert remote_rows["broken.png"]["ok"] == "False" and "(HTTP 400)" in remote_rows["broken.png"]["error"]
    for path in slices:
        here, there = local_rows[path.name], remote_rows[path.name]
        assert there["ok"] == "True" and there["label"] == here["label"]
        for label in LABELS:
            assert float(there[f"p_{label}"]) == pytest.approx(float(here[f"p_{label}"]), abs=1e-5)
        overlay = cv2.imread(there["cam_file"])
        assert Path(there["cam_file"]).parent == tmp_path / "cams"
        assert overlay is not None and overlay.shape[:2] == (120, 100)  # the input's size


def test_predict_exits_2_with_help_when_the_default_model_is_missing(tmp_path: Path) -> None:
    image = write_slices(tmp_path, 1)[0]
    done = run("predict", image, "--no-progress",
               env={"PATH": "/usr/bin:/bin", "BTD_MODEL_PATH": str(tmp_path / "absent.onnx")})
    assert done.returncode == 2
    assert f"model file not found: {tmp_path / 'absent.onnx'}" in done.stderr and "--url" in done.stderr


def test_predict_into_a_closed_pipe_exits_quietly(tmp_path: Path, model_path: Path) -> None:
    """``btd predict ... | head``: once the reader is gone, no BrokenPipeError traceback."""
    write_slices(tmp_path / "scans", 2)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte, as after `head -1` has its line
    try:
        done = subprocess.run([str(BTD), "predict", "--model", str(model_path), str(tmp_path / "scans"),
                               "--format", "json", "--no-progress"], stdout=write_end, stderr=subprocess.PIPE,
                              cwd=REPO_ROOT, text=True, timeout=RUN_TIMEOUT_S, check=False)
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr  # 128 + SIGPIPE, what a shell shows for `seq 1e9 | head`
    assert done.stderr == ""
