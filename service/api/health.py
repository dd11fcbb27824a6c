"""``grpc.health.v1.Health`` fed from the engine's state.

Service names, two meanings:

- readiness: ``""`` is the whole server (SERVING once every model has been
  loaded or has failed and at least one is READY, until draining starts);
  each model name is SERVING while at least one of its versions is READY;
  the two API service names follow ``""``. Kubernetes' readiness and startup
  probes ask for ``""`` (or a model name).
- liveness: ``LIVENESS_SERVICE`` is SERVING from ``start()`` for as long as
  the process answers on its event loop, whatever the models do (an empty
  repository, every model removed or failed) and while draining; NOT_SERVING
  only once the drain is over and the server stops. Kubernetes' liveness
  probe asks for it: a liveness probe on ``""`` would restart a healthy
  process whose last model went away, and so make nothing better.

Draining is permanent: once NOT_SERVING for shutdown, nothing flips a
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
#: The liveness health service: SERVING while the process answers, whatever its models' state.
LIVENESS_SERVICE = "svertka.liveness"


class HealthReporter:
    """Owns the health servicer and keeps it in step with the server state and the models.

    Every change to the servicer happens on the event loop, under one lock, so
    that a refresh scheduled by the engine can never undo ``enter_draining``.
    """

    def __init__(self, engine: Engine) -> None:
        self.servicer = health_aio.HealthServicer()
        self._engine = engine
        self._serving = False
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        self._models: set[str] = set()
        #: What ``""`` last said, once set_serving has run (None before): its changes are logged.
        self._reported: int | None = None

    async def start(self) -> None:
        """Liveness SERVING, every readiness service NOT_SERVING; follow the engine from now on."""
        self._loop = asyncio.get_running_loop()
        await self.servicer.set(LIVENESS_SERVICE, SERVING)
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

    async def refresh(self) -> tuple[int, dict[str, bool]] | None:
        """Recompute every readiness service's status from the engine (idempotent).

        Returns what ``""`` now says and which models are READY; None once draining.
        """
        async with self._lock:
            if self._draining:
                return None
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
            if self._reported is not None and server != self._reported:
                self._report(server, ready)
            return server, ready

    def _report(self, server: int, ready: dict[str, bool]) -> None:
        """Log what the readiness probe now sees, and why when that is NOT_SERVING."""
        self._reported = server
        if server == SERVING:
            log.info("health: SERVING (ready: %s)", ", ".join(sorted(n for n, ok in ready.items() if ok)))
            return
        if not ready:
            why = "the model repository holds no model"
        else:
            why = f"no model is READY (of {', '.join(sorted(ready))}; the lines above say why)"
        log.warning(
            "health: NOT_SERVING: %s. Readiness and startup probes (health service %r) fail until a "
            "model is READY: add one to the repository (picked up with --repository-poll-s set, "
            "else on restart) or fix the failing ones. Liveness (%r) stays SERVING",
            why,
            config.SERVER_HEALTH_SERVICE,
            LIVENESS_SERVICE,
        )

    async def set_serving(self) -> None:
        """Models are loaded and warmed up: the server as a whole may take traffic, if one is READY.

        Logs what ``""`` says from now on: SERVING, or a warning saying why not.
        """
        self._serving = True
        state = await self.refresh()
        if state is not None:
            self._report(*state)

    async def enter_draining(self) -> None:
        """Every readiness service NOT_SERVING, permanently; liveness stays SERVING until ``stop``."""
        async with self._lock:
            self._serving = False
            self._draining = True
            for name in (*sorted(self._models), config.SERVER_HEALTH_SERVICE, *API_SERVICES):
                await self.servicer.set(name, NOT_SERVING)
        log.info("health: NOT_SERVING (draining)")

    async def stop(self) -> None:
        """The drain is over and the server stops: every service NOT_SERVING, liveness included."""
        async with self._lock:
            self._draining = True
            await self.servicer.enter_graceful_shutdown()
