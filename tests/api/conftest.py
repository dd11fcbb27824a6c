"""An in-process svertka server on a loopback port, in its own event-loop thread.

Tests talk to it with ordinary synchronous gRPC stubs over a real channel,
exactly like an external client; the server, the manager and the metrics are
the real ones, put together by ``service.server.assemble`` as ``svertka
serve`` does. A fresh Metrics registry per server keeps servers independent.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from service import config as cfg
from tests.helpers.tinymodel import make_repository


class InProcessServer:
    """assemble(config) running on a private loop; ``call`` runs a coroutine there."""

    def __init__(
        self,
        repository: Path,
        *,
        load: bool = True,
        engine_process: bool = False,
        slab_bytes: int = 16 << 20,
        **config_kwargs,
    ) -> None:
        from service.server import assemble

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self._thread.start()
        self.config = cfg.ServerConfig(
            model_repository=repository, host="127.0.0.1", grpc_port=0, metrics_port=0, **config_kwargs
        )
        #: With ``engine_process``: the engine runs in a process of its own, as with
        #: ``svertka serve --frontends N``, and this server is one frontend of it, whose shared
        #: memory slab holds ``slab_bytes``.
        self.slab_bytes = slab_bytes
        self.engine_process = EngineProcess(self.config) if engine_process else None

        async def build():
            if self.engine_process is None:
                server = assemble(self.config)
            else:
                server = self._frontend("0")
            await server.start()
            return server

        #: Frontends besides ``server`` (``another_frontend``), shut down with it.
        self.others: list = []
        self.server = self.call(build())
        self.metrics, self.engine, self.port = self.server.metrics, self.server.engine, self.server.port
        if load:
            self.call(self.server.load_models())

    def _frontend(self, index: str):
        from service.server import assemble

        metrics, client = self.engine_process.client(index, self.slab_bytes)
        return assemble(self.config, metrics=metrics, engine=client, shared_memory=client.shared_memory)

    def another_frontend(self) -> str:
        """Start one more frontend of the same engine process on a port of its own (as
        ``svertka serve --frontends N`` runs N on one port); its address."""
        assert self.engine_process is not None, "another_frontend needs engine_process=True"

        async def build():
            server = self._frontend(str(len(self.others) + 1))
            await server.start()
            await server.load_models()
            return server

        self.others.append(self.call(build()))
        return f"127.0.0.1:{self.others[-1].port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro, timeout_s: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def channel(self, **options) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=list(options.items()))

    def close(self, grace_s: float = 5.0) -> None:
        try:
            for server in (*self.others, self.server):
                self.call(server.shutdown(grace_s))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()
            if self.engine_process is not None:
                self.engine_process.stop()


class EngineProcess:
    """``python -m service.ipc.worker engine`` for one test server; its log in a temporary file."""

    def __init__(self, config: cfg.ServerConfig) -> None:
        from service import metrics
        from service.ipc import worker

        self._dir = Path(tempfile.mkdtemp(prefix="svertka-test-engine-"))
        self.socket_path = self._dir / "engine.sock"
        env = {
            **os.environ,
            worker.CONFIG_ENV: worker.config_to_json(config),
            worker.SOCKET_ENV: str(self.socket_path),
            **metrics.multiprocess_environment(self._dir / "metrics"),
        }
        self.log_path = self._dir / "engine.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.ipc.worker", "engine"], env=env, stdout=log, stderr=log
            )

    def client(self, frontend: str = "0", slab_bytes: int = 16 << 20):
        """The frontend's side: its metrics (statistics go to the engine) and its engine client."""
        from service.ipc.engine_client import EngineClient
        from service.metrics import Metrics

        metrics = Metrics()
        client = EngineClient(
            self.socket_path, frontend=frontend, slab_bytes=slab_bytes, decode_threads=2, metrics=metrics
        )
        metrics.statistics_sink = client.send_outcome
        return metrics, client

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory) -> Path:
    """Two models: ``tiny`` (versions 1 and 2, 10 classes) and ``small`` (version 1, 4 classes)."""
    root = tmp_path_factory.mktemp("repo")
    make_repository(root, {"tiny": [1, 2]})
    make_repository(root, {"small": [1]}, num_classes=4, size=16)
    return root


@pytest.fixture(scope="module", params=["one-process", "engine-process"])
def server(request, tiny_repository) -> InProcessServer:
    """The tiny repository served in this process, and again with its engine in a process of its
    own (what every frontend of ``svertka serve --frontends N`` does)."""
    srv = InProcessServer(tiny_repository, engine_process=request.param == "engine-process")
    yield srv
    srv.close()


@pytest.fixture(params=["one-process", "engine-process"])
def make_server(request, tmp_path) -> Callable[..., InProcessServer]:
    """Factory for servers a test configures itself (closed at the end of the test); each test
    runs twice, as ``server`` does (a test that needs the engine in its own process for what it
    checks passes ``engine_process=False``)."""
    made: list[InProcessServer] = []

    def factory(repository: Path | None = None, **kwargs) -> InProcessServer:
        if repository is None:
            repository = make_repository(tmp_path / "repo", {"tiny": [1]})
        kwargs.setdefault("engine_process", request.param == "engine-process")
        srv = InProcessServer(repository, **kwargs)
        made.append(srv)
        return srv

    yield factory
    for srv in made:
        srv.close()
