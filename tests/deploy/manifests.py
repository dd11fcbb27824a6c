"""Render the kustomizations in deploy/k8s and look things up in the result.

Shared by the deploy tests. Rendering shells out to ``kubectl kustomize`` (the
same command a user runs); compositions that the repository does not ship as
an overlay (an overlay plus a component) are written to a temporary
kustomization with relative paths, as kustomize requires.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from service import config as cfg
from service import server_cli

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
    "canary": (("overlays/canary",), ()),
    "monitoring": (("overlays/monitoring",), ()),
    "kserve": (("kserve",), ()),
    "models-pvc": (("models-pvc",), ()),
    "cpu+image-volume": (("overlays/cpu",), ("components/image-volume",)),
    "cpu+models-pvc": (("overlays/cpu",), ("components/models-pvc",)),
    "gpu+models-pvc": (("overlays/gpu",), ("components/models-pvc",)),
    "gpu+canary": (("overlays/gpu",), ("components/canary",)),
    "kserve+storage-uri": (("kserve",), ("components/kserve-storage-uri",)),
}
#: What one namespace holds when targets are applied side by side, each with a
#: `kubectl apply -k` of its own (as docs/deploy.md says to apply a canary):
#: name -> the targets. (One kustomization listing both as resources would not
#: do: kustomize then rewrites the stable track's references to the canary's
#: names, both coming from the same base.)
SIDE_BY_SIDE: dict[str, tuple[str, ...]] = {"cpu+canary": ("cpu", "canary")}
#: Targets holding one svertka Deployment.
WORKLOAD_TARGETS = (
    "base",
    "cpu",
    "gpu",
    "kind",
    "canary",
    "cpu+image-volume",
    "cpu+models-pvc",
    "gpu+models-pvc",
    "gpu+canary",
)
#: Targets holding one KServe InferenceService.
KSERVE_TARGETS = ("kserve", "kserve+storage-uri")
#: Targets whose Deployment is a canary: it runs next to a stable track and
#: its Services (svertka.io/track: canary; deploy/k8s/components/canary).
CANARY_TARGETS = ("canary", "gpu+canary")

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


def compose(directory: Path, resources: list[Path], components: list[Path] = (), **fields) -> Path:
    """Write a kustomization in ``directory`` of these resources and components (any
    directories; kustomize wants them relative) and further ``fields``; the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(r, directory) for r in resources],
                "components": [os.path.relpath(c, directory) for c in components],
                **fields,
            }
        )
    )
    return directory


@functools.cache
def rendered_text(target: str) -> str:
    if target in SIDE_BY_SIDE:
        return "---\n".join(rendered_text(part) for part in SIDE_BY_SIDE[target])
    resources, components = TARGETS[target]
    if not components and len(resources) == 1:
        return kustomize(K8S / resources[0])
    with tempfile.TemporaryDirectory(prefix="svertka-kustomize-") as tmp:
        return kustomize(compose(Path(tmp), [K8S / r for r in resources], [K8S / c for c in components]))


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


def pod_labels(obj: dict) -> dict[str, str]:
    """The labels the pods of a Deployment or InferenceService get.

    KServe (RawDeployment) gives the predictor's pods the InferenceService's
    labels, the predictor's own, and its name, component and app labels.
    """
    if obj["kind"] == "Deployment":
        return obj["spec"]["template"]["metadata"]["labels"]
    name = obj["metadata"]["name"]
    return {
        **obj["metadata"].get("labels", {}),
        **obj["spec"]["predictor"].get("labels", {}),
        "serving.kserve.io/inferenceservice": name,
        "component": "predictor",
        "app": f"isvc.{name}-predictor",
    }


def kserve_deployment_name(isvc: dict) -> str:
    """The Deployment KServe makes for an InferenceService's (unnamed) predictor."""
    return isvc["metadata"]["name"] + "-predictor"


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


def server_config(objects: list[dict], container: dict) -> cfg.ServerConfig:
    """The ServerConfig the server builds from this container's environment (its own parser)."""
    env = container_env(objects, container)
    environ = {k: v["value"] for k, v in env.items() if "value" in v}
    parser = argparse.ArgumentParser()
    server_cli.add_serve_arguments(parser)
    return server_cli.server_config(parser.parse_args([]), environ)


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
