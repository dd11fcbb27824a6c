"""Where each workload's models come from: applied as shipped, every overlay serves some.

A server whose repository is empty stays NOT_SERVING, so every replica fails
its startup probe: a model source nobody fills is a deployment that never
becomes ready (the base once mounted an empty claim that docs/deploy.md
never said how to fill). Checked by rendering:

- every shipped workload copies (or mounts) the repository of the image
  deploy/docker/Dockerfile.models builds into the very directory the server
  reads, its --model-repository as the server's own config code parses the
  manifests' settings;
- a claim is served only where it is the one deploy/k8s/models-pvc's Job
  fills, from the same image with the same copy;
- the overlay docs/deploy.md applies first pulls the images its walk-through
  builds and loads, and the walk-through then waits for, forwards to and
  calls that overlay's own Deployment, Service and port.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from tests.deploy import dockerfile
from tests.deploy import manifests as m

DOCS = m.ROOT / "docs" / "deploy.md"
MODELS_DOCKERFILE = "Dockerfile.models"
#: Model sources that hold the models image's repository with no step besides pulling it.
FROM_THE_IMAGE = ("copy", "image-volume")
#: Compositions that serve a claim instead (KServe's through its STORAGE_URI).
CLAIM_TARGETS = [
    t
    for t, (_, components) in m.TARGETS.items()
    if {"components/models-pvc", "components/kserve-storage-uri"} & set(components)
]
SHIPPED = [t for t, (_, components) in m.TARGETS.items() if not components and list(m.workloads(t))]


@dataclasses.dataclass(frozen=True)
class Source:
    """What fills the server's model repository directory."""

    kind: str  # one of FROM_THE_IMAGE, "claim", "storage-uri"
    image: str | None = None
    claim: str | None = None


def image_repository() -> tuple[str, str]:
    """(where Dockerfile.models puts the repository in the image, the build-context directory it
    copies by default)."""
    (stage,) = dockerfile.stages(m.DOCKER / MODELS_DOCKERFILE)
    default = next(a for a in stage.all("ARG") if a.startswith("MODEL_DIR="))
    (copy,) = stage.all("COPY")
    source, destination = copy.split()[-2:]
    assert source == "${MODEL_DIR}/", copy
    return destination.rstrip("/"), default.split("=", 1)[1]


def image_name(reference: str) -> str:
    """svertka-models of REGISTRY/svertka-models:TAG."""
    return reference.rsplit("/", 1)[-1].split("@")[0].split(":")[0]


def docs() -> str:
    return DOCS.read_text()


def built_tags(name: str) -> list[str]:
    """The tags docs/deploy.md builds from deploy/docker/<name>, in order."""
    return re.findall(
        rf"docker build -f deploy/docker/{re.escape(name)} (?:--build-arg \S+ )*-t (\S+) \.", docs()
    )


def models_image_names() -> set[str]:
    names = {image_name(tag) for tag in built_tags(MODELS_DOCKERFILE)}
    assert names, "docs/deploy.md builds no image from Dockerfile.models"
    return names


def documented_applies() -> list[str]:
    """The directories under deploy/k8s that docs/deploy.md `kubectl apply -k`s, in order."""
    return [p.rstrip("/") for p in re.findall(r"kubectl apply -k deploy/k8s/(\S+)", docs())]


def target_of(path: str) -> str:
    shipped = {resources[0]: t for t, (resources, components) in m.TARGETS.items() if not components}
    assert path in shipped, f"docs/deploy.md applies deploy/k8s/{path}, which no test renders"
    return shipped[path]


def copy_problems(command: list[str], destination: str) -> list[str]:
    """Unless ``command`` copies the models image's whole repository into ``destination``."""
    in_image, _ = image_repository()
    expected = ["cp", "-R", f"{in_image}/.", destination.rstrip("/") + "/"]
    if [command[0], command[1], command[2].rstrip("/"), command[3].rstrip("/") + "/"] != expected:
        return [f"{command} does not copy the models image's {in_image} into {destination} ({expected})"]
    return []


