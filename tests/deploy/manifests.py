"""Render the kustomizations in deploy/k8s and look things up in the result.

Shared by the deploy tests. Rendering shells out to ``kubectl kustomize`` (the
same command a user runs); compositions that the repository does not ship as
an overlay (an overlay plus a component) are written to a temporary
kustomization with relative paths, as kustomize requires.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"

#: Oldest Kubernetes the base supports (native gRPC probes are GA in 1.27; the
#: preStop sleep action is on by default from 1.30). The image-volume
#: component needs the ImageVolume API (beta in 1.33).
MIN_K8S = "1.30.0"
MIN_K8S_IMAGE_VOLUME = "1.33.0"

#: name -> (resources, components), relative to deploy/k8s. Shipped overlays
#: have one resource and no component; the rest are compositions users make.
TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "base": (("base",), ()),
    "cpu": (("overlays/cpu",), ()),
    "gpu": (("overlays/gpu",), ()),
    "kind": (("overlays/kind",), ()),
    "monitoring": (("overlays/monitoring",), ()),
    "kserve": (("kserve",), ()),
    "cpu+image-volume": (("overlays/cpu",), ("components/image-volume",)),
    "gpu+model-init": (("overlays/gpu",), ("components/model-init",)),
}
#: Targets holding the svertka Deployment.
WORKLOAD_TARGETS = ("base", "cpu", "gpu", "kind", "cpu+image-volume", "gpu+model-init")

CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_v1_podmonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_v1_prometheusrule.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "serving.kserve.io_v1beta1_inferenceservice.json",
}


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        raise RuntimeError(
            "kubectl is not on PATH; the deploy tests render manifests with `kubectl kustomize`"
        )
    return path


def kustomize(directory: Path) -> str:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{proc.stderr}")
    return proc.stdout


@functools.cache
def rendered_text(target: str) -> str:
    resources, components = TARGETS[target]
    if not components and len(resources) == 1:
        return kustomize(K8S / resources[0])
    with tempfile.TemporaryDirectory(prefix="svertka-kustomize-") as tmp:
        rel = [os.path.relpath(K8S / r, tmp) for r in resources]
        comps = [os.path.relpath(K8S / c, tmp) for c in components]
        Path(tmp, "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": rel,
                    "components": comps,
                }
            )
        )
        return kustomize(Path(tmp))


def rendered(target: str) -> list[dict]:
    """The objects of one target, freshly parsed (callers may modify them)."""
    return [doc for doc in yaml.safe_load_all(rendered_text(target)) if doc]


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, (
        f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in matches]}"
    )
    return matches[0]


def find_all(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def server_container(pod_spec: dict) -> dict:
    """The svertka container of a pod spec (Deployment template or KServe predictor)."""
    containers = pod_spec["containers"]
    assert len(containers) == 1, (
        f"expected the server alone in the pod, got {[c['name'] for c in containers]}"
    )
    return containers[0]


def pod_spec(obj: dict) -> dict:
    if obj["kind"] == "Deployment":
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "InferenceService":
        return obj["spec"]["predictor"]
    raise AssertionError(f"no pod spec in a {obj['kind']}")


def workloads(target: str) -> Iterator[dict]:
    objects = rendered(target)
    yield from (o for o in objects if o["kind"] in ("Deployment", "InferenceService"))


def container_env(objects: list[dict], container: dict) -> dict[str, dict]:
    """Environment of a container as name -> {"value": ...} or {"valueFrom": ...}, envFrom ConfigMaps included.

    Later entries win, as in Kubernetes (env overrides envFrom).
    """
    env: dict[str, dict] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        data = find(objects, "ConfigMap", ref)["data"]
        env.update({k: {"value": v} for k, v in data.items()})
    for item in container.get("env", []):
        env[item["name"]] = {k: v for k, v in item.items() if k != "name"}
    return env


def selects(selector: dict, labels: dict) -> bool:
    """matchLabels semantics (the manifests use no matchExpressions)."""
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


_QUANTITY_SUFFIXES = {
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}


def quantity_bytes(quantity: str | int) -> int:
    """A Kubernetes memory quantity ("2304Mi", "12Gi", "1G", "1048576") in bytes."""
    text = str(quantity)
    for suffix in sorted(_QUANTITY_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * _QUANTITY_SUFFIXES[suffix])
    return int(float(text))
