"""No pod is claimed twice: disruption budgets and Deployments, in every target and side by side.

A pod that two PodDisruptionBudgets select cannot be evicted at all (the
eviction API refuses it), so every node drain that reaches it blocks. A pod
that two Deployments' selectors match is counted by both their autoscalers
(an HPA reads its target's selector). Both happen when a second Deployment
copies the first's labels: the canary recipe did (a copy of the overlay with
a nameSuffix). Every target is rendered, and so is what one namespace holds
with a canary ("cpu+canary": the cpu overlay and the canary overlay, each
applied on its own).
"""

from __future__ import annotations

import pytest

from tests.deploy import manifests as m

TARGETS_WITH_WORKLOADS = [t for t in (*m.TARGETS, *m.SIDE_BY_SIDE) if list(m.workloads(t))]


def claims(objects: list[dict]) -> list[str]:
    """What is wrong with who selects each workload's pods (empty: nothing)."""
    budgets = m.find_all(objects, "PodDisruptionBudget")
    deployments = m.find_all(objects, "Deployment")
    problems = []
    for workload in (o for o in objects if o["kind"] in ("Deployment", "InferenceService")):
        name = f"{workload['kind']} {workload['metadata']['name']}"
        labels = m.pod_labels(workload)
        chosen = [b["metadata"]["name"] for b in budgets if m.selects(b["spec"]["selector"], labels)]
        if len(chosen) != 1:
            problems.append(f"{name}: its pods are selected by {len(chosen)} disruption budgets {chosen}")
        owners = [d["metadata"]["name"] for d in deployments if m.selects(d["spec"]["selector"], labels)]
        expected = [workload["metadata"]["name"]] if workload["kind"] == "Deployment" else []
        if owners != expected:
            problems.append(f"{name}: its pods are matched by the selectors of Deployments {owners}")
    return problems


@pytest.mark.parametrize("target", TARGETS_WITH_WORKLOADS)
def test_each_workloads_pods_have_one_budget_and_one_deployment(target):
    assert claims(m.rendered(target)) == []


@pytest.mark.parametrize("target", list(m.SIDE_BY_SIDE))
def test_targets_applied_side_by_side_leave_each_others_objects_alone(target):
    """No object of one is also one of the other's: the second apply would change it."""
    keys = [(o["kind"], o["metadata"]["name"]) for o in m.rendered(target)]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)


def test_the_check_catches_the_old_canary_recipe(tmp_path):
    """A copy of the overlay with a nameSuffix, next to the overlay: both budgets select both tracks."""
    copy = m.compose(tmp_path / "my-canary", [m.K8S / "overlays" / "cpu"], nameSuffix="-canary")
    objects = [*m.rendered("cpu"), *(o for o in m.yaml.safe_load_all(m.kustomize(copy)) if o)]
    problems = claims(objects)
    assert any("2 disruption budgets ['svertka', 'svertka-canary']" in p for p in problems), problems
    assert any("selectors of Deployments ['svertka', 'svertka-canary']" in p for p in problems), problems


def test_the_canary_runs_behind_the_stable_services():
    """Its pods get the stable Services' traffic and the stable NetworkPolicy, and it adds none of its own."""
    objects = m.rendered("cpu+canary")
    stable, canary = (m.find(objects, "Deployment", n) for n in ("svertka", "svertka-canary"))
    for kind in ("Service", "NetworkPolicy"):
        found = m.find_all(objects, kind)
        assert found and not [o for o in found if o["metadata"]["name"].endswith("-canary")], kind
    for service in m.find_all(objects, "Service"):
        for deployment in (stable, canary):
            assert m.selects({"matchLabels": service["spec"]["selector"]}, m.pod_labels(deployment))
    policy = m.find(objects, "NetworkPolicy")
    assert all(m.selects(policy["spec"]["podSelector"], m.pod_labels(d)) for d in (stable, canary))
    # Each autoscaler scales its own track; the canary is the smaller one.
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in m.find_all(objects, "HorizontalPodAutoscaler")}
    assert set(hpas) == {"svertka", "svertka-canary"}
    assert hpas["svertka-canary"]["spec"]["maxReplicas"] <= hpas["svertka"]["spec"]["minReplicas"]
    # Its pods spread among themselves, not among the stable track's.
    spread = m.pod_spec(canary)["topologySpreadConstraints"][0]["labelSelector"]
    assert m.selects(spread, m.pod_labels(canary)) and not m.selects(spread, m.pod_labels(stable))
