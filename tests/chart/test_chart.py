"""Tests for the Meshline Helm chart (charts/meshline).

Everything here goes through real Helm: `helm-python-sdk` binds Helm v4's Go
SDK (libhelm_c) with ctypes, so `lint`, schema validation and rendering are
exactly what `helm lint` / `helm template` do, without a helm binary. Every
rendered object is then checked against the Kubernetes OpenAPI schemas in
strict mode (unknown fields are errors) by `kubernetes-validate`.

Run: `bash scripts/python-env` (prints the venv), then `<venv>/bin/pytest tests/chart -q`.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "meshline"
CRD_DIR = CHART / "crds"

# Kubernetes version the manifests are validated against (k8s-openapi is built
# with feature v1_33 too). kubernetes-validate bundles 1.25 to 1.37.
KUBE_VERSION = "1.33"
RELEASE = "meshline"
NAMESPACE = "meshline-system"
APP_VERSION = "0.1.0"
DEFAULT_IMAGE = f"ghcr.io/meshline/meshline:{APP_VERSION}"

# Kinds that are not in the Kubernetes schemas; skipped explicitly (and only these).
NOT_IN_KUBERNETES_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}

# Kinds the chart renders without a namespace.
CLUSTER_SCOPED_KINDS = {"ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}

# Value sets rendered by the tests. Each one must lint cleanly and validate.
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "watch-namespace": {"watchNamespace": "tenant-a"},
    "watch-release-namespace": {"watchNamespace": NAMESPACE},
    "status-via-proxy": {"controller": {"statusViaProxy": True}},
    "watch-namespace-proxy": {
        "watchNamespace": "tenant-a",
        "controller": {"statusViaProxy": True},
    },
    "service-monitor": {
        "serviceMonitor": {
            "enabled": True,
            "interval": "15s",
            "scrapeTimeout": "10s",
            "labels": {"release": "kube-prometheus-stack"},
        }
    },
    "single-replica": {"replicaCount": 1},
    "ops-page": {"opsPage": {"enabled": True}},
    "ops-page-proxy": {"opsPage": {"enabled": True, "port": 9443}, "controller": {"statusViaProxy": True}},
    "custom-images": {
        "image": {
            "repository": "registry.example.test:5000/platform/meshline",
            "tag": "1.2.3",
            "pullPolicy": "Always",
        },
        "workerImage": {"repository": "registry.example.test:5000/platform/meshline-worker", "tag": "9.9.9"},
        "imagePullSecrets": [{"name": "regcred"}],
    },
    "worker-tag-only": {"workerImage": {"tag": "2.0.0"}},
    "everything": {
        "replicaCount": 3,
        "watchNamespace": "tenant-b",
        "logLevel": "debug,kube=info",
        "controller": {"statusPeriod": "1m30s", "statusViaProxy": True, "outageAfter": "10m"},
        "serviceAccount": {"create": True, "name": "meshline-sa", "annotations": {"iam.example/role": "x"}},
        "podAnnotations": {"example.test/scrape": "true"},
        "podLabels": {"team": "integrations"},
        "priorityClassName": "system-cluster-critical",
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}
                    ]
                }
            }
        },
        "service": {"annotations": {"example.test/owner": "ops"}},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
        "grafanaDashboard": {"namespace": "monitoring", "annotations": {"grafana_folder": "Meshline"}},
    },
    "worker-defaults": {
        "workerDefaults": {
            "serviceAccountName": "sync-workers",
            "imagePullSecrets": [{"name": "regcred"}],
            "nodeSelector": {"pool": "integration"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "sync", "effect": "NoSchedule"}],
            "affinity": {
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}
                    ]
                }
            },
            "priorityClassName": "business-critical",
            "podAnnotations": {"example.test/cost-center": "finance"},
            "podLabels": {"team": "platform"},
        }
    },
    "existing-service-account": {"serviceAccount": {"create": False, "name": "preexisting"}},
    "no-rbac": {"rbac": {"create": False}},
    "fullname-override": {"fullnameOverride": "ml"},
    "network-policies-per-flow": {
        "networkPolicy": {"perFlow": {"mode": "on"}, "metricsFromNamespaces": ["monitoring"]},
    },
    "network-policies-per-flow-namespaced": {
        "watchNamespace": "tenant-a",
        "networkPolicy": {"perFlow": {"mode": "on"}},
    },
    "network-policies-clean-up": {"networkPolicy": {"perFlow": {"mode": "clean-up"}}},
    "sign-off-policy": {
        "signOffPolicy": {
            "enabled": True,
            "exemptUsers": ["system:serviceaccount:argocd:argocd-application-controller"],
            "exemptGroups": ["platform:gitops"],
        },
    },
    "sign-off-policy-namespaced": {
        "watchNamespace": "tenant-a",
        "signOffPolicy": {"enabled": True, "failurePolicy": "Ignore"},
    },
    "argocd-health": {"argocdHealth": {"enabled": True}},
    "argocd-health-fullname-override": {"fullnameOverride": "ml", "argocdHealth": {"enabled": True}},
    "network-policies-workers": {
        "controller": {"statusViaProxy": True},
        "networkPolicy": {
            "webhookFromNamespaces": ["ingress-nginx", "traefik"],
            "metricsFromNamespaces": ["monitoring"],
            "apiServerCIDRs": ["10.0.0.1/32", "fd00::1/128"],
            "workers": {"enabled": True, "namespaces": ["sync-a", "sync-b"]},
        },
    },
}

# Values files that values.schema.json must REJECT, with a fragment of the
# error Helm must report (the offending key).
REJECTED_VALUES_FILES: dict[str, tuple[str, str]] = {
    "unknown-top-level-key": ("replicas: 3\n", "replicas"),
    "misspelt-nested-key": ("controller:\n  statusViaProxxy: true\n", "statusViaProxxy"),
    "replica-count-string": ("replicaCount: two\n", "/replicaCount"),
    "replica-count-zero": ("replicaCount: 0\n", "/replicaCount"),
    "pull-policy-not-in-enum": ("image:\n  repository: x/y\n  pullPolicy: Sometimes\n", "/image/pullPolicy"),
    "watch-namespace-not-dns-label": ("watchNamespace: Tenant_A\n", "/watchNamespace"),
    "status-period-not-duration": ("controller:\n  statusPeriod: thirty seconds\n", "/controller/statusPeriod"),
    "outage-after-not-duration": ("controller:\n  outageAfter: five minutes\n", "/controller/outageAfter"),
    "status-via-proxy-not-bool": ("controller:\n  statusViaProxy: \"yes\"\n", "/controller/statusViaProxy"),
    "ops-page-enabled-not-bool": ("opsPage:\n  enabled: \"yes\"\n", "/opsPage/enabled"),
    "ops-page-on-the-metrics-port": ("opsPage:\n  port: 8080\n", "/opsPage/port"),
    "ops-page-unknown-key": ("opsPage:\n  enable: true\n", "/opsPage"),
    "service-monitor-unknown-key": ("serviceMonitor:\n  enabled: true\n  port: 9090\n", "port"),
    "resources-unknown-key": ("resources:\n  request:\n    cpu: 1\n", "request"),
    "empty-image-repository": ("image:\n  repository: \"\"\n  pullPolicy: IfNotPresent\n", "/image/repository"),
    "pull-secret-as-string": ("imagePullSecrets: [regcred]\n", "/imagePullSecrets/0"),
    "worker-defaults-misspelt-key": ("workerDefaults:\n  nodeSelecter:\n    pool: a\n", "nodeSelecter"),
    "worker-defaults-bad-toleration": (
        "workerDefaults:\n  tolerations:\n    - key: k\n      operator: Matches\n",
        "/workerDefaults/tolerations/0/operator",
    ),
    "worker-defaults-bad-account-name": (
        "workerDefaults:\n  serviceAccountName: Sync_Workers\n",
        "/workerDefaults/serviceAccountName",
    ),
    "per-flow-mode-unknown": ("networkPolicy:\n  perFlow:\n    mode: enabled\n", "/networkPolicy/perFlow/mode"),
    "per-flow-mode-bare-boolean": ("networkPolicy:\n  perFlow:\n    mode: true\n", "/networkPolicy/perFlow/mode"),
    "api-server-cidr-not-a-cidr": ("networkPolicy:\n  apiServerCIDRs: [10.0.0.1]\n", "/networkPolicy/apiServerCIDRs/0"),
    "sign-off-failure-policy-unknown": ("signOffPolicy:\n  failurePolicy: Warn\n", "/signOffPolicy/failurePolicy"),
    "sign-off-exempt-users-as-string": (
        "signOffPolicy:\n  exemptUsers: system:serviceaccount:argocd:argocd-application-controller\n",
        "/signOffPolicy/exemptUsers",
    ),
    "sign-off-exempt-group-empty": ("signOffPolicy:\n  exemptGroups: [\"\"]\n", "/signOffPolicy/exemptGroups/0"),
    "sign-off-misspelt-key": ("signOffPolicy:\n  enable: true\n", "enable"),
    "argocd-health-misspelt-key": ("argocdHealth:\n  enable: true\n", "enable"),
    "argocd-health-enabled-not-bool": ("argocdHealth:\n  enabled: \"yes\"\n", "/argocdHealth/enabled"),
    "webhook-namespace-not-dns-label": ("networkPolicy:\n  webhookFromNamespaces: [Ingress_Nginx]\n", "/networkPolicy/webhookFromNamespaces/0"),
}

# The complete, exact permission set for the watched namespaces (statusViaProxy false).
WATCH_PERMISSIONS = {
    ("sync.meshline.io", "syncflows"): {"get", "list", "watch"},
    ("sync.meshline.io", "synccontracts"): {"get", "list", "watch"},
    ("sync.meshline.io", "ownershiprosters"): {"get", "list", "watch"},
    ("sync.meshline.io", "syncflows/status"): {"get", "patch"},
    ("sync.meshline.io", "synccontracts/status"): {"get", "patch"},
    ("sync.meshline.io", "ownershiprosters/status"): {"get", "patch"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch"},
    ("", "services"): {"get", "list", "watch", "create", "patch"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "delete"},
    ("policy", "poddisruptionbudgets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "persistentvolumeclaims"): {"get", "list", "watch", "create", "patch"},
    # create: the per-flow worker token Secret, created once and never modified.
    ("", "secrets"): {"get", "list", "watch", "create"},
    ("events.k8s.io", "events"): {"create", "patch"},
    # Which worker pods each status Service publishes: filled by a watch, never read by name.
    ("discovery.k8s.io", "endpointslices"): {"list", "watch"},
    # Contract revisions (pruned beyond the history limit) and preflight replay Jobs (a replaced candidate's
    # running Job is deleted); a finished preflight pod's termination message is read by listing.
    ("apps", "controllerrevisions"): {"get", "list", "watch", "create", "delete"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
    # Each flow's reconciliation audit CronJob: patched when the roster's schedule changes, deleted when the
    # flow's sides can no longer be audited.
    ("batch", "cronjobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "pods"): {"list"},
}
PROXY_PERMISSION = {("", "pods/proxy"): {"get"}}
CRD_PERMISSION = {("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"}}
ALL_KNOWN_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _render_cached(values_json: str, name: str, namespace: str) -> tuple[tuple[str, str], ...]:
    values = json.loads(values_json)
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=name, namespace=namespace, is_install=True)
    return tuple(sorted(rendered.items()))


def render_files(values: dict[str, Any] | None = None, name: str = RELEASE, namespace: str = NAMESPACE) -> dict[str, str]:
    """`helm template`: template path -> rendered text."""
    return dict(_render_cached(json.dumps(values or {}, sort_keys=True), name, namespace))


def render(values: dict[str, Any] | None = None, name: str = RELEASE, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Rendered Kubernetes objects (NOTES.txt excluded), freshly parsed so tests may mutate them.

    Each object carries its template path under the key ``__source__`` (see ``strip``).
    """
    objects: list[dict[str, Any]] = []
    for path, text in render_files(values, name, namespace).items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__source__"] = path
                objects.append(doc)
    return objects


