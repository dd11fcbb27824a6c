"""An in-process svertka server on a loopback port, in its own event-loop thread.

Tests talk to it with ordinary synchronous gRPC stubs over a real channel,
exactly like an external client; the server, the manager and the metrics are
the real ones, put together by ``service.server.assemble`` as ``svertka
serve`` does. A fresh Metrics registry per server keeps servers independent.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from service import config as cfg
from tests.helpers.tinymodel import make_repository


class InProcessServer:
    """assemble(config) running on a private loop; ``call`` runs a coroutine there."""

    def __init__(self, repository: Path, *, load: bool = True, **config_kwargs) -> None:
        from service.server import assemble

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self._thread.start()
        self.config = cfg.ServerConfig(
            model_repository=repository, host="127.0.0.1", grpc_port=0, metrics_port=0, **config_kwargs
        )

        async def build():
            server = assemble(self.config)
            await server.start()
            return server

        self.server = self.call(build())
        self.metrics, self.engine, self.port = self.server.metrics, self.server.engine, self.server.port
        if load:
            self.call(self.server.load_models())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro, timeout_s: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def channel(self, **options) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=list(options.items()))

    def close(self, grace_s: float = 5.0) -> None:
        try:
            self.call(self.server.shutdown(grace_s))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory) -> Path:
    """Two models: ``tiny`` (versions 1 and 2, 10 classes) and ``small`` (version 1, 4 classes)."""
    root = tmp_path_factory.mktemp("repo")
    make_repository(root, {"tiny": [1, 2]})
    make_repository(root, {"small": [1]}, num_classes=4, size=16)
    return root


@pytest.fixture(scope="module")
def server(tiny_repository) -> InProcessServer:
    srv = InProcessServer(tiny_repository)
    yield srv
    srv.close()


@pytest.fixture()
def make_server(tmp_path) -> Callable[..., InProcessServer]:
    """Factory for servers a test configures itself (closed at the end of the test)."""
    made: list[InProcessServer] = []

    def factory(repository: Path | None = None, **kwargs) -> InProcessServer:
        if repository is None:
            repository = make_repository(tmp_path / "repo", {"tiny": [1]})
        srv = InProcessServer(repository, **kwargs)
        made.append(srv)
        return srv

    yield factory
    for srv in made:
        srv.close()
