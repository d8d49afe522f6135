"""The alert rules (k8s/base/prometheusrule.yaml) pass their promtool unit tests (alerts_test.yaml),
and they and the Grafana dashboard (k8s/grafana/btd-dashboard.json) only name metrics the service
exports (app/engine/metrics.py), so a renamed metric cannot leave a silent alert or an empty panel."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import app.engine.metrics  # noqa: F401  (registers every metric of the service)
from tests.deploy.manifests import K8S

RULES = K8S / "base" / "prometheusrule.yaml"
RULE_TESTS = Path(__file__).with_name("alerts_test.yaml")
DASHBOARD = K8S / "grafana" / "btd-dashboard.json"
METRIC = re.compile(r"\b((?:btd|process|python)_[a-z0-9_]+)\b")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",)}


def exported_metrics() -> set[str]:
    """Every series name the service's /metrics can show (a labelled metric has none until used)."""
    names = set()
    for family in REGISTRY.collect():
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["spec"]["groups"]


def dashboard_expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def test_alert_rules_pass_their_promtool_tests(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus, installed by scripts/test.sh) is not installed")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    check = subprocess.run([promtool, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True,
                           text=True, check=False, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    result = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=tmp_path, capture_output=True,
                            text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_promtool_test():
    alerts = {rule["alert"] for group in rule_groups() for rule in group["rules"] if "alert" in rule}
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test.get("alert_rule_test", [])}
    assert alerts == tested


def test_alert_rules_name_only_exported_metrics():
    exported = exported_metrics()
    for group in rule_groups():
        for rule in group["rules"]:
            named = set(METRIC.findall(rule["expr"]))
            assert named, rule["alert"]
            assert named <= exported, (rule["alert"], named - exported)


def test_dashboard_names_only_exported_metrics():
    exported = exported_metrics()
    expressions = dashboard_expressions()
    assert len(expressions) >= 20
    for expr in expressions:
        named = set(METRIC.findall(expr))
        assert named and named <= exported, (expr, named - exported)


def test_dashboard_shows_every_drift_gauge():
    shown = {name for expr in dashboard_expressions() for name in METRIC.findall(expr)}
    drift = {name for name in exported_metrics() if name.startswith("btd_drift_")}
    assert drift - shown <= {"btd_drift_last_refresh_timestamp_seconds"}  # an alert's concern, not a panel's
    assert "btd_drift_psi" in drift


def test_dashboard_shows_every_live_performance_gauge_with_its_interval():
    shown = {name for expr in dashboard_expressions() for name in METRIC.findall(expr)}
    live = {name for name in exported_metrics() if name.startswith("btd_live_")}
    assert {"btd_live_sensitivity_lower", "btd_live_sensitivity_upper", "btd_live_confirmed_cases"} <= live
    assert live <= shown, live - shown


def test_metric_name_check_catches_a_misspelt_metric():
    assert not {"btd_drift_pis"} <= exported_metrics()
