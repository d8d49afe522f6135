#!/usr/bin/env bash
# Set up the service (no torch) and run it with the shipped model on http://127.0.0.1:8000.
# Settings come from BTD_* environment variables (see README, "Configuration").
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# The versions the CPU image pins and CI tested (docker/requirements-cpu.lock), not the index's newest.
.venv/bin/python -m pip install -q --disable-pip-version-check -c docker/requirements-cpu.lock -e '.[cpu,dicom-codecs]'
exec .venv/bin/python -m app "$@"
