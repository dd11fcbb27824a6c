"""The images' serving install, performed for real in a fresh venv, serves a model.

docker cannot run on the project's machines, so this runs what the
Dockerfile's build stage runs: its COPY lines decide which sources are
copied, deploy/docker/install-serving.sh installs them with the image's lock
file, and the result must (1) hold no torch, (2) start `svertka serve`
configured only by the base ConfigMap's SVERTKA_* settings (as the container
is), (3) report SERVING on grpc.health.v1, classify an image, (4) export the
metric the HorizontalPodAutoscaler scales on, and (5) drain and exit 0 on
SIGTERM.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bench.target import ServerProcess
from service.client import Client
from tests.deploy import dockerfile
from tests.deploy import manifests as m
from tests.helpers.tinymodel import make_repository

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DEFAULT_MODELS = m.ROOT / "models"


def copy_build_context(dest: Path) -> Path:
    """Copy what the Dockerfile's build stage COPYs into /src (the .dockerignore'd caches excluded)."""
    build = dockerfile.stages(m.DOCKER / "Dockerfile")[0]
    src = dest / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for args in build.all("COPY"):
        *sources, target = args.split()
        if target.startswith("/tmp/"):
            continue  # the install script and lock file, used from the repository below
        for source in sources:
            path = m.ROOT / source
            if path.is_dir():
                shutil.copytree(
                    path, src / Path(target).name if target != "./" else src / path.name, ignore=ignore
                )
            else:
                shutil.copy2(path, src / path.name)
    return src


def served_repository(tmp: Path) -> Path:
    """The default model (from `make model`) when it is built, else a tiny real ONNX classifier."""
    if list(DEFAULT_MODELS.glob("*/*/model.onnx")):
        return DEFAULT_MODELS
    return make_repository(tmp / "models", {"tiny": [1]})


def base_settings() -> dict[str, str]:
    objects = m.rendered("base")
    container = m.server_container(m.pod_spec(m.find(objects, "Deployment")))
    env = m.container_env(objects, container)
    return {k: v["value"] for k, v in env.items() if k.startswith("SVERTKA_") and "value" in v}


def test_serving_install_has_no_torch_and_serves(tmp_path):
    src = copy_build_context(tmp_path)
    venv = tmp_path / "venv"
    install = subprocess.run(
        [
            "sh",
            str(m.DOCKER / "install-serving.sh"),
            str(venv),
            str(m.DOCKER / "requirements-cpu.txt"),
            str(src),
            "cpu",
        ],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0, "torch is importable in the serving environment"

    repository = served_repository(tmp_path)
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        **base_settings(),
        # Loopback and free ports (0: the log says which) instead of the pod's 0.0.0.0:8001/8002;
        # the model from the repository.
        "SVERTKA_HOST": "127.0.0.1",
        "SVERTKA_GRPC_PORT": "0",
        "SVERTKA_METRICS_PORT": "0",
        "SVERTKA_MODEL_REPOSITORY": str(repository),
    }
    # No flags: configured by the environment alone, as the container is.
    server = ServerProcess(
        None, tmp_path / "serve.log", env=env, inherit_env=False, command=[str(venv / "bin" / "svertka")]
    )
    try:
        server.start(timeout_s=120).wait_serving(timeout_s=120)
        address = server.address

        buf = io.BytesIO()
        Image.new("RGB", (48, 40), (200, 30, 90)).save(buf, format="PNG")
        with Client(address) as client:
            # The default repository holds several models (digits, digits-int8): name one.
            model = sorted(p.parent.parent.name for p in repository.glob("*/*/model.onnx"))[0]
            result = client.classify(buf.getvalue(), model=model, top_k=3)
        assert len(result.predictions) == 3 and result.model_version >= 1

        families = {f.name: f for f in text_string_to_metric_families(server.scrape())}
        hpa = m.find(m.rendered("base"), "HorizontalPodAutoscaler")
        adapter = yaml.safe_load((m.K8S / "prometheus-adapter" / "config.yaml").read_text())["rules"]
        for name in [x["pods"]["metric"]["name"] for x in hpa["spec"]["metrics"] if x["type"] == "Pods"]:
            (rule,) = [r for r in adapter if r["name"]["as"] == name]
            series = rule["seriesQuery"].split("{")[0]
            assert series in families, f"the HPA's {name} needs {series}, absent from the live scrape"
            assert result.model_name in {s.labels["model"] for s in families[series].samples}
        requests = families["svertka_requests"].samples
        assert (
            sum(s.value for s in requests if s.name == "svertka_requests_total" and s.labels["code"] == "OK")
            == 1
        )

        server.signal(signal.SIGTERM)
        assert server.wait(timeout_s=float(base_settings()["SVERTKA_GRACE_PERIOD_S"]) + 30) == 0
    finally:
        server.kill()
        if server.proc is not None and server.proc.returncode != 0:
            print(server.log()[-4000:])
