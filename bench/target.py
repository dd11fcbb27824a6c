"""``svertka serve`` as a subprocess: ``ServerProcess``, for the benchmark and the tests.

``ServerProcess`` is the one way to start a svertka server process and wait
for it (the tests import it from here; nothing here imports the tests).
``serve`` runs one for the benchmark, one model per server.

Ports: by default the server binds port 0 and its log says which ports it got
(no race with other processes for a port guessed free); with
``--log-level warning`` that line is not logged, so ports are given instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.procs import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
#: What runs ``svertka`` by default: this checkout's, with this interpreter.
PYTHON_M_SERVICE = (sys.executable, "-m", "service")
_LISTENING = re.compile(r"svertka listening: grpc [\w.\[\]:]+:(\d+) metrics [\w.\[\]:]+:(\d+)")


class ServerProcess:
    """One ``svertka serve`` process; its output goes to ``log_path``.

    ``repository``: served on loopback (``--model-repository``, ``--host 127.0.0.1``,
    ``--grpc-port``, ``--metrics-port``, then ``args``); None: only ``args`` are
    given and ``env`` configures the rest (``SVERTKA_*``, as in a container).
    ``grpc_port``/``metrics_port``: 0 picks free ones, read from the log.
    ``command`` runs ``svertka`` (default ``python -m service``; e.g. another
    virtualenv's ``bin/svertka``). ``env`` is added to this process's
    environment, or is the whole environment with ``inherit_env=False``.

    The process runs in its own session: ``stop`` and ``kill`` reach whatever it
    started too.
    """

    def __init__(
        self,
        repository: Path | None,
        log_path: Path,
        *args: str,
        env: dict[str, str] | None = None,
        inherit_env: bool = True,
        command: Sequence[str] | None = None,
        grpc_port: int = 0,
        metrics_port: int = 0,
    ) -> None:
        self.repository = Path(repository) if repository is not None else None
        self.log_path = Path(log_path)
        self.args = list(args)
        self.env = {**os.environ, **(env or {})} if inherit_env else dict(env or {})
        self.command = list(command or PYTHON_M_SERVICE)
        self.proc: subprocess.Popen | None = None
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def scrape(self, timeout_s: float = 10.0) -> str:
        """The /metrics page."""
        with urllib.request.urlopen(self.metrics_url, timeout=timeout_s) as reply:
            return reply.read().decode()

    def start(self, timeout_s: float = 60.0) -> ServerProcess:
        """Start the process and wait until it listens (not until models load)."""
        command = [*self.command, "serve"]
        if self.repository is not None:
            command += ["--model-repository", str(self.repository), "--host", "127.0.0.1"]
            command += ["--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port)]
        command += self.args
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        ports_given = bool(self.grpc_port and self.metrics_port)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log())
            if match:
                self.grpc_port, self.metrics_port = int(match.group(1)), int(match.group(2))
                return self
            if ports_given and self._answers():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"server did not start listening within {timeout_s} s:\n{self.log()}")

    def _answers(self) -> bool:
        try:
            self.health()
        except grpc.RpcError:
            return False
        return True

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
        """SIGKILL the process and whatever it started."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (a graceful drain) and wait; SIGKILL if it does not exit in time. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()  # anything it started, even once it exited
        return self.proc.returncode


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


@contextlib.contextmanager
def serve(repository: Path, *, log_path: Path, extra_env: dict[str, str] | None = None,
          timeout_s: float = 180.0, launcher: list[str] | None = None,
          args: tuple[str, ...] = ()) -> Iterator[Server]:  # fmt: skip
    """``svertka serve`` on loopback ports until the block exits (SIGTERM: graceful drain).

    ``launcher`` replaces ``python -m service`` (``bench/research/experiments.py`` uses it
    to run the same server with one policy changed); ``args`` are more serve flags.
    """
    process = ServerProcess(
        repository, log_path, "--log-level", "warning", "--grace-period-s", "5", *args,
        env=extra_env, command=launcher, grpc_port=free_port(), metrics_port=free_port(),
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    try:
        process.start(timeout_s).wait_serving(max(0.0, deadline - time.monotonic()))
        yield Server(process.address, process.metrics_url, process.proc.pid)
    finally:
        process.stop()
