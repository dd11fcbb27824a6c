"""Real processes for the live observability tests: ``svertka serve`` (bench.target's
``ServerProcess``) and a Prometheus server.

Both run as subprocesses on loopback ports, with their output captured to
files that a failing test prints. Readiness is polled with a deadline (gRPC
health SERVING, Prometheus ``/-/ready``), never slept on.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.procs import free_port
from bench.target import ServerProcess


def wait_until(
    predicate: Callable[[], object], timeout_s: float, what: str, proc=None, log: Path | None = None
):
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}\n{_tail(log)}")
        try:
            got = predicate()
        except Exception:
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s:.0f} s\n{_tail(log)}")
        time.sleep(0.05)


def _tail(log: Path | None, n: int = 4000) -> str:
    if log is None or not log.exists():
        return ""
    return log.read_text(errors="replace")[-n:]


def http_get(url: str, timeout_s: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return resp.read().decode()


@contextlib.contextmanager
def svertka_server(
    repository: Path, workdir: Path, *extra: str, timeout_s: float = 90.0
) -> Iterator[ServerProcess]:
    """``svertka serve`` on loopback; yields once gRPC health says SERVING and /metrics answers."""
    server = ServerProcess(repository, workdir / "svertka.log", *extra, env={"PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + timeout_s
        server.start(timeout_s).wait_serving(max(0.0, deadline - time.monotonic()))
        wait_until(server.scrape, 10, "svertka /metrics", server.proc, server.log_path)
        yield server
    finally:
        server.stop()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen
    log: Path

    def api(self, path: str, **params: str) -> dict:
        query = urllib.parse.urlencode(params)
        body = json.loads(http_get(f"{self.url}/api/v1/{path}?{query}"))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def scalar(self, expr: str) -> float | None:
        """The single value of ``expr`` (None when empty)."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])


@contextlib.contextmanager
def prometheus_server(workdir: Path, targets: list[str], rule_files: list[Path]) -> Iterator[Prometheus]:
    """A real Prometheus scraping ``targets`` every second, with its own config and storage."""
    port = free_port()
    rules_dir = workdir / "rules"
    rules_dir.mkdir()
    names = []
    for path in rule_files:
        # Same rules, evaluated every second instead of every 30 s so the test need not wait.
        text = path.read_text().replace("interval: 30s", "interval: 1s")
        (rules_dir / path.name).write_text(text)
        names.append(f"rules/{path.name}")
    config = workdir / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
                "rule_files": names,
                "scrape_configs": [{"job_name": "svertka", "static_configs": [{"targets": targets}]}],
            }
        )
    )
    log = workdir / "prometheus.log"
    cmd = [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
        "--log.level=warn",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_until(lambda: "Ready" in http_get(f"{prom.url}/-/ready", 2), 60, "prometheus ready", proc, log)
        yield prom
    finally:
        _stop(proc)
