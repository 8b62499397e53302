"""The chart's optional sign-off policy (signOffPolicy): a ValidatingAdmissionPolicy that lets a request add a
SyncContract sign-off for a roster owner only when the requester is that owner's kubernetesUser or in one of
its kubernetesGroups.

The objects are rendered by real Helm and validated by `kubernetes-validate` (see test_chart.py). The policy's
CEL expressions, taken from the RENDERED chart, are then evaluated by cel-python (`celpy`) the way the API
server runs a ValidatingAdmissionPolicy: matchConditions first (any false: the policy does not apply), then,
once per OwnershipRoster the binding's paramRef selects (none: allowed, `parameterNotFoundAction: Allow`), the
variables in order and the validations; a failed validation's messageExpression is the refusal.

Not verified here, only on a real API server (tests/e2e.rs `sign_off_policy_lets_only_the_owner_add_a_sign_off`):
the API server's type checking of the expressions against the CRD schemas and `request` (`request.userInfo`
typing, `variables` declarations), its static cost estimate and runtime cost budget, cel-go's exact semantics
where celpy may differ, and that the binding's paramRef really selects every roster of the namespace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celpy
import kubernetes_validate
import pytest
import yaml

from test_chart import KUBE_VERSION, NAMESPACE, RELEASE, REPO, SCENARIOS, by_kind, one, permissions, render, render_files, strip, watch_roles

POLICY_KINDS = {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
ARGO_CD = "system:serviceaccount:argocd:argocd-application-controller"
GITOPS_GROUP = "platform:gitops"
ENABLED = SCENARIOS["sign-off-policy"]
# The rendered policy the e2e suite installs (tests/e2e.rs reads it; a Rust test cannot run Helm).
E2E_COPY = REPO / "tests" / "data" / "sign-off-policy.yaml"
E2E_VALUES = {"signOffPolicy": {"enabled": True}}


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def test_policy_is_absent_by_default() -> None:
    for name, values in SCENARIOS.items():
        enabled = values.get("signOffPolicy", {}).get("enabled", False)
        kinds = {o["kind"] for o in render(values)} & POLICY_KINDS
        assert kinds == (POLICY_KINDS if enabled else set()), name
    assert "meshline/templates/sign-off-policy.yaml" not in {
        path for path, text in render_files().items() if text.strip()
    }


def test_enabled_policy_matches_contract_writes_with_rosters_as_params() -> None:
    objects = render(ENABLED)
    policy, binding = one(objects, "ValidatingAdmissionPolicy"), one(objects, "ValidatingAdmissionPolicyBinding")
    for obj in (policy, binding):
        assert obj["apiVersion"] == "admissionregistration.k8s.io/v1"
        assert "namespace" not in obj["metadata"]
        kubernetes_validate.validate(strip(obj), KUBE_VERSION, strict=True)
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    assert spec["paramKind"] == {"apiVersion": "sync.meshline.io/v1alpha1", "kind": "OwnershipRoster"}
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert rule["apiGroups"] == ["sync.meshline.io"]
    assert rule["operations"] == ["CREATE", "UPDATE"]
    # The plural the CRD declares (the status subresource is not matched: the controller writes it).
    crd = yaml.safe_load((REPO / "charts/meshline/crds/synccontracts.sync.meshline.io.yaml").read_text())
    assert rule["resources"] == [crd["spec"]["names"]["plural"]]
    assert rule["apiVersions"] == [v["name"] for v in crd["spec"]["versions"]]
    roster_crd = yaml.safe_load((REPO / "charts/meshline/crds/ownershiprosters.sync.meshline.io.yaml").read_text())
    assert roster_crd["spec"]["names"]["kind"] == "OwnershipRoster"
    assert [v["messageExpression"] for v in spec["validations"]]

    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    # Every roster in the contract's namespace; no roster, nothing to check.
    assert binding["spec"]["paramRef"] == {"selector": {}, "parameterNotFoundAction": "Allow"}
    assert "matchResources" not in binding["spec"]
    assert policy["metadata"]["name"] == f"{RELEASE}-{NAMESPACE}-sign-offs"


def test_namespaced_release_binds_the_policy_to_the_watched_namespace_only() -> None:
    objects = render(SCENARIOS["sign-off-policy-namespaced"])
    binding = one(objects, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["matchResources"] == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "tenant-a"}}
    }
    assert one(objects, "ValidatingAdmissionPolicy")["spec"]["failurePolicy"] == "Ignore"


def test_notes_name_the_policy_and_its_exemptions() -> None:
    assert "Contract sign-offs" not in render_files()["meshline/templates/NOTES.txt"]
    notes = render_files(ENABLED)["meshline/templates/NOTES.txt"]
    assert f"ValidatingAdmissionPolicy {RELEASE}-{NAMESPACE}-sign-offs" in notes
    assert f"exempt users: {ARGO_CD}" in notes and f"exempt groups: {GITOPS_GROUP}" in notes


def test_policy_names_do_not_collide_across_release_namespaces() -> None:
    a = one(render(ENABLED, namespace="team-a"), "ValidatingAdmissionPolicy")["metadata"]["name"]
    b = one(render(ENABLED, namespace="team-b"), "ValidatingAdmissionPolicy")["metadata"]["name"]
    assert a != b


def test_exempt_users_and_groups_are_rendered_into_the_match_condition() -> None:
    (condition,) = one(render(ENABLED), "ValidatingAdmissionPolicy")["spec"]["matchConditions"]
    assert f'["{ARGO_CD}"]' in condition["expression"]
    assert f'["{GITOPS_GROUP}"]' in condition["expression"]
    (condition,) = one(render(E2E_VALUES), "ValidatingAdmissionPolicy")["spec"]["matchConditions"]
    assert condition["expression"].count("[]") == 2


def test_the_controller_needs_no_rbac_for_the_policy() -> None:
    def grants(values: dict[str, Any]) -> list[dict[tuple[str, str], set[str]]]:
        return [permissions(r) for r in watch_roles(render(values))]

    assert grants(ENABLED) == grants({k: v for k, v in ENABLED.items() if k != "signOffPolicy"})


def test_e2e_copy_of_the_policy_is_the_rendered_chart() -> None:
    rendered = render_files(E2E_VALUES)["meshline/templates/sign-off-policy.yaml"]
    header = (
        "# Rendered by tests/chart/test_sign_off_policy.py from charts/meshline with signOffPolicy.enabled=true\n"
        "# (release meshline, namespace meshline-system); tests/e2e.rs installs it. Do not edit: regenerate with\n"
        "# MESHLINE_WRITE_RENDERED=1 <venv>/bin/pytest tests/chart -q -k e2e_copy\n"
    )
    if os.environ.get("MESHLINE_WRITE_RENDERED") == "1":
        E2E_COPY.write_text(header + rendered.lstrip("\n"))
    assert E2E_COPY.read_text() == header + rendered.lstrip("\n"), f"{E2E_COPY} is stale"


# --------------------------------------------------------------------------
# The policy's CEL, evaluated
# --------------------------------------------------------------------------

CEL = celpy.Environment()


@dataclass
class Verdict:
    allowed: bool
    message: str | None = None


class SignOffPolicy:
    """A ValidatingAdmissionPolicy's expressions, compiled by celpy and run in the API server's order."""

    def __init__(self, policy: dict[str, Any]) -> None:
        spec = policy["spec"]
        self.match_conditions = [(m["name"], self._compile(m["expression"])) for m in spec.get("matchConditions", [])]
        self.variables = [(v["name"], self._compile(v["expression"])) for v in spec.get("variables", [])]
        self.validations = [
            (self._compile(v["expression"]), self._compile(v["messageExpression"]), v["message"])
            for v in spec["validations"]
        ]

    @staticmethod
    def _compile(expression: str) -> celpy.Runner:
        return CEL.program(CEL.compile(expression))

    def admit(
        self,
        *,
        operation: str,
        obj: dict[str, Any],
        old: dict[str, Any] | None,
        user: str,
        groups: list[str],
        rosters: list[dict[str, Any]],
    ) -> Verdict:
        request = {"operation": operation, "userInfo": {"username": user, "groups": groups}}
        base = {
            "object": celpy.json_to_cel(obj),
            "oldObject": celpy.json_to_cel(old),
            "request": celpy.json_to_cel(request),
        }
        for _, condition in self.match_conditions:
            if not bool(condition.evaluate(base)):
                return Verdict(True)
        # parameterNotFoundAction: Allow. Otherwise every selected roster is a separate evaluation; all must pass.
        for roster in rosters:
            variables = celpy.celtypes.MapType()
            activation = {**base, "params": celpy.json_to_cel(roster), "variables": variables}
            for name, program in self.variables:
                variables[celpy.celtypes.StringType(name)] = program.evaluate(activation)
            for check, message, _ in self.validations:
                if not bool(check.evaluate(activation)):
                    return Verdict(False, str(message.evaluate(activation)))
        return Verdict(True)


@pytest.fixture(scope="module")
def policy() -> SignOffPolicy:
    return SignOffPolicy(one(render(ENABLED), "ValidatingAdmissionPolicy"))


LENA = "lena@commerce.example"
TOMAS = "tomas@commerce.example"


def roster(name: str = "commerce-owners", **overrides: dict[str, Any]) -> dict[str, Any]:
    owners = {
        "sam": {"id": "sam", "name": "Sam Whitfield"},
        "lena": {"id": "lena", "name": "Lena Vogt", "kubernetesUser": LENA},
        "tomas": {"id": "tomas", "name": "Tomas Novak", "kubernetesGroups": ["accounting", "erp-admins"]},
    }
    owners.update(overrides)
    return {
        "apiVersion": "sync.meshline.io/v1alpha1",
        "kind": "OwnershipRoster",
        "metadata": {"name": name, "namespace": "commerce-sync"},
        "spec": {
            "owners": list(owners.values()),
            "assignments": [{"flows": ["won-deals-to-odoo"], "syncOwner": "sam", "sourceOwner": "lena", "sinkOwner": "tomas"}],
        },
    }


def sign_off(owner: str, version: str = "2.1.0", content_hash: str | None = None, **extra: str) -> dict[str, Any]:
    entry = {"owner": owner, "version": version, **extra}
    if content_hash:
        entry["contentHash"] = content_hash
    return entry


def contract(*sign_offs: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"version": "2.1.0"}
    if sign_offs:
        spec["signOffs"] = list(sign_offs)
    return {
        "apiVersion": "sync.meshline.io/v1alpha1",
        "kind": "SyncContract",
        "metadata": {"name": "opportunity-to-sales-order", "namespace": "commerce-sync"},
        "spec": spec,
    }


HASH_A = "sha256:" + "a" * 64
HASH_B = "sha256:" + "b" * 64


def _schema_node(crd_file: str, path: str) -> dict[str, Any]:
    crd = yaml.safe_load((REPO / "charts/meshline/crds" / crd_file).read_text())
    node = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for key in path.split("."):
        node = node["items"] if key == "[]" else node["properties"][key]
    return node


def test_every_list_and_string_the_policy_reads_is_bounded_in_the_crds() -> None:
    # The API server estimates a policy's cost from the declared bounds; this is the offline half of that check
    # (the estimate itself runs only on a real API server). request.userInfo.groups has no declared bound.
    expressions = " ".join(
        v["expression"] for v in one(render(ENABLED), "ValidatingAdmissionPolicy")["spec"]["variables"]
    )
    bounded = {
        ("synccontracts.sync.meshline.io.yaml", "spec.signOffs", "signOffs"): ("maxItems", 50),
        ("synccontracts.sync.meshline.io.yaml", "spec.signOffs.[].owner", ".owner"): ("maxLength", 63),
        ("synccontracts.sync.meshline.io.yaml", "spec.signOffs.[].version", ".version"): ("maxLength", 64),
        ("ownershiprosters.sync.meshline.io.yaml", "spec.owners", "owners"): ("maxItems", 100),
        ("ownershiprosters.sync.meshline.io.yaml", "spec.owners.[].id", ".id"): ("maxLength", 63),
        ("ownershiprosters.sync.meshline.io.yaml", "spec.owners.[].kubernetesUser", "kubernetesUser"): ("maxLength", 253),
        ("ownershiprosters.sync.meshline.io.yaml", "spec.owners.[].kubernetesGroups", "kubernetesGroups"): ("maxItems", 20),
        ("ownershiprosters.sync.meshline.io.yaml", "spec.owners.[].kubernetesGroups.[]", "kubernetesGroups"): ("maxLength", 253),
    }
    for (crd_file, path, used_as), (bound, limit) in bounded.items():
        assert used_as in expressions, used_as
        node = _schema_node(crd_file, path)
        assert node.get(bound) == limit, f"{crd_file} {path}: {bound} {node.get(bound)}, want {limit}"


def test_owner_matched_by_user_may_add_the_sign_off(policy: SignOffPolicy) -> None:
    verdict = policy.admit(operation="CREATE", obj=contract(sign_off("lena")), old=None, user=LENA,
                           groups=["system:authenticated"], rosters=[roster()])
    assert verdict == Verdict(True)


def test_owner_matched_by_group_may_add_the_sign_off(policy: SignOffPolicy) -> None:
    verdict = policy.admit(operation="UPDATE", obj=contract(sign_off("tomas", content_hash=HASH_A)), old=contract(),
                           user="jo@commerce.example", groups=["system:authenticated", "erp-admins"], rosters=[roster()])
    assert verdict == Verdict(True)


def test_sign_off_by_someone_else_is_refused_naming_owner_and_user(policy: SignOffPolicy) -> None:
    verdict = policy.admit(operation="UPDATE", obj=contract(sign_off("lena")), old=contract(),
                           user=TOMAS, groups=["accounting", "system:authenticated"], rosters=[roster()])
    assert not verdict.allowed
    assert verdict.message == (
        f'user "{TOMAS}" may not add a sign-off for owner "lena": OwnershipRoster commerce-owners lets only '
        "that owner's kubernetesUser or a member of its kubernetesGroups add it"
    )


def test_create_with_a_forged_sign_off_is_refused(policy: SignOffPolicy) -> None:
    # oldObject is null on CREATE: every sign-off of a new contract counts as added.
    verdict = policy.admit(operation="CREATE", obj=contract(sign_off("lena"), sign_off("tomas")), old=None,
                           user=LENA, groups=[], rosters=[roster()])
    assert not verdict.allowed
    assert '"tomas"' in verdict.message and f'"{LENA}"' in verdict.message


def test_owner_without_kubernetes_identity_cannot_be_signed_for(policy: SignOffPolicy) -> None:
    verdict = policy.admit(operation="CREATE", obj=contract(sign_off("sam")), old=None,
                           user="sam", groups=["system:authenticated"], rosters=[roster()])
    assert not verdict.allowed and '"sam"' in verdict.message


def test_several_refused_sign_offs_are_counted(policy: SignOffPolicy) -> None:
    verdict = policy.admit(operation="CREATE", obj=contract(sign_off("lena"), sign_off("tomas"), sign_off("sam")),
                           old=None, user="mallory", groups=[], rosters=[roster()])
    assert not verdict.allowed
    assert '"lena"' in verdict.message and "(2 more refused sign-offs in this request)" in verdict.message


@pytest.mark.parametrize(("user", "groups"), [(ARGO_CD, ["system:serviceaccounts"]), ("ci-bot", [GITOPS_GROUP])])
def test_exempt_requesters_pass(policy: SignOffPolicy, user: str, groups: list[str]) -> None:
    verdict = policy.admit(operation="CREATE", obj=contract(sign_off("lena"), sign_off("tomas")), old=None,
                           user=user, groups=groups, rosters=[roster()])
    assert verdict == Verdict(True)


def test_without_exemptions_argo_cd_is_checked_too() -> None:
    plain = SignOffPolicy(one(render(E2E_VALUES), "ValidatingAdmissionPolicy"))
    verdict = plain.admit(operation="CREATE", obj=contract(sign_off("lena")), old=None,
                          user=ARGO_CD, groups=[GITOPS_GROUP], rosters=[roster()])
    assert not verdict.allowed


def test_sign_off_for_an_owner_the_roster_does_not_define_is_not_checked(policy: SignOffPolicy) -> None:
    verdict = policy.admit(operation="CREATE", obj=contract(sign_off("someone-else")), old=None,
                           user="mallory", groups=[], rosters=[roster()])
    assert verdict == Verdict(True)


def test_unchanged_existing_sign_off_passes_on_update(policy: SignOffPolicy) -> None:
    old = contract(sign_off("lena", content_hash=HASH_A, role="sourceOwner"))
    # Someone else edits the contract (here: adds their own sign-off) and keeps Lena's as it was.
    new = contract(sign_off("lena", content_hash=HASH_A, role="sourceOwner"), sign_off("tomas", content_hash=HASH_A))
    verdict = policy.admit(operation="UPDATE", obj=new, old=old, user="jo", groups=["accounting"], rosters=[roster()])
    assert verdict == Verdict(True)
    # An edit of the same approval's role or timestamp does not add an approval either.
    new = contract(sign_off("lena", content_hash=HASH_A, role="syncOwner", approvedAt="2026-12-01T10:00:00Z"))
    assert policy.admit(operation="UPDATE", obj=new, old=old, user="jo", groups=[], rosters=[roster()]).allowed


def test_re_pointing_an_existing_sign_off_at_other_content_or_version_is_adding_one(policy: SignOffPolicy) -> None:
    old = contract(sign_off("lena", content_hash=HASH_A))
    for changed in (sign_off("lena", content_hash=HASH_B), sign_off("lena"), sign_off("lena", version="3.0.0", content_hash=HASH_A)):
        verdict = policy.admit(operation="UPDATE", obj=contract(changed), old=old, user="jo", groups=[], rosters=[roster()])
        assert not verdict.allowed, changed
        assert '"lena"' in verdict.message


def test_removing_sign_offs_is_not_the_policys_business(policy: SignOffPolicy) -> None:
    old = contract(sign_off("lena"), sign_off("tomas"))
    for new in (contract(sign_off("tomas")), contract()):
        assert policy.admit(operation="UPDATE", obj=new, old=old, user="mallory", groups=[], rosters=[roster()]).allowed


def test_every_roster_in_the_namespace_must_pass(policy: SignOffPolicy) -> None:
    # A second roster that names Mallory as "lena" does not outvote the first one.
    forged = roster("mallorys-roster", lena={"id": "lena", "name": "Lena?", "kubernetesUser": "mallory"})
    verdict = policy.admit(operation="CREATE", obj=contract(sign_off("lena")), old=None,
                           user="mallory", groups=[], rosters=[forged, roster()])
    assert not verdict.allowed and "OwnershipRoster commerce-owners" in verdict.message
    # Lena passes both: the forged roster's "lena" has another user, so it refuses her.
    verdict = policy.admit(operation="CREATE", obj=contract(sign_off("lena")), old=None,
                           user=LENA, groups=[], rosters=[roster(), forged])
    assert not verdict.allowed and "mallorys-roster" in verdict.message


def test_no_roster_means_nothing_to_check(policy: SignOffPolicy) -> None:
    verdict = policy.admit(operation="CREATE", obj=contract(sign_off("lena")), old=None, user="mallory", groups=[], rosters=[])
    assert verdict == Verdict(True)


def test_the_evaluator_really_evaluates_the_rendered_expressions() -> None:
    """Guard against an evaluator that lets everything through: break one rendered variable and see it bite."""
    rendered = one(render(ENABLED), "ValidatingAdmissionPolicy")
    (requester_owners,) = [v for v in rendered["spec"]["variables"] if v["name"] == "requesterOwners"]
    requester_owners["expression"] = "[]"
    broken = SignOffPolicy(rendered)
    verdict = broken.admit(operation="CREATE", obj=contract(sign_off("lena")), old=None, user=LENA, groups=[], rosters=[roster()])
    assert not verdict.allowed and '"lena"' in verdict.message
