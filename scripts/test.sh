#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine, then run it.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests drive for real (browser tests, PACS, Prometheus tooling).
APT_PACKAGES=(chromium
  podman runc debootstrap  # tests/deploy/test_image_build.py builds and runs the CPU image
  orthanc orthanc-dicomweb dicom3tools  # tests/pacs: a real PACS, and dciodvfy for the DICOM results
  postgresql  # the prediction records' store tests start their own server (tests/postgres.py)
  prometheus  # promtool: tests/deploy/test_alerts.py unit-tests the alert rules (k8s/base/prometheusrule.yaml)
)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    # The tests start their own Orthanc; the package's system service must not start (policy-rc.d 101).
    policy_added=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && policy_added=1
    fi
    echo "installing system packages: ${missing[*]} (log: /tmp/btd-apt.log)" >&2
    # dpkg prints a line per package even with -qq: keep it in a log, show it only on failure.
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           "${missing[@]}"; } >/tmp/btd-apt.log 2>&1; then
      cat /tmp/btd-apt.log >&2; [ -z "$policy_added" ] || rm -f /usr/sbin/policy-rc.d; exit 1
    fi
    [ -z "$policy_added" ] || rm -f /usr/sbin/policy-rc.d
  else
    echo "note: missing system packages (${missing[*]}); tests that need them will skip" >&2
  fi
fi

# Python environment: the service, training and test extras (torch 2.13.0 CPU), at the versions
# the suite was last run with (docker/requirements-dev.lock; refreshed on purpose, see its generator).
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c docker/requirements-dev.lock \
  -e '.[cpu,train,dev,dicom-codecs,report]'

# Node packages for the browser tests (no browser download: Debian's chromium is used).
if [ -f tests/browser/package.json ]; then
  (cd tests/browser && npm ci --no-audit --no-fund --silent)
fi

exec .venv/bin/python -m pytest "$@"
