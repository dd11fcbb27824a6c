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
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import free_port
from service.client import Client
from tests.deploy import dockerfile
from tests.deploy import manifests as m
from tests.helpers.tinymodel import make_repository

pytestmark = pytest.mark.slow

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


def wait_serving(address: str, proc: subprocess.Popen, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"svertka serve exited with {proc.returncode}"
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"not SERVING within {deadline_s} s")


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
    grpc_port, metrics_port = free_port(), free_port()
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        **base_settings(),
        # Loopback and free ports instead of the pod's 0.0.0.0:8001/8002; the model from the repository.
        "SVERTKA_HOST": "127.0.0.1",
        "SVERTKA_GRPC_PORT": str(grpc_port),
        "SVERTKA_METRICS_PORT": str(metrics_port),
        "SVERTKA_MODEL_REPOSITORY": str(repository),
    }
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(venv / "bin" / "svertka"), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        address = f"127.0.0.1:{grpc_port}"
        wait_serving(address, proc, deadline_s=120)

        buf = io.BytesIO()
        Image.new("RGB", (48, 40), (200, 30, 90)).save(buf, format="PNG")
        with Client(address) as client:
            # The default repository holds several models (digits, digits-int8): name one.
            model = sorted(p.parent.parent.name for p in repository.glob("*/*/model.onnx"))[0]
            result = client.classify(buf.getvalue(), model=model, top_k=3)
        assert len(result.predictions) == 3 and result.model_version >= 1

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
            families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
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

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=float(base_settings()["SVERTKA_GRACE_PERIOD_S"]) + 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        if proc.returncode not in (0, None):
            print((tmp_path / "serve.log").read_text()[-4000:])
