"""Launching ``svertka serve`` under test, one model per server, as a subprocess."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.procs import free_port, running

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Server:
    grpc_url: str
    metrics_url: str
    pid: int

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            return r.read().decode()


def single_model_repository(model_path: Path, name: str, root: Path) -> Path:
    """A repository holding only ``name`` (version 1, hard link or copy of ``model_path``).

    Each server under test serves one model, so the whole thread budget goes
    to it, as the ceiling measurement assumes.
    """
    repo = root / name
    target = repo / name / "1" / "model.onnx"
    if not target.is_file() or target.stat().st_size != model_path.stat().st_size:
        shutil.rmtree(repo, ignore_errors=True)
        target.parent.mkdir(parents=True)
        try:
            os.link(model_path, target)
        except OSError:
            shutil.copy2(model_path, target)
    return repo


def _serving(url: str) -> bool:
    with grpc.insecure_channel(url) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=2
        )
    return response.status == health_pb2.HealthCheckResponse.SERVING


@contextlib.contextmanager
def serve(repository: Path, *, log_path: Path, extra_env: dict[str, str] | None = None,
          timeout_s: float = 180.0, launcher: list[str] | None = None,
          args: tuple[str, ...] = ()) -> Iterator[Server]:  # fmt: skip
    """``svertka serve`` on loopback ports until the block exits (SIGTERM: graceful drain).

    ``launcher`` replaces ``python -m service`` (``bench/experiments.py`` uses it
    to run the same server with one policy changed); ``args`` are more serve flags.
    """
    grpc_port, metrics_port = free_port(), free_port()
    cmd = [
        *(launcher or [sys.executable, "-m", "service"]), "serve", "--model-repository", str(repository),
        "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
        "--log-level", "warning", "--grace-period-s", "5", *args,
    ]  # fmt: skip
    env = {**os.environ, **(extra_env or {})}
    url = f"127.0.0.1:{grpc_port}"
    with running(
        cmd, log_path=log_path, ready=lambda: _serving(url), timeout_s=timeout_s, env=env, cwd=REPO_ROOT
    ) as p:
        yield Server(url, f"http://127.0.0.1:{metrics_port}/metrics", p.pid)
