"""Run ``svertka serve`` in a subprocess for tests that need a real, separate server.

Used by tests/api (signals, lifecycle) and tests/triton (tritonclient's
protobuf descriptors clash with ours, so those tests must talk to a server in
another process). Imports nothing from ``service.gen.inference``.

Ports: the server binds port 0 and logs the ports it got; we read them from
its log instead of guessing free ports (no race with other test processes).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"svertka listening: grpc [\w.\[\]:]+:(\d+) metrics [\w.\[\]:]+:(\d+)")


class ServerProcess:
    """One ``python -m service serve`` process on loopback; its log goes to ``log_path``."""

    def __init__(
        self, repository: Path, log_path: Path, *args: str, env: dict[str, str] | None = None
    ) -> None:
        self.repository = Path(repository)
        self.log_path = Path(log_path)
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.grpc_port = 0
        self.metrics_port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout_s: float = 60.0) -> ServerProcess:
        """Start the process and wait until it listens (not until models load)."""
        command = [
            sys.executable,
            "-m",
            "service",
            "serve",
            "--model-repository",
            str(self.repository),
            "--host",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            *self.args,
        ]
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=log_file, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log())
            if match:
                self.grpc_port, self.metrics_port = int(match.group(1)), int(match.group(2))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"server did not start listening within {timeout_s} s:\n{self.log()}")

    def health(self, service: str = "", *, channel: grpc.Channel | None = None) -> int:
        own = channel is None
        channel = channel or grpc.insecure_channel(self.address)
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        finally:
            if own:
                channel.close()

    def wait_serving(self, timeout_s: float = 120.0) -> ServerProcess:
        """Poll health "" until SERVING (models loaded and warmed up)."""
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    if self.health(channel=channel) == health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"server not SERVING within {timeout_s} s:\n{self.log()}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float = 60.0) -> int:
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode
