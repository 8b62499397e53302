"""The chart's dashboard and alerts (issue #17): the Grafana dashboard ConfigMap the sidecar loads, and the
PrometheusRule behind `prometheusRule.enabled`.

The objects are rendered by real Helm (see test_chart.py). The rules, taken from the RENDERED chart, run
through `promtool test rules` (Debian's `prometheus` package; scripts/test installs it) against
tests/chart/rules-test.yaml. That every metric the dashboard and the rules query is exported by the code is
tests/metric_names.rs's job (a Rust test reads the registries).

Not verified here: the PrometheusRule against the Prometheus Operator's CRD schema (kubernetes-validate
knows only Kubernetes' own kinds, as for the ServiceMonitor); promtool checks the rule groups themselves.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from test_chart import KUBE_VERSION, NAMESPACE, RELEASE, REPO, by_kind, one, render, strip

RULES_TEST = REPO / "tests" / "chart" / "rules-test.yaml"
DASHBOARD = REPO / "charts" / "meshline" / "dashboards" / "meshline.json"
RULE_ON = {"prometheusRule": {"enabled": True}}


def dashboard_config_maps(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [o for o in by_kind(render(values), "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]


def test_dashboard_renders_by_default_with_the_sidecar_label_and_valid_json() -> None:
    (cm,) = dashboard_config_maps()
    assert cm["metadata"]["name"] == f"{RELEASE}-dashboard"
    assert cm["metadata"]["namespace"] == NAMESPACE
    # The Grafana chart's sidecar default: label grafana_dashboard with value "1" (a string).
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    kubernetes_validate.validate(strip(cm), KUBE_VERSION, strict=True)
    (key,) = cm["data"]
    assert key.endswith(".json")
    dashboard = json.loads(cm["data"][key])
    # Helm passes the file through untouched (Grafana's `{{reason}}` legends are not Helm templates).
    assert dashboard == json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"namespace", "flow"} <= variables
    titles = {p["title"] for p in dashboard["panels"]}
    for wanted in [
        "Throughput",
        "Backlog",
        "Failure rate over the SLA window",
        "Dead letters by reason",
        "MTTR",
        "Manual interventions per 1,000 records",
        "Canary weight and step",
        "Canary analysis",
        "Last audit",
        "Unexplained differences",
        "Partial audit",
    ]:
        assert wanted in titles, f"panel {wanted!r} missing"
    # Every query panel selects the chosen flow.
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert 'namespace="$namespace",flow="$flow"' in target["expr"], (panel["title"], target["expr"])


def test_dashboard_options_and_switch() -> None:
    (cm,) = dashboard_config_maps(
        {
            "grafanaDashboard": {
                "namespace": "monitoring",
                "sidecarLabel": "example.test/dashboard",
                "sidecarLabelValue": "yes",
                "labels": {"team": "finance"},
                "annotations": {"grafana_folder": "Meshline"},
            }
        }
    )
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["example.test/dashboard"] == "yes"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["labels"]["team"] == "finance"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Meshline"}
    assert dashboard_config_maps({"grafanaDashboard": {"enabled": False}}) == []


def test_prometheus_rule_renders_only_when_enabled() -> None:
    assert by_kind(render(), "PrometheusRule") == []
    rule = one(render({"prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}}), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == {
        "MeshlineSlaBreached",
        "MeshlineBacklogGrowing",
        "MeshlineCircuitBreakerOpen",
        "MeshlineTicketSinkFailing",
        "MeshlineAuditUnexplainedDifferences",
        "MeshlineAuditPartial",
        "MeshlineAuditNotRun",
    }


def test_prometheus_rule_thresholds_and_labels_come_from_values() -> None:
    rule = one(
        render(
            {
                "prometheusRule": {
                    "enabled": True,
                    "additionalRuleLabels": {"team": "finance"},
                    "backlog": {"minRecords": 2500000, "window": "1h", "for": "30m", "severity": "critical"},
                    "auditNotRun": {"maxAgeSeconds": 90000},
                }
            }
        ),
        "PrometheusRule",
    )
    rules = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    backlog = rules["MeshlineBacklogGrowing"]
    # Helm reads numbers as floats; a large threshold must still render as an integer PromQL reads.
    assert "> 2500000)" in backlog["expr"] and "[1h]" in backlog["expr"], backlog["expr"]
    assert backlog["for"] == "30m"
    assert backlog["labels"] == {"severity": "critical", "team": "finance"}
    assert rules["MeshlineAuditNotRun"]["expr"].endswith("> 90000")
    assert all(r["labels"]["team"] == "finance" for r in rules.values())


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool not found: install Debian's `prometheus` package (scripts/test does)"
    return found


def rendered_rules(tmp_path: Path, values: dict[str, Any]) -> Path:
    rule = one(render(values), "PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    shutil.copy(RULES_TEST, tmp_path / "rules-test.yaml")
    return tmp_path


def test_promtool_checks_and_tests_the_rendered_rules(tmp_path: Path) -> None:
    work = rendered_rules(tmp_path, RULE_ON)
    check = subprocess.run([promtool(), "check", "rules", "rules.yaml"], cwd=work, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run([promtool(), "test", "rules", "rules-test.yaml"], cwd=work, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_promtool_rule_tests_really_fail_on_a_changed_rule(tmp_path: Path) -> None:
    """Guard against a rule test that passes whatever the rules say: a longer `for` breaks it."""
    work = rendered_rules(tmp_path, {"prometheusRule": {"enabled": True, "slaBreach": {"for": "30m"}}})
    run = subprocess.run([promtool(), "test", "rules", "rules-test.yaml"], cwd=work, capture_output=True, text=True)
    assert run.returncode != 0
    assert "MeshlineSlaBreached" in run.stdout + run.stderr


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"prometheusRule": {"enabled": True, "backlog": {"minRecords": "many"}}}, "minRecords"),
        ({"prometheusRule": {"enabled": True, "slaBreach": {"for": "five minutes"}}}, "for"),
        ({"prometheusRule": {"enabled": True, "breakerOpen": {"severity": "very high"}}}, "severity"),
        ({"prometheusRule": {"enabled": True, "threshold": 3}}, "threshold"),
        ({"grafanaDashboard": {"enabled": "yes"}}, "enabled"),
    ],
)
def test_schema_refuses_bad_monitoring_values(values: dict[str, Any], where: str) -> None:
    with pytest.raises(Exception) as error:
        render(values)
    assert where in str(error.value)