def strip(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "__source__"}


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected exactly one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def controller_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["controller"]
    return containers[0]


def permissions(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """Flatten a role's rules to {(apiGroup, resource): verbs}, ignoring resourceNames rules' names."""
    flat: dict[tuple[str, str], set[str]] = {}
    for rule in role.get("rules", []):
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                flat.setdefault((group, resource), set()).update(rule["verbs"])
    return flat


def leader_election_role(objects: list[dict[str, Any]]) -> dict[str, Any]:
    roles = [r for r in by_kind(objects, "Role") if r["metadata"]["name"].endswith("-leader-election")]
    assert len(roles) == 1
    return roles[0]


def watch_roles(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every Role or ClusterRole other than the leader-election Role."""
    return [
        r
        for r in by_kind(objects, "Role") + by_kind(objects, "ClusterRole")
        if not r["metadata"]["name"].endswith("-leader-election")
    ]


def arg_value(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} must appear exactly once in {args}"
    return args[args.index(flag) + 1]


def load_values_file(path: Path) -> dict[str, Any]:
    """Parse a values file the way `helm -f` does."""
    return helm.values_from_yaml(path.read_text())


# --------------------------------------------------------------------------
# Helm: lint, render, schema
# --------------------------------------------------------------------------


def test_helm_sdk_is_real_helm_v4() -> None:
    assert helm.helm_sdk_version().startswith("v4."), helm.helm_sdk_version()


def test_chart_metadata() -> None:
    with helm.Chart.load(CHART) as chart:
        meta = chart.metadata
        assert meta["apiVersion"] == "v2"
        assert meta["name"] == "meshline"
        assert meta["version"] == "0.1.0"
        assert meta["appVersion"] == APP_VERSION
        assert chart.schema is not None, "values.schema.json must ship with the chart"
        assert chart.schema.get("additionalProperties") is False
        # The shipped defaults satisfy the shipped schema.
        chart.validate_schema(chart.values)
        assert chart.values["replicaCount"] == 2
        assert chart.values["image"]["repository"] == "ghcr.io/meshline/meshline"
        assert chart.values["controller"] == {"statusPeriod": "30s", "statusViaProxy": False}
        assert chart.values["serviceMonitor"]["enabled"] is False
        assert chart.values["logLevel"] == "info"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_strict_is_clean(scenario: str) -> None:
    report = helm.lint(
        CHART,
        SCENARIOS[scenario],
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{KUBE_VERSION}.0",
    )
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # Severity 1 = info (e.g. "icon is recommended"); warnings and errors fail.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


@pytest.mark.parametrize("case", sorted(REJECTED_VALUES_FILES))
def test_schema_rejects_bad_values_file(case: str, tmp_path: Path) -> None:
    content, fragment = REJECTED_VALUES_FILES[case]
    values_file = tmp_path / f"{case}.yaml"
    values_file.write_text(content)
    values = load_values_file(values_file)

    with pytest.raises(helm.HelmValuesError) as render_error:
        with helm.Chart.load(CHART) as chart:
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert fragment in str(render_error.value), str(render_error.value)

    with pytest.raises(helm.HelmValuesError):
        with helm.Chart.load(CHART) as chart:
            chart.validate_schema(values)

    report = helm.lint(CHART, values, namespace=NAMESPACE)
    assert report["errors"] or any(m["severity"] >= 3 for m in report["messages"]), report


def test_existing_service_account_needs_a_name() -> None:
    with pytest.raises(helm.HelmError) as error:
        render({"serviceAccount": {"create": False}})
    assert "serviceAccount.name is required" in str(error.value)


def test_rendered_output_has_no_crds() -> None:
    # Helm keeps crds/ out of templates; the CRDs are never rendered as templates.
    assert not [o for o in render() if o["kind"] == "CustomResourceDefinition"]


# --------------------------------------------------------------------------
# Kubernetes schemas (strict)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_manifest_validates_against_kubernetes_strict(scenario: str) -> None:
    objects = render(SCENARIOS[scenario])
    assert objects
    validated, skipped = 0, 0
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in NOT_IN_KUBERNETES_SCHEMAS:
            skipped += 1
            continue
        try:
            kubernetes_validate.validate(strip(obj), KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{obj['__source__']}: {obj['kind']}/{obj['metadata']['name']}: {path}: {error.message}")
        validated += 1
    assert validated + skipped == len(objects)
    assert validated >= 4  # at least Deployment, Service, leader-election Role and RoleBinding
    expects_monitor = SCENARIOS[scenario].get("serviceMonitor", {}).get("enabled", False)
    expects_rule = SCENARIOS[scenario].get("prometheusRule", {}).get("enabled", False)
    # The controller's ServiceMonitor and the workers' PodMonitor; the PrometheusRule.
    assert skipped == (2 if expects_monitor else 0) + (1 if expects_rule else 0)


def test_strict_validation_really_catches_mistakes() -> None:
    """Guard against a validator that silently accepts anything."""
    deployment = strip(one(render(), "Deployment"))
    kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)

    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBE_VERSION, strict=True)

    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "2"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBE_VERSION, strict=True)


def crd_files() -> list[Path]:
    if not CRD_DIR.is_dir():
        return []
    return sorted(p for p in CRD_DIR.iterdir() if p.suffix in {".yaml", ".yml"})


def test_crd_files_parse_and_are_crds() -> None:
    files = crd_files()
    if not files:
        pytest.skip("charts/meshline/crds has no YAML files yet")
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path.name} is empty"
        for doc in docs:
            assert doc.get("kind") == "CustomResourceDefinition", path.name
            assert doc.get("apiVersion") == "apiextensions.k8s.io/v1", path.name
    # Helm loads the same files as CRDs (it does not template them).
    with helm.Chart.load(CHART) as chart:
        assert {crd["name"] for crd in chart.crds} >= {f"crds/{path.name}" for path in files}


# --------------------------------------------------------------------------
# Objects, names, labels
# --------------------------------------------------------------------------


def test_default_object_set() -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in render())
    cluster_name = f"{RELEASE}-{NAMESPACE}"
    assert kinds == sorted(
        [
            ("ClusterRole", cluster_name),
            ("ClusterRoleBinding", cluster_name),
            ("ConfigMap", f"{RELEASE}-dashboard"),
            ("Deployment", RELEASE),
            ("PodDisruptionBudget", RELEASE),
            ("Role", f"{RELEASE}-leader-election"),
            ("RoleBinding", f"{RELEASE}-leader-election"),
            ("Service", RELEASE),
            ("ServiceAccount", RELEASE),
        ]
    )


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_standard_labels_and_namespaces(scenario: str) -> None:
    values = SCENARIOS[scenario]
    watch_ns = values.get("watchNamespace", "")
    for obj in render(values):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "meshline"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "meshline"
        assert labels["app.kubernetes.io/component"] == "controller"
        assert labels["helm.sh/chart"] == "meshline-0.1.0"
        assert labels["app.kubernetes.io/version"] == values.get("image", {}).get("tag", APP_VERSION)
        kind = obj["kind"]
        if kind in CLUSTER_SCOPED_KINDS:
            assert "namespace" not in obj["metadata"]
        elif kind in {"Role", "RoleBinding"} and not obj["metadata"]["name"].endswith("-leader-election"):
            assert obj["metadata"]["namespace"] == watch_ns
        elif kind == "ConfigMap" and obj["metadata"]["name"].endswith("-dashboard"):
            # Grafana's sidecar may watch only Grafana's own namespace.
            wanted = values.get("grafanaDashboard", {}).get("namespace") or NAMESPACE
            assert obj["metadata"]["namespace"] == wanted
        elif kind == "NetworkPolicy":
            np = values["networkPolicy"]["workers"]
            assert obj["metadata"]["namespace"] in (np.get("namespaces") or [watch_ns or NAMESPACE])
        else:
            assert obj["metadata"]["namespace"] == NAMESPACE, f"{kind}/{obj['metadata']['name']}"


def test_names_follow_release_and_overrides() -> None:
    assert one(render(name="prod"), "Deployment")["metadata"]["name"] == "prod-meshline"
    assert one(render(name="meshline-prod"), "Deployment")["metadata"]["name"] == "meshline-prod"
    objects = render(SCENARIOS["fullname-override"])
    assert one(objects, "Deployment")["metadata"]["name"] == "ml"
    assert arg_value(controller_container(objects)["args"], "--lease-name") == "ml-leader"
    long_name = "a" * 53  # Helm's maximum release name length
    objects = render(name=long_name)
    for obj in objects:
        # DNS-1123 subdomain limit for every object ...
        assert len(obj["metadata"]["name"]) <= 253
    # ... and the 63-character label limit where Kubernetes has one.
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "ServiceAccount"):
        assert len(one(objects, kind)["metadata"]["name"]) <= 63, kind
    for obj in objects:
        for value in obj["metadata"]["labels"].values():
            assert len(value) <= 63


def test_cluster_scoped_names_do_not_collide_across_namespaces() -> None:
    a = {o["metadata"]["name"] for o in render(namespace="team-a") if o["kind"].startswith("Cluster")}
    b = {o["metadata"]["name"] for o in render(namespace="team-b") if o["kind"].startswith("Cluster")}
    assert a and b and not (a & b)


# --------------------------------------------------------------------------
# Deployment
# --------------------------------------------------------------------------


def test_security_context() -> None:
    objects = render()
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["automountServiceAccountToken"] is True
    assert pod["serviceAccountName"] == RELEASE
    sc = controller_container(objects)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 65532 and sc["runAsGroup"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_writable_tmp_is_an_empty_dir() -> None:
    objects = render()
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    mounts = controller_container(objects)["volumeMounts"]
    assert mounts == [{"name": "tmp", "mountPath": "/tmp"}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(volumes) == {"tmp"}
    assert "emptyDir" in volumes["tmp"]


def test_default_args_env_probes_resources() -> None:
    container = controller_container(render())
    assert container["image"] == DEFAULT_IMAGE
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["args"] == [
        "controller",
        "--listen",
        "0.0.0.0:8080",
        "--status-period",
        "30s",
        "--worker-image",
        DEFAULT_IMAGE,
        "--lease-name",
        f"{RELEASE}-leader",
    ]
    assert "command" not in container  # the image's ENTRYPOINT is the binary
    env = {e["name"]: e for e in container["env"]}
    assert set(env) == {"POD_NAME", "POD_NAMESPACE", "RUST_LOG", "MESHLINE_LOG_FORMAT"}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["RUST_LOG"]["value"] == "info"
    assert env["MESHLINE_LOG_FORMAT"]["value"] == "json"
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["resources"] == {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"cpu": "500m", "memory": "256Mi"},
    }


def test_args_with_namespace_proxy_and_custom_period() -> None:
    values = SCENARIOS["everything"]
    container = controller_container(render(values))
    assert container["args"] == [
        "controller",
        "--listen",
        "0.0.0.0:8080",
        "--status-period",
        "1m30s",
        "--worker-image",
        DEFAULT_IMAGE,
        "--lease-name",
        f"{RELEASE}-leader",
        "--namespace",
        "tenant-b",
        "--status-via-proxy",
        "--outage-after",
        "10m",
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RUST_LOG"] == "debug,kube=info"


@pytest.mark.parametrize(
    ("scenario", "namespace_flag", "proxy_flag"),
    [
        ("default", None, False),
        ("watch-namespace", "tenant-a", False),
        ("status-via-proxy", None, True),
        ("watch-namespace-proxy", "tenant-a", True),
    ],
)
def test_optional_args(scenario: str, namespace_flag: str | None, proxy_flag: bool) -> None:
    args = controller_container(render(SCENARIOS[scenario]))["args"]
    assert args[:9] == ["controller", "--listen", "0.0.0.0:8080", "--status-period", "30s",
                        "--worker-image", DEFAULT_IMAGE, "--lease-name", f"{RELEASE}-leader"]
    extra = args[9:]
    expected = (["--namespace", namespace_flag] if namespace_flag else []) + (["--status-via-proxy"] if proxy_flag else [])
    assert extra == expected


def test_custom_images() -> None:
    objects = render(SCENARIOS["custom-images"])
    container = controller_container(objects)
    assert container["image"] == "registry.example.test:5000/platform/meshline:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    assert arg_value(container["args"], "--worker-image") == "registry.example.test:5000/platform/meshline-worker:9.9.9"
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert one(objects, "Deployment")["metadata"]["labels"]["app.kubernetes.io/version"] == "1.2.3"


def test_worker_image_defaults_field_by_field() -> None:
    # Only the tag set: the repository falls back to the controller's.
    args = controller_container(render(SCENARIOS["worker-tag-only"]))["args"]
    assert arg_value(args, "--worker-image") == "ghcr.io/meshline/meshline:2.0.0"
    # Controller tag set, worker unset: the worker follows the controller tag.
    args = controller_container(render({"image": {"repository": "r.test/m", "tag": "7.0.0", "pullPolicy": "IfNotPresent"}}))["args"]
    assert arg_value(args, "--worker-image") == "r.test/m:7.0.0"


def test_worker_defaults_reach_the_controller_as_one_json_flag() -> None:
    # Without workerDefaults the flag is not passed at all (see test_default_args_env_probes_resources).
    values = SCENARIOS["worker-defaults"]
    args = controller_container(render(values))["args"]
    assert args.count("--worker-defaults") == 1
    assert json.loads(arg_value(args, "--worker-defaults")) == values["workerDefaults"]


def test_worker_defaults_keys_are_the_crds_worker_pod_settings() -> None:
    # The controller decodes --worker-defaults as the SyncFlow's spec.worker pod settings and refuses unknown
    # keys, so the chart's schema must offer exactly those: image and resources stay per flow (workerImage sets
    # the image).
    crd = yaml.safe_load((CRD_DIR / "syncflows.sync.meshline.io.yaml").read_text())
    worker = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["worker"]
    schema = json.loads((CHART / "values.schema.json").read_text())
    offered = set(schema["properties"]["workerDefaults"]["properties"])
    assert offered == set(worker["properties"]) - {"image", "resources"}


def test_a_default_limit_can_be_removed_with_null() -> None:
    resources = controller_container(render({"resources": {"limits": {"cpu": None}}}))["resources"]
    assert resources == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}


def test_replicas_pdb_and_default_anti_affinity() -> None:
    objects = render()
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert "maxUnavailable" not in pdb["spec"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert selector.items() <= pod_labels.items()
    anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti  # soft only
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector


def test_single_replica_has_no_pdb_and_no_default_affinity() -> None:
    objects = render(SCENARIOS["single-replica"])
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert by_kind(objects, "PodDisruptionBudget") == []
    assert "affinity" not in deployment["spec"]["template"]["spec"]


def test_user_affinity_and_scheduling_values_pass_through() -> None:
    values = SCENARIOS["everything"]
    objects = render(values)
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 3
    assert pod["affinity"] == values["affinity"]  # no default merged in
    assert pod["nodeSelector"] == values["nodeSelector"]
    assert pod["tolerations"] == values["tolerations"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    meta = deployment["spec"]["template"]["metadata"]
    assert meta["annotations"] == values["podAnnotations"]
    assert meta["labels"]["team"] == "integrations"
    # Helm merges maps with the defaults: limits.cpu keeps its default.
    assert controller_container(objects)["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "500m", "memory": "512Mi"},
    }
    assert pod["serviceAccountName"] == "meshline-sa"
    assert one(objects, "ServiceAccount")["metadata"]["annotations"] == {"iam.example/role": "x"}
    assert one(objects, "PodDisruptionBudget")["spec"]["minAvailable"] == 1


# --------------------------------------------------------------------------
# Service, ServiceMonitor, ServiceAccount
# --------------------------------------------------------------------------


def test_metrics_service() -> None:
    objects = render()
    service = one(objects, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_service_monitor_off_by_default() -> None:
    assert by_kind(render(), "ServiceMonitor") == []


def test_service_monitor_when_enabled() -> None:
    objects = render(SCENARIOS["service-monitor"])
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http"
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"
    assert endpoint["scrapeTimeout"] == "10s"
    service = one(objects, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    # Default interval when only enabled.
    monitor = one(render({"serviceMonitor": {"enabled": True}}), "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["interval"] == "30s"
    assert "scrapeTimeout" not in monitor["spec"]["endpoints"][0]


# Labels every worker pod carries (src/controller/flow/build.rs `labels`; MANAGED_BY in src/controller/mod.rs).
WORKER_POD_LABELS = {
    "app.kubernetes.io/name": "meshline-worker",
    "app.kubernetes.io/component": "worker",
    "app.kubernetes.io/part-of": "meshline",
    "app.kubernetes.io/managed-by": "meshline-controller",
}


def worker_ops_port_name() -> str:
    """The operations port's name on worker pods, as src/controller/flow/build.rs declares it."""
    source = (Path(__file__).resolve().parents[2] / "src/controller/flow/build.rs").read_text()
    match = re.search(r'pub const OPS_PORT_NAME: &str = "([^"]+)";', source)
    assert match, "build.rs declares OPS_PORT_NAME"
    return match.group(1)


def test_pod_monitor_off_by_default() -> None:
    assert by_kind(render(), "PodMonitor") == []
    # The switch is the controller's: no PodMonitor without the ServiceMonitor, and none without the other.
    for scenario in SCENARIOS.values():
        enabled = scenario.get("serviceMonitor", {}).get("enabled", False)
        objects = render(scenario)
        assert len(by_kind(objects, "PodMonitor")) == len(by_kind(objects, "ServiceMonitor")) == int(enabled)


def test_pod_monitor_scrapes_every_flows_workers() -> None:
    objects = render(SCENARIOS["service-monitor"])
    monitor = one(objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"] == f"{RELEASE}-workers"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # Workers run in the flows' namespaces, not the chart's: all of them when the controller watches all.
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    # Both tracks of a canaried flow: the component is `worker` or `worker-canary`.
    assert monitor["spec"]["selector"] == {
        "matchLabels": {k: v for k, v in WORKER_POD_LABELS.items() if k != "app.kubernetes.io/component"},
        "matchExpressions": [
            {"key": "app.kubernetes.io/component", "operator": "In", "values": ["worker", "worker-canary"]},
        ],
    }
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint == {
        # /metrics is served on the worker's operations port, named in the controller's build step.
        "port": worker_ops_port_name(),
        "path": "/metrics",
        "scheme": "http",
        # The worker's own flow and namespace labels are kept as they are.
        "honorLabels": True,
        "interval": "15s",
        "scrapeTimeout": "10s",
    }
    # The controller's own pods are not workers: the two monitors never select the same pods.
    controller_pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not WORKER_POD_LABELS.items() <= controller_pod_labels.items()


def test_pod_monitor_follows_the_watched_namespace_and_defaults() -> None:
    monitor = one(render({"watchNamespace": "tenant-a", "serviceMonitor": {"enabled": True}}), "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["tenant-a"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["interval"] == "30s"
    assert "scrapeTimeout" not in endpoint
    # fullnameOverride names it too.
    monitor = one(render({"fullnameOverride": "ml", "serviceMonitor": {"enabled": True}}), "PodMonitor")
    assert monitor["metadata"]["name"] == "ml-workers"


def test_service_account() -> None:
    sa = one(render(), "ServiceAccount")
    assert sa["metadata"]["name"] == RELEASE
    # Token only where the pod asks for it (the controller pod does).
    assert sa["automountServiceAccountToken"] is False

    objects = render(SCENARIOS["existing-service-account"])
    assert by_kind(objects, "ServiceAccount") == []
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "preexisting"
    for binding in by_kind(objects, "RoleBinding") + by_kind(objects, "ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "preexisting", "namespace": NAMESPACE}]


# --------------------------------------------------------------------------
# RBAC
# --------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rbac_has_no_wildcards_and_only_known_verbs(scenario: str) -> None:
    for role in by_kind(render(SCENARIOS[scenario]), "Role") + by_kind(render(SCENARIOS[scenario]), "ClusterRole"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                for item in rule.get(field, []):
                    assert "*" not in item, f"wildcard in {role['metadata']['name']}: {rule}"
            assert set(rule["verbs"]) <= ALL_KNOWN_VERBS, rule
            assert "nonResourceURLs" not in rule


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_secrets_never_modified_and_pvcs_never_deleted(scenario: str) -> None:
    for role in watch_roles(render(SCENARIOS[scenario])):
        perms = permissions(role)
        if ("", "secrets") in perms:
            # Read, plus create for the worker token; never update, patch or delete (users' Secrets are theirs).
            assert perms[("", "secrets")] == {"get", "list", "watch", "create"}
        if ("", "persistentvolumeclaims") in perms:
            assert "delete" not in perms[("", "persistentvolumeclaims")]
            assert "deletecollection" not in perms[("", "persistentvolumeclaims")]


def test_cluster_wide_rbac_exact_permissions() -> None:
    objects = render()
    assert [r["metadata"]["name"] for r in watch_roles(objects)] == [f"{RELEASE}-{NAMESPACE}"]
    cluster_role = one(objects, "ClusterRole")
    assert permissions(cluster_role) == {**WATCH_PERMISSIONS, **CRD_PERMISSION}
    assert all("resourceNames" not in rule for rule in cluster_role["rules"])
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": cluster_role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}]
    # Only the leader-election Role is namespaced.
    assert [r["metadata"]["name"] for r in by_kind(objects, "Role")] == [f"{RELEASE}-leader-election"]


@pytest.mark.parametrize("scenario", ["watch-namespace", "watch-release-namespace"])
def test_namespaced_rbac_when_watch_namespace_set(scenario: str) -> None:
    watch_ns = SCENARIOS[scenario]["watchNamespace"]
    objects = render(SCENARIOS[scenario])
    roles = [r for r in by_kind(objects, "Role") if not r["metadata"]["name"].endswith("-leader-election")]
    assert len(roles) == 1
    role = roles[0]
    assert role["metadata"]["namespace"] == watch_ns
    assert permissions(role) == WATCH_PERMISSIONS

    # The only cluster-scoped grant is reading CRDs.
    cluster_role = one(objects, "ClusterRole")
    assert permissions(cluster_role) == CRD_PERMISSION

    bindings = [b for b in by_kind(objects, "RoleBinding") if b["roleRef"]["name"] == role["metadata"]["name"]]
    assert len(bindings) == 1
    assert bindings[0]["metadata"]["namespace"] == watch_ns
    assert bindings[0]["roleRef"]["kind"] == "Role"
    assert bindings[0]["subjects"] == [{"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}]
    crb = one(objects, "ClusterRoleBinding")
    assert crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role["metadata"]["name"]}


def test_pods_proxy_only_when_asked() -> None:
    for scenario in ("default", "watch-namespace", "single-replica", "custom-images"):
        for role in watch_roles(render(SCENARIOS[scenario])):
            assert ("", "pods/proxy") not in permissions(role), scenario
            # The service proxy is no longer used at all: status is read pod by pod.
            assert ("", "services/proxy") not in permissions(role), scenario

    cluster_role = one(render(SCENARIOS["status-via-proxy"]), "ClusterRole")
    assert permissions(cluster_role) == {**WATCH_PERMISSIONS, **CRD_PERMISSION, **PROXY_PERMISSION}

    objects = render(SCENARIOS["watch-namespace-proxy"])
    role = next(r for r in by_kind(objects, "Role") if r["metadata"]["namespace"] == "tenant-a")
    assert permissions(role) == {**WATCH_PERMISSIONS, **PROXY_PERMISSION}
    assert permissions(one(objects, "ClusterRole")) == CRD_PERMISSION


def test_values_comment_flags_status_via_proxy_as_broad() -> None:
    text = (CHART / "values.yaml").read_text()
    block = text[text.index("statusViaProxy") - 800 : text.index("statusViaProxy")]
    assert "pods/proxy" in block and "BROAD" in block.upper()


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_leader_election_lease_rules(scenario: str) -> None:
    values = SCENARIOS[scenario]
    objects = render(values)
    if values.get("rbac", {}).get("create", True) is False:
        return
    lease_name = arg_value(controller_container(objects)["args"], "--lease-name")
    role = leader_election_role(objects)
    assert role["metadata"]["namespace"] == NAMESPACE
    rules = role["rules"]
    assert all(r["apiGroups"] == ["coordination.k8s.io"] and r["resources"] == ["leases"] for r in rules)
    create_rules = [r for r in rules if "create" in r["verbs"]]
    assert create_rules == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]}]
    named = [r for r in rules if "resourceNames" in r]
    assert len(named) == 1 and len(rules) == 2
    assert named[0]["resourceNames"] == [lease_name]
    assert set(named[0]["verbs"]) == {"get", "patch", "update"}
    binding = next(b for b in by_kind(objects, "RoleBinding") if b["roleRef"]["name"] == role["metadata"]["name"])
    assert binding["metadata"]["namespace"] == NAMESPACE
    # No other object grants anything on leases.
    for other in watch_roles(objects):
        assert not any(resource == "leases" for (_, resource) in permissions(other))


def test_rbac_can_be_turned_off() -> None:
    objects = render(SCENARIOS["no-rbac"])
    assert not [o for o in objects if o["apiVersion"].startswith("rbac.authorization.k8s.io/")]
    assert one(objects, "Deployment")


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_bindings_point_at_rendered_roles(scenario: str) -> None:
    objects = render(SCENARIOS[scenario])
    roles = {(r["kind"], r["metadata"]["name"], r["metadata"].get("namespace")) for r in by_kind(objects, "Role") + by_kind(objects, "ClusterRole")}
    sa_name = one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    for binding in by_kind(objects, "RoleBinding") + by_kind(objects, "ClusterRoleBinding"):
        ref = binding["roleRef"]
        namespace = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        assert (ref["kind"], ref["name"], namespace) in roles, binding
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": NAMESPACE}]


# --------------------------------------------------------------------------
# NOTES.txt and the image the chart runs
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Worker NetworkPolicies: chart-wide, and the controller's per-flow switch
# --------------------------------------------------------------------------

NETWORKPOLICY_FULL = {("networking.k8s.io", "networkpolicies"): {"get", "list", "watch", "create", "patch", "delete"}}
NETWORKPOLICY_CLEAN_UP = {("networking.k8s.io", "networkpolicies"): {"list", "watch", "delete"}}


def test_no_network_policies_and_no_rbac_for_them_by_default() -> None:
    objects = render()
    assert by_kind(objects, "NetworkPolicy") == []
    for role in watch_roles(objects):
        assert ("networking.k8s.io", "networkpolicies") not in permissions(role)
    args = controller_container(objects)["args"]
    assert not [a for a in args if "network-polic" in a or "namespace" in a and a != "--namespace"]


def test_per_flow_network_policies_grant_exactly_what_the_controller_does() -> None:
    objects = render(SCENARIOS["network-policies-per-flow"])
    assert permissions(one(objects, "ClusterRole")) == {**WATCH_PERMISSIONS, **CRD_PERMISSION, **NETWORKPOLICY_FULL}
    args = controller_container(objects)["args"]
    assert arg_value(args, "--flow-network-policies") == "on"
    assert arg_value(args, "--webhook-from-namespace") == "ingress-nginx"
    assert arg_value(args, "--metrics-from-namespace") == "monitoring"
    # The labels the controller's own pods carry, so the workers' operations port admits exactly them.
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    wanted = dict(pair.split("=") for pair in arg_value(args, "--controller-pod-labels").split(","))
    assert wanted.items() <= pod_labels.items(), (wanted, pod_labels)
    assert wanted == one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert "--api-server-cidr" not in args
    # The controller makes the policies; the chart renders none of its own.
    assert by_kind(objects, "NetworkPolicy") == []

    namespaced = render(SCENARIOS["network-policies-per-flow-namespaced"])
    role = next(r for r in by_kind(namespaced, "Role") if r["metadata"]["namespace"] == "tenant-a")
    assert permissions(role) == {**WATCH_PERMISSIONS, **NETWORKPOLICY_FULL}
    assert permissions(one(namespaced, "ClusterRole")) == CRD_PERMISSION


def test_clean_up_mode_may_only_find_and_delete_network_policies() -> None:
    objects = render(SCENARIOS["network-policies-clean-up"])
    assert permissions(one(objects, "ClusterRole")) == {**WATCH_PERMISSIONS, **CRD_PERMISSION, **NETWORKPOLICY_CLEAN_UP}
    args = controller_container(objects)["args"]
    assert arg_value(args, "--flow-network-policies") == "clean-up"
    assert "--webhook-from-namespace" not in args and "--controller-pod-labels" not in args
    notes = render_files(SCENARIOS["network-policies-clean-up"])["meshline/templates/NOTES.txt"]
    assert "clean-up" in notes


def test_chart_wide_worker_policies_admit_the_ingress_to_webhooks_and_the_controller_to_operations() -> None:
    values = SCENARIOS["network-policies-workers"]
    objects = render(values)
    policies = by_kind(objects, "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["sync-a", "sync-b"]
    for policy in policies:
        spec = policy["spec"]
        # Every Meshline worker in the namespace, as the controller labels them: both tracks of a canary.
        assert spec["podSelector"] == {
            "matchLabels": {
                "app.kubernetes.io/name": "meshline-worker",
                "app.kubernetes.io/part-of": "meshline",
            },
            "matchExpressions": [
                {"key": "app.kubernetes.io/component", "operator": "In", "values": ["worker", "worker-canary"]},
            ],
        }
        assert spec["policyTypes"] == ["Ingress"]
        assert "egress" not in spec
        webhook, ops = spec["ingress"]
        assert webhook["ports"] == [{"port": "webhook", "protocol": "TCP"}]
        assert webhook["from"] == [{"namespaceSelector": {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["ingress-nginx", "traefik"]}
        ]}}]
        assert ops["ports"] == [{"port": "ops", "protocol": "TCP"}]
        controller, preflight, metrics, *cidrs = ops["from"]
        # Preflight replay pods of the namespace read an embedded ledger through the operations API.
        assert preflight == {"podSelector": {"matchLabels": {
            "app.kubernetes.io/component": "preflight",
            "app.kubernetes.io/managed-by": "meshline-controller",
        }}}
        assert controller["namespaceSelector"]["matchExpressions"][0]["values"] == [NAMESPACE]
        assert controller["podSelector"]["matchLabels"] == one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
        assert metrics["namespaceSelector"]["matchExpressions"][0]["values"] == ["monitoring"]
        assert cidrs == [{"ipBlock": {"cidr": "10.0.0.1/32"}}, {"ipBlock": {"cidr": "fd00::1/128"}}]
    # The chart-wide policies need no RBAC of the controller.
    assert ("networking.k8s.io", "networkpolicies") not in permissions(one(objects, "ClusterRole"))


def test_worker_policies_default_to_the_watched_namespace_and_close_webhooks_when_told() -> None:
    objects = render({"watchNamespace": "tenant-a", "networkPolicy": {"webhookFromNamespaces": [], "workers": {"enabled": True}}})
    policy = one(objects, "NetworkPolicy")
    assert policy["metadata"]["namespace"] == "tenant-a"
    assert [r["ports"][0]["port"] for r in policy["spec"]["ingress"]] == ["ops"]
    assert one(render({"networkPolicy": {"workers": {"enabled": True}}}), "NetworkPolicy")["metadata"]["namespace"] == NAMESPACE


def test_status_via_proxy_without_api_server_cidrs_is_flagged() -> None:
    values = {"controller": {"statusViaProxy": True}, "networkPolicy": {"perFlow": {"mode": "on"}}}
    notes = render_files(values)["meshline/templates/NOTES.txt"]
    assert "apiServerCIDRs" in notes and "block the controller's status reads" in notes
    notes = render_files(SCENARIOS["network-policies-workers"])["meshline/templates/NOTES.txt"]
    assert "block the controller's status reads" not in notes
    assert "10.0.0.1/32" in notes


def test_values_document_egress_and_the_api_server() -> None:
    text = (CHART / "values.yaml").read_text()
    block = text[text.index("networkPolicy:") - 1200 : text.index("apiServerCIDRs:")]
    assert "egress" in block.lower() and "statusViaProxy" in block


def test_notes() -> None:
    notes = render_files()["meshline/templates/NOTES.txt"]
    assert "all namespaces" in notes and "WARNING" not in notes
    notes = render_files(SCENARIOS["watch-namespace-proxy"])["meshline/templates/NOTES.txt"]
    assert 'namespace "tenant-a" only' in notes
    assert "WARNING" in notes and "pods/proxy" in notes


def test_dockerfile_matches_chart_assumptions() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    # The chart runs the image as 65532 with no `command`: the image must agree.
    assert re.search(r"^USER 65532:65532$", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["/usr/local/bin/meshline"\]$', dockerfile, re.M)
    assert re.search(r'^CMD \["controller"\]$', dockerfile, re.M)
    assert "gcr.io/distroless/cc-debian12:nonroot" in dockerfile
    assert "cargo build --release --locked --bin meshline" in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    assert "target/" in ignored or "target" in ignored
    assert ".git/" in ignored or ".git" in ignored


# --------------------------------------------------------------------------
# scripts/python-env
# --------------------------------------------------------------------------


def _python_env(venv: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHLINE_VENV": str(venv)}
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "python-env")],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def test_python_env_fast_path_is_quiet() -> None:
    venv = Path(sys.prefix)
    if not (venv / ".meshline-requirements.sha256").is_file():
        pytest.skip("tests are not running from a venv made by scripts/python-env")
    result = _python_env(venv)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{venv}\n"
    assert result.stderr == ""


def test_python_env_never_clobbers_a_foreign_directory(tmp_path: Path) -> None:
    foreign = tmp_path / "not-a-venv"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    result = _python_env(foreign)
    assert result.returncode != 0
    assert "is not a virtualenv" in result.stderr
    assert (foreign / "precious.txt").read_text() == "keep me"


# --------------------------------------------------------------------------
# Operations page
# --------------------------------------------------------------------------


def test_ops_page_is_off_by_default() -> None:
    objects = render()
    container = controller_container(objects)
    assert "--ops-page-addr" not in container["args"]
    assert [p["name"] for p in container["ports"]] == ["http"]
    assert [p["name"] for p in one(objects, "Service")["spec"]["ports"]] == ["http"]


def test_ops_page_gets_its_flag_container_port_and_service_port() -> None:
    objects = render(SCENARIOS["ops-page"])
    container = controller_container(objects)
    assert arg_value(container["args"], "--ops-page-addr") == "0.0.0.0:8090"
    assert {"name": "ops-page", "containerPort": 8090, "protocol": "TCP"} in container["ports"]
    service = one(objects, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert {"name": "ops-page", "port": 8090, "targetPort": "ops-page", "protocol": "TCP"} in service["spec"]["ports"]
    # No credentials of its own anywhere: no Secret, no token in the args.
    assert by_kind(objects, "Secret") == []
    assert not any("token" in a.lower() for a in container["args"])


def test_ops_page_through_the_proxy_may_post_and_without_it_needs_no_proxy_right() -> None:
    with_proxy = render(SCENARIOS["ops-page-proxy"])
    assert arg_value(controller_container(with_proxy)["args"], "--ops-page-addr") == "0.0.0.0:9443"
    assert proxy_verbs(with_proxy) == {"get", "create"}
    assert proxy_verbs(render(SCENARIOS["ops-page"])) == set()
    # statusViaProxy without the page keeps the read-only proxy right.
    assert proxy_verbs(render(SCENARIOS["status-via-proxy"])) == {"get"}


def proxy_verbs(objects: list[dict[str, Any]]) -> set[str]:
    """The verbs on pods/proxy over every watch role."""
    verbs: set[str] = set()
    for role in watch_roles(objects):
        verbs |= permissions(role).get(("", "pods/proxy"), set())
    return verbs