def model_source(objects: list[dict], workload: dict) -> Source:
    """Where the server's repository gets its content; AssertionError if from nowhere."""
    spec = m.pod_spec(workload)
    server = m.server_container(spec)
    name = f"{workload['kind']} {workload['metadata']['name']}"
    env = m.container_env(objects, server)
    repository = str(m.server_config(objects, server).model_repository).rstrip("/")
    if "STORAGE_URI" in env:
        uri = env["STORAGE_URI"]["value"]
        claim = uri.removeprefix("pvc://").split("/")[0] if uri.startswith("pvc://") else None
        return Source("storage-uri", claim=claim)
    mounts = [v for v in server.get("volumeMounts", []) if v["mountPath"].rstrip("/") == repository]
    assert len(mounts) == 1, f"{name}: nothing is mounted at the server's model repository {repository}"
    (mount,) = mounts
    volume = {v["name"]: v for v in spec.get("volumes", [])}[mount["name"]]
    in_image, _ = image_repository()
    if "emptyDir" in volume:
        assert not mount.get("subPath"), f"{name}: the server reads only {mount['subPath']} of the copy"
        writers = [
            (init, v)
            for init in spec.get("initContainers", [])
            for v in init.get("volumeMounts", [])
            if v["name"] == mount["name"]
        ]
        assert len(writers) == 1, f"{name}: {len(writers)} init containers write the emptyDir at {repository}"
        ((init, init_mount),) = writers
        assert not init_mount.get("readOnly"), f"{name}: {init['name']} mounts it read-only"
        problems = copy_problems(init["command"], init_mount["mountPath"])
        assert not problems, f"{name}: {problems[0]}"
        return Source("copy", image=init["image"])
    if "image" in volume:
        assert mount.get("subPath", "").strip("/") == in_image.strip("/"), (
            f"{name}: the server reads {mount.get('subPath', '/')} of the image, whose repository is {in_image}"
        )
        return Source("image-volume", image=volume["image"]["reference"])
    if "persistentVolumeClaim" in volume:
        assert mount.get("readOnly") and volume["persistentVolumeClaim"].get("readOnly"), (
            f"{name}: every replica mounts the repository read-only"
        )
        return Source("claim", claim=volume["persistentVolumeClaim"]["claimName"])
    raise AssertionError(f"{name}: the model repository {repository} is a {volume} volume")


def image_source_problems(objects: list[dict], workload: dict) -> list[str]:
    """Unless the workload serves the models image's repository as applied."""
    try:
        source = model_source(objects, workload)
    except AssertionError as exc:
        return [str(exc)]
    if source.kind not in FROM_THE_IMAGE:
        return [f"{workload['metadata']['name']} serves {source}: empty until someone fills it"]
    if image_name(source.image) not in models_image_names():
        return [f"{source.image} is not an image docs/deploy.md builds from {MODELS_DOCKERFILE}"]
    return []


@pytest.mark.parametrize("target", SHIPPED)
def test_shipped_workloads_serve_the_models_image(target):
    """Applied as shipped, nothing but pulling images stands between a pod and its models."""
    objects = m.rendered(target)
    for workload in m.workloads(target):
        assert image_source_problems(objects, workload) == []


def test_the_bundled_models_are_what_the_models_image_holds():
    """Dockerfile.models copies by default the directory `make model` fills."""
    _, default = image_repository()
    makefile = (m.ROOT / "Makefile").read_text()
    assert re.search(r"^MODELS \?= (\S+)$", makefile, re.M).group(1) == default
    assert re.search(r"^model:.*\n\t.*build-default --repository \$\(MODELS\)", makefile, re.M)


@pytest.mark.parametrize(
    "mutate",
    [
        # Today's mistake: the claim of the base, which nothing fills.
        lambda spec, server: spec.update(
            initContainers=[],
            volumes=[
                {"name": "models", "persistentVolumeClaim": {"claimName": "svertka-models", "readOnly": True}}
                if v["name"] == "models"
                else v
                for v in spec["volumes"]
            ],
        ),
        lambda spec, server: spec["initContainers"][0]["volumeMounts"][0].update(mountPath="/mnt/other"),
        lambda spec, server: spec["initContainers"][0].update(
            command=["cp", "-R", "/model/.", "/mnt/models/"]
        ),
        lambda spec, server: spec["initContainers"][0].update(image="busybox:1.37"),
        lambda spec, server: server["volumeMounts"][0].update(mountPath="/srv/models"),
        lambda spec, server: server["volumeMounts"][0].update(subPath="digits"),
        lambda spec, server: spec["initContainers"][0]["volumeMounts"][0].update(name="tmp"),
    ],
    ids=[
        "unfilled-claim",
        "copy-elsewhere",
        "wrong-source",
        "not-the-models-image",
        "server-reads-elsewhere",
        "server-reads-a-subdirectory",
        "copy-into-another-volume",
    ],
)
def test_the_check_catches_a_repository_nothing_fills(mutate):
    objects = m.rendered("cpu")
    deployment = m.find(objects, "Deployment")
    spec = m.pod_spec(deployment)
    assert image_source_problems(objects, deployment) == []
    server = m.server_container(spec)
    assert (
        server["volumeMounts"][0]["name"] == "models" and spec["initContainers"][0]["name"] == "fetch-models"
    )
    mutate(spec, server)
    assert image_source_problems(objects, deployment)


def test_the_image_volume_follows_the_models_image_tag(tmp_path):
    """A new tag set beside the component reaches the volume (docs/deploy.md, section 6), not only
    the containers, which are all kustomize's `images:` rewrites by itself."""
    new = {"name": "svertka-models", "newName": "registry.example/svertka-models", "newTag": "2"}
    directory = m.compose(
        tmp_path, [m.K8S / "overlays" / "cpu"], [m.K8S / "components" / "image-volume"], images=[new]
    )
    objects = [o for o in m.yaml.safe_load_all(m.kustomize(directory)) if o]
    source = model_source(objects, m.find(objects, "Deployment"))
    assert source == Source("image-volume", image="registry.example/svertka-models:2")


