"""The kustomizations docs/deploy.md tells readers to write render, validate and do what it says.

Each ```yaml block whose first line is ``# <directory>/<file>`` is one file of
such a kustomization, written where the page implies (a directory next to
``deploy/``, so its ``../deploy/k8s/...`` paths resolve) and rendered with
``kubectl kustomize``, as a reader would apply it.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from kubernetes_validate import utils as kv

from tests.deploy import manifests as m
from tests.deploy.test_consistency import ephemeral_storage_problems
from tests.deploy.test_manifests import LATEST, builtin, validate_custom
from tests.deploy.test_models import DOCS, image_source_problems, model_source

BLOCK = re.compile(r"^( *)```yaml\n(.*?)^\1```", re.M | re.S)
HEADER = re.compile(r"# ([\w.-]+)/([\w.-]+\.yaml)\n")


def snippets() -> dict[str, dict[str, str]]:
    """directory -> file name -> text, for every headed yaml block of docs/deploy.md."""
    found: dict[str, dict[str, str]] = {}
    for _, body in BLOCK.findall(DOCS.read_text()):
        text = textwrap.dedent(body)
        header = HEADER.match(text)
        if header:
            directory, name = header.groups()
            assert name not in found.get(directory, {}), f"docs/deploy.md shows {directory}/{name} twice"
            found.setdefault(directory, {})[name] = text
    return found


KUSTOMIZATIONS = sorted(d for d, files in snippets().items() if "kustomization.yaml" in files)


def render(directory: str, tmp_path: Path) -> list[dict]:
    (tmp_path / "deploy").symlink_to(m.ROOT / "deploy")
    for name, text in snippets()[directory].items():
        (tmp_path / directory).mkdir(exist_ok=True)
        (tmp_path / directory / name).write_text(text)
    return [o for o in m.yaml.safe_load_all(m.kustomize(tmp_path / directory)) if o]


def test_the_page_shows_kustomizations():
    assert {"my-cpu", "my-gpu", "my-kserve", "my-models-pvc"} <= set(KUSTOMIZATIONS)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_each_renders_valid_objects_whose_servers_have_models(directory, tmp_path):
    objects = render(directory, tmp_path)
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert objects and len(keys) == len(set(keys)), keys
    for obj in objects:
        for version in (m.MIN_K8S, LATEST):
            if builtin(obj):
                kv.validate(obj, version, strict=True)
            else:
                validate_custom(obj, version)
    for workload in (o for o in objects if o["kind"] in ("Deployment", "InferenceService")):
        assert ephemeral_storage_problems(m.pod_spec(workload)) == []
        source = model_source(objects, workload)
        if source.kind in ("claim", "storage-uri"):
            filled = m.find(m.rendered("models-pvc"), "PersistentVolumeClaim")
            assert source.claim == filled["metadata"]["name"], source
        else:
            assert image_source_problems(objects, workload) == []


def test_the_tensorrt_cache_recipe_keeps_the_engines_on_a_claim(tmp_path):
    """The GPU overlay's engine cache directory, on a claim the kustomization makes, nothing else moved."""
    objects = render("my-gpu", tmp_path)
    spec = m.pod_spec(m.find(objects, "Deployment"))
    server = m.server_container(spec)
    cache = str(m.server_config(objects, server).trt_cache_dir)
    (mount,) = [v for v in server["volumeMounts"] if cache.startswith(v["mountPath"])]
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    assert set(volume) == {"name", "persistentVolumeClaim"}, volume
    claim = m.find(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert not mount.get("readOnly") and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    default = m.pod_spec(m.find(m.rendered("gpu"), "Deployment"))
    assert [v for v in spec["volumes"] if v["name"] != mount["name"]] == [
        v for v in default["volumes"] if v["name"] != mount["name"]
    ]


def test_the_one_node_claim_recipe_keeps_the_fill_job(tmp_path):
    objects = render("my-models-pvc", tmp_path)
    assert m.find(objects, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert m.find(objects, "Job") == m.find(m.rendered("models-pvc"), "Job")
