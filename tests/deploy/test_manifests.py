"""Every kustomize target renders, and every object validates offline.

Built-in kinds: kubernetes-validate --strict (unknown fields are errors)
against the oldest Kubernetes the manifests claim to support and the newest
schema set installed. Custom resources: the schemas in deploy/k8s/schemas,
whose embedded Kubernetes types resolve to the same strict Kubernetes schemas.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from kubernetes_validate import utils as kv
from referencing import Registry, Resource

from tests.deploy import manifests as m

LATEST = kv.latest_version()
SCHEMAS = m.K8S / "schemas"
K8S_DEFS_URI = "https://kubernetes.io/api/_definitions.json"


def versions_for(target: str) -> list[str]:
    oldest = m.MIN_K8S_IMAGE_VOLUME if "image-volume" in target else m.MIN_K8S
    return sorted({oldest, LATEST}, key=lambda v: tuple(int(x) for x in v.split(".")))


def builtin(obj: dict) -> bool:
    return (obj["apiVersion"], obj["kind"]) not in m.CUSTOM_KINDS


@pytest.mark.parametrize("target", list(m.TARGETS))
def test_target_renders_unique_objects(target):
    objects = m.rendered(target)
    assert objects, f"{target} rendered nothing"
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), f"duplicate objects in {target}: {keys}"
    unknown = [
        k
        for o in objects
        if not builtin(o)
        for k in [(o["apiVersion"], o["kind"])]
        if k not in m.CUSTOM_KINDS
    ]
    assert not unknown


@pytest.mark.parametrize("target", list(m.TARGETS))
def test_builtin_objects_pass_kubernetes_validate_strict(target, tmp_path):
    """The literal command line, on the rendered YAML, for each supported version."""
    objects = m.rendered(target)
    path = tmp_path / f"{target}.yaml"
    path.write_text(m.rendered_text(target))
    exe = Path(sys.executable).with_name("kubernetes-validate")
    cmd = [str(exe), "--strict"]
    for version in versions_for(target):
        cmd += ["-k", version]
    proc = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passed = [line for line in proc.stdout.splitlines() if line.startswith("INFO") and " passed " in line]
    assert len(passed) == sum(builtin(o) for o in objects) * len(versions_for(target)), proc.stdout
    warned = [line for line in proc.stdout.splitlines() if line.startswith("WARN")]
    # A warning means "no schema for this kind": allowed only for the custom kinds checked below.
    custom = sum(not builtin(o) for o in objects) * len(versions_for(target))
    assert len(warned) == custom, proc.stdout


def test_kubernetes_validate_strict_rejects_an_unknown_field():
    """The validator really is strict (else the test above would prove nothing)."""
    deployment = m.find(m.rendered("base"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpcPort"] = 8001
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, m.MIN_K8S, strict=True)


def test_image_volume_needs_the_image_volume_api():
    """The image-volume composition is invalid before 1.33: the version floor above is real."""
    deployment = m.find(m.rendered("cpu+image-volume"), "Deployment")
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, m.MIN_K8S, strict=True)
    kv.validate(deployment, m.MIN_K8S_IMAGE_VOLUME, strict=True)


def k8s_definitions(version: str) -> dict:
    schema_version = [v for v in kv.all_versions() if kv.major_minor(v) <= kv.major_minor(version)][-1]
    return kv.schema_contents(
        f"kubernetes-json-schema/v{schema_version}-local-strict/_definitions.json", version
    )


def custom_validator(schema: dict, version: str) -> jsonschema.Draft202012Validator:
    registry = Registry().with_resource(K8S_DEFS_URI, Resource.from_contents(k8s_definitions(version)))
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_custom(obj: dict, version: str) -> None:
    schema = json.loads((SCHEMAS / m.CUSTOM_KINDS[(obj["apiVersion"], obj["kind"])]).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    custom_validator(schema, version).validate(obj)
    extension = schema.get("x-podspec-extension")
    if extension:
        # KServe inlines a PodSpec next to its own fields: its own fields
        # against the schema's list, everything else as a strict PodSpec.
        part = obj
        for key in extension["pointer"].strip("/").split("/"):
            part = part[key]
        own = {k: v for k, v in part.items() if k in extension["properties"]}
        pod = {k: v for k, v in part.items() if k not in extension["properties"]}
        custom_validator(
            {"type": "object", "additionalProperties": False, "properties": extension["properties"]}, version
        ).validate(own)
        custom_validator({"$ref": f"{K8S_DEFS_URI}#/$defs/io.k8s.api.core.v1.PodSpec"}, version).validate(pod)


@pytest.mark.parametrize("target", [t for t in m.TARGETS if any(not builtin(o) for o in m.rendered(t))])
def test_custom_resources_match_their_schemas(target):
    for obj in m.rendered(target):
        if not builtin(obj):
            for version in versions_for(target):
                validate_custom(obj, version)


@pytest.mark.parametrize(
    "target, kind, mutate",
    [
        ("monitoring", "ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(intervall="15s")),
        ("monitoring", "ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(interval="15 seconds")),
        ("monitoring", "PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][0].update(record="x:y")),
        (
            "kserve",
            "PodMonitor",
            lambda o: o["spec"]["podMetricsEndpoints"][0]["relabelings"][0].update(action="set"),
        ),
        ("kserve", "InferenceService", lambda o: o["spec"]["predictor"].update(minReplica=1)),
        (
            "kserve",
            "InferenceService",
            lambda o: o["spec"]["predictor"]["containers"][0].update(readynessProbe={}),
        ),
        ("kserve", "InferenceService", lambda o: o["spec"]["predictor"].update(scaleMetric="gpu")),
    ],
    ids=[
        "unknown-endpoint-field",
        "bad-duration",
        "alert-and-record",
        "bad-relabel-action",
        "unknown-predictor-field",
        "unknown-container-field",
        "bad-scale-metric",
    ],
)
def test_custom_schemas_reject_mistakes(target, kind, mutate):
    """Each schema catches the typo or wrong value a person would make."""
    obj = m.find(m.rendered(target), kind)
    mutate(obj)
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(obj, LATEST)