# -- a repository on a claim ---------------------------------------------------


def test_the_fill_job_copies_the_models_image_into_the_claim():
    """The same image and copy as the init container, into a claim it can write."""
    objects = m.rendered("models-pvc")
    claim = m.find(objects, "PersistentVolumeClaim")
    job = m.find(objects, "Job")
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] >= 1
    (fill,) = spec["containers"]
    (mount,) = fill["volumeMounts"]
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert not mount.get("readOnly") and not volume["persistentVolumeClaim"].get("readOnly")
    assert copy_problems(fill["command"], mount["mountPath"]) == []
    assert image_name(fill["image"]) in models_image_names()
    # A mode the writer can attach with, and every replica after it.
    assert set(claim["spec"]["accessModes"]) & {"ReadWriteMany", "ReadWriteOnce"}
    init = m.pod_spec(m.find(m.rendered("cpu"), "Deployment"))["initContainers"][0]
    assert (fill["image"], fill["command"][:3]) == (init["image"], init["command"][:3])


@pytest.mark.parametrize("target", CLAIM_TARGETS)
def test_a_served_claim_is_the_one_the_fill_job_fills(target):
    """And it is not part of the server's kustomization: deleting the server keeps the models."""
    objects = m.rendered(target)
    claim = m.find(m.rendered("models-pvc"), "PersistentVolumeClaim")["metadata"]["name"]
    for workload in m.workloads(target):
        source = model_source(objects, workload)
        assert source.kind in ("claim", "storage-uri") and source.claim == claim, source
    assert not m.find_all(objects, "PersistentVolumeClaim")
    assert not [c for w in m.workloads(target) for c in m.pod_spec(w).get("initContainers", [])]


# -- the walk-through ------------------------------------------------------------


def walkthrough() -> str:
    """Section 2 of docs/deploy.md."""
    match = re.search(r"^## 2\. .*?(?=^## 3\. )", docs(), re.M | re.S)
    assert match, "docs/deploy.md has no section 2"
    return match.group(0)


def test_every_kustomization_the_docs_apply_is_rendered_by_the_tests():
    assert documented_applies()
    for path in documented_applies():
        target_of(path)


def test_the_first_overlay_the_docs_apply_serves_the_images_the_walkthrough_builds():
    first = target_of(documented_applies()[0])
    assert documented_applies()[0] in walkthrough(), "the walk-through is where a newcomer starts"
    objects = m.rendered(first)
    (deployment,) = m.workloads(first)
    assert image_source_problems(objects, deployment) == []
    source = model_source(objects, deployment)
    # An init container, which every cluster runs (image volumes need Kubernetes 1.33+).
    assert source.kind == "copy"
    server_image = m.server_container(m.pod_spec(deployment))["image"]
    assert source.image in built_tags(MODELS_DOCKERFILE) and server_image in built_tags("Dockerfile")
    loaded = re.search(r"kind load docker-image ((?:\S+:\S+ )+)--name", walkthrough()).group(1).split()
    assert {source.image, server_image} <= set(loaded)


def test_the_walkthrough_waits_for_forwards_to_and_calls_the_first_overlays_server():
    """apply -> rollout status -> port-forward -> svertka classify, on the objects the overlay makes."""
    text = walkthrough()
    first = documented_applies()[0]
    objects = m.rendered(target_of(first))
    deployment = m.find(objects, "Deployment")
    server = m.server_container(m.pod_spec(deployment))
    grpc_port = next(p["containerPort"] for p in server["ports"] if p["name"] == "grpc")
    steps = [
        rf"kubectl apply -k deploy/k8s/{re.escape(first)} -n (\S+)",
        r"kubectl rollout status deployment/(\S+) -n (\S+)",
        r"kubectl port-forward -n (\S+) svc/(\S+) (\d+):(\d+)",
        r"\.venv/bin/svertka classify --server localhost:(\d+) --model (\S+)",
    ]
    found, position = [], 0
    for step in steps:
        match = re.compile(step).search(text, position)
        assert match, f"after {found[-1][0] if found else 'the start'}, section 2 lacks {step}"
        found.append((match.group(0), match.groups()))
        position = match.end()
    (namespace,), (rolled, ns2), (ns3, service_name, local, remote), (called, _) = (g for _, g in found)
    assert namespace == ns2 == ns3
    assert rolled == deployment["metadata"]["name"]
    service = m.find(objects, "Service", service_name)
    assert m.selects({"matchLabels": service["spec"]["selector"]}, m.pod_labels(deployment))
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == int(remote)]
    assert port["targetPort"] in ("grpc", grpc_port)
    assert called == local
