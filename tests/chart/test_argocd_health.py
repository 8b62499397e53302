"""The chart's optional Argo CD health checks (argocdHealth): a ConfigMap whose data is ready to merge into
Argo CD's argocd-cm, one `resource.customizations.health.<group>_<Kind>` key per Meshline kind, each holding the
Lua file of charts/meshline/argocd/ verbatim.

The objects are rendered by real Helm and validated by `kubernetes-validate` with the other scenarios (see
test_chart.py, scenarios `argocd-health*`). What the Lua says for each status is tested by running it:
tests/argocd_health.rs (Lua 5.1, as Argo CD's gopher-lua).
"""

from __future__ import annotations

import re
import yaml

from test_chart import CHART, CRD_DIR, NAMESPACE, RELEASE, SCENARIOS, by_kind, one, render, render_files

TEMPLATE = "meshline/templates/argocd-health.yaml"
ENABLED = SCENARIOS["argocd-health"]
LUA_DIR = CHART / "argocd"
# Argo CD reads health checks from argocd-cm keys of this shape (util/settings: resource.customizations.health.
# <group>_<kind>, the group with its dots, `_` between group and kind).
ARGO_CD_KEY = re.compile(r"^resource\.customizations\.health\.([a-z0-9.-]+)_([A-Z][A-Za-z0-9]*)$")
# What the API server allows as a ConfigMap key.
CONFIGMAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def crd_kinds() -> set[tuple[str, str]]:
    """(group, kind) of every CRD the chart ships."""
    out = set()
    for path in CRD_DIR.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        out.add((crd["spec"]["group"], crd["spec"]["names"]["kind"]))
    return out


def health_config_maps(values: dict) -> list[dict]:
    return [o for o in by_kind(render(values), "ConfigMap") if o["metadata"]["name"].endswith("-argocd-health")]


def test_health_config_map_is_absent_by_default() -> None:
    for name, values in SCENARIOS.items():
        enabled = values.get("argocdHealth", {}).get("enabled", False)
        assert len(health_config_maps(values)) == (1 if enabled else 0), name
    assert not render_files().get(TEMPLATE, "").strip()
    assert "argocd-cm" not in render_files()["meshline/templates/NOTES.txt"]


def test_enabled_config_map_has_one_argo_cd_key_per_meshline_kind() -> None:
    cm = one(health_config_maps(ENABLED), "ConfigMap")
    assert cm["apiVersion"] == "v1"
    assert cm["metadata"]["name"] == f"{RELEASE}-argocd-health"
    assert cm["metadata"]["namespace"] == NAMESPACE
    keyed = set()
    for key in cm["data"]:
        assert CONFIGMAP_KEY.match(key), key
        m = ARGO_CD_KEY.match(key)
        assert m, f"{key} is not a key Argo CD reads as a health check"
        keyed.add((m.group(1), m.group(2)))
    # Helm's loader honours .helmignore, so this also proves the chart packages its argocd/ folder.
    assert keyed == crd_kinds() == {
        ("sync.meshline.io", "SyncFlow"),
        ("sync.meshline.io", "SyncContract"),
        ("sync.meshline.io", "OwnershipRoster"),
    }


def test_each_key_holds_its_lua_file_verbatim() -> None:
    cm = one(health_config_maps(ENABLED), "ConfigMap")
    files = {p.name: p.read_text() for p in LUA_DIR.glob("*.lua")}
    assert sorted(files) == sorted(f"{k.removeprefix('resource.customizations.health.')}.lua" for k in cm["data"])
    for key, lua in cm["data"].items():
        name = key.removeprefix("resource.customizations.health.") + ".lua"
        assert lua == files[name], name
        # Every script returns the table Argo CD reads.
        assert "status = status, message = message" in lua, name


def test_name_follows_the_fullname_override_and_notes_say_how_to_merge() -> None:
    values = SCENARIOS["argocd-health-fullname-override"]
    assert [c["metadata"]["name"] for c in health_config_maps(values)] == ["ml-argocd-health"]
    notes = render_files(values)["meshline/templates/NOTES.txt"]
    assert "configmap argocd-cm --type merge" in notes
    assert f"-n {NAMESPACE} get configmap ml-argocd-health -o json" in notes



def test_readme_snippet_is_the_rendered_config_maps_data() -> None:
    readme = (CHART.parents[1] / "README.md").read_text()
    section = readme[readme.index("## Use with Argo CD") :]
    start = section.index("```yaml\n") + len("```yaml\n")
    snippet = section[start : section.index("\n```", start) + 1]
    assert yaml.safe_load(snippet)["data"] == one(health_config_maps(ENABLED), "ConfigMap")["data"]
