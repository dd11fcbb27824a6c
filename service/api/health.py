"""``grpc.health.v1.Health`` fed from the engine's state.

Service names: ``""`` is the whole server (SERVING once every model has been
loaded or has failed and at least one is READY, until draining starts); each model name is SERVING
while at least one of its versions is READY; the two API service names
follow the server. Kubernetes probes ask for ``""`` (readiness) or a model
name. Draining is permanent: once NOT_SERVING for shutdown, nothing flips a
service back.
"""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from service import config
from service.engine.interface import Engine

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

#: Full names of the APIs, registered as health services that follow the server's status.
API_SERVICES = ("svertka.v1.ImageClassifier", "inference.GRPCInferenceService")


class HealthReporter:
    """Owns the health servicer and keeps it in step with the server state and the models."""

    def __init__(self, engine: Engine) -> None:
        self.servicer = health_aio.HealthServicer()
        self._engine = engine
        self._serving = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._models: set[str] = set()

    async def start(self) -> None:
        """Begin NOT_SERVING everywhere and follow the engine's state changes from now on."""
        self._loop = asyncio.get_running_loop()
        for name in (config.SERVER_HEALTH_SERVICE, *API_SERVICES):
            await self.servicer.set(name, NOT_SERVING)
        self._engine.add_listener(self._on_change)
        await self.refresh()

    def _on_change(self, _status) -> None:
        # The engine may call from an executor thread; the servicer lives on the loop.
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.create_task(self.refresh())
        else:
            asyncio.run_coroutine_threadsafe(self.refresh(), loop)

    async def refresh(self) -> None:
        """Recompute every service's status from the engine (idempotent)."""
        ready: dict[str, bool] = {}
        for s in self._engine.statuses():
            ready[s.name] = ready.get(s.name, False) or s.state == "READY"
        # A model that disappeared from the repository stops serving rather than vanishing,
        # so a probe watching it sees the change instead of SERVICE_UNKNOWN.
        for name in self._models - set(ready):
            ready[name] = False
        self._models |= set(ready)
        for name, ok in sorted(ready.items()):
            await self.servicer.set(name, SERVING if ok else NOT_SERVING)
        # A server with no model it can run must not attract traffic (e.g. every model file corrupt).
        server = SERVING if self._serving and any(ready.values()) else NOT_SERVING
        for name in (config.SERVER_HEALTH_SERVICE, *API_SERVICES):
            await self.servicer.set(name, server)

    async def set_serving(self) -> None:
        """Models are loaded and warmed up: the server as a whole may take traffic."""
        self._serving = True
        await self.refresh()
        log.info("health: SERVING")

    async def enter_draining(self) -> None:
        """Every service NOT_SERVING, permanently (the server is shutting down)."""
        self._serving = False
        await self.servicer.enter_graceful_shutdown()
        log.info("health: NOT_SERVING (draining)")
