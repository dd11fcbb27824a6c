"""The gRPC server: assembly (``assemble``), lifecycle and graceful drain.

Lifecycle, as Kubernetes sees it:

1. ``start()``: the port is open, health is NOT_SERVING, inference calls get
   UNAVAILABLE ("models are still loading").
2. ``load_models()``: the engine loads and warms every model; then health
   turns SERVING.
3. ``shutdown(grace_s)`` (SIGTERM/SIGINT in ``serve``): health turns
   NOT_SERVING at once, new inference calls get UNAVAILABLE, streams stop
   reading new requests, and everything already accepted (queued or being
   computed) completes and is answered. Then new calls are held until callers
   go quiet, the gRPC server stops (GOAWAY) with a short grace, the held calls
   are answered UNAVAILABLE, and the models are closed (service/drain.py says
   why in that order). Whatever was accepted and is still unanswered when
   ``grace_s`` runs out is abandoned: its callers get UNAVAILABLE, and
   ``abandoned`` counts it (``serve`` then exits ``EXIT_ABANDONED``).

Importing this module starts nothing; ``assemble`` must run inside the
event loop that will serve (``grpc.aio`` binds to it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import config as cfg
from service import drain, gpu_decode, limits, shm
from service.api import auth, wire
from service.api.classifier import ImageClassifierServicer
from service.api.grpc_metrics import GrpcMetricsInterceptor
from service.api.health import HealthReporter
from service.api.inference import InferenceServicer
from service.api.state import ServerState
from service.engine.interface import Engine
from service.gen.inference import grpc_service_pb2, grpc_service_pb2_grpc
from service.gen.svertka.v1 import classifier_pb2, classifier_pb2_grpc

if TYPE_CHECKING:  # imported where used: importing this module loads no onnxruntime
    from service.metrics import Metrics

log = logging.getLogger(__name__)

#: Server-side keepalive: ping idle connections every 60 s and drop them if no
#: answer within 20 s, so half-open connections (a vanished node) are noticed;
#: allow clients to ping as often as every 10 s (grpc's default minimum is 5 min,
#: which makes well-meaning clients with 30 s keepalive get GOAWAY too_many_pings).
KEEPALIVE_OPTIONS = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)


#: After draining, new calls are held until none arrived for this long (see Server.shutdown) ...
HOLD_QUIET_S = 0.2
#: ... or for this long at most, whichever comes first.
HOLD_MAX_S = 2.0
#: The grace ``grpc.aio``'s stop() gets once everything accepted is answered: what it waits for
#: then is the answers being written, held calls being answered, and calls that never sent their
#: whole request message (which it ends UNAVAILABLE when this runs out).
FINAL_GRACE_S = 1.0
#: Held calls are answered this long after stop() began, so that its GOAWAY is on the wire first.
RELEASE_AFTER_S = 0.05
#: Exit status of ``serve`` when the grace period ran out with accepted calls still unanswered.
EXIT_ABANDONED = 3


def grpc_options(config: cfg.ServerConfig, *, reuse_port: bool = False) -> list[tuple[str, int]]:
    """Channel arguments of the server, from the config.

    ``reuse_port``: the frontends of one server share its port (SO_REUSEPORT); otherwise two
    servers must never share a port silently (tests, a second replica by mistake).
    """
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        *KEEPALIVE_OPTIONS,
    ]
    if config.max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", round(config.max_connection_age_s * 1000)))
        options.append(("grpc.max_connection_age_grace_ms", round(config.max_connection_age_grace_s * 1000)))
    return options


def address(host: str, port: int) -> str:
    """``host:port`` as gRPC and people write it (IPv6 hosts in brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _credentials(config: cfg.ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None:
        return None
    key = config.tls_key.read_bytes()
    cert = config.tls_cert.read_bytes()
    client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class Server:
    """One svertka server: the grpc.aio server plus its health, state and engine."""

    def __init__(
        self,
        grpc_server: grpc.aio.Server,
        port: int,
        engine: Engine,
        health: HealthReporter,
        gate: drain.CallGate | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.grpc_server = grpc_server
        self.port = port
        self.engine = engine
        self.health = health
        #: The registry the server records into (its /metrics port is ``serve``'s to open).
        self.metrics = metrics
        #: The interceptor that knows which calls are in progress (build_server installs it).
        self.gate = gate if gate is not None else drain.CallGate()
        self.state = ServerState()
        #: Registered system shared memory regions (None unless allow_shared_memory).
        self.shared_memory: shm.SharedMemory | None = None
        #: Accepted inference calls still unanswered when the drain gave up (grace over, or forced).
        self.abandoned = 0
        self._stopped = asyncio.Event()
        self._forced = asyncio.Event()

    async def start(self) -> None:
        """Open the port (health NOT_SERVING until ``load_models`` finishes)."""
        await self.health.start()  # first: the servicer itself starts with "" SERVING
        await self.grpc_server.start()

    async def load_models(self) -> None:
        """Load and warm up the repository, then report SERVING."""
        await self.engine.start()
        self.state.started = True
        await self.health.set_serving()

    async def start_and_load(self) -> None:
        await self.start()
        await self.load_models()

    async def shutdown(self, grace_s: float) -> None:
        """Drain (finish everything accepted) and stop within ``grace_s`` seconds."""
        if self.state.draining:
            await self._stopped.wait()
            return
        deadline = time.monotonic() + grace_s
        self.state.draining = True
        # What is inside a handler now was accepted; every call that enters later sees draining
        # and is refused (UNAVAILABLE) at once.
        accepted = self.gate.work_in_progress()
        self.state.drain_event.set()
        await self.health.enter_draining()
        log.info("draining: finishing accepted requests (grace %.1f s)", grace_s)
        drained = await self._finish_accepted(accepted, deadline)
        if not drained:
            log.error(
                "drain: %s with %d accepted calls unanswered; abandoning them (their callers get UNAVAILABLE)",
                "second signal" if self._forced.is_set() else f"grace period of {grace_s:g} s over",
                self.gate.unanswered(accepted),
            )
        # Hold new calls so that no caller has one on the wire when stop() sends GOAWAY. The hold
        # gets one quiet period even when the grace period is over (HOLD_QUIET_S past it at most).
        self.gate.hold()
        await self._until_quiet(deadline)
        if drained:
            final_grace = min(FINAL_GRACE_S, max(0.5, deadline - time.monotonic()))
        else:
            self.abandoned = self.gate.unanswered(accepted)
            final_grace = 0.0
        half_open = self.gate.waiting_for_request
        await self.health.stop()  # liveness too, now that the drain is over
        stopping = asyncio.create_task(self.grpc_server.stop(final_grace))
        await asyncio.sleep(RELEASE_AFTER_S)
        self.gate.release()
        await stopping
        if half_open:
            log.info("ended %d calls whose request message had not arrived (UNAVAILABLE)", half_open)
        if self.gate.held:
            log.info("answered %d calls that arrived at the end of the drain (UNAVAILABLE)", self.gate.held)
        try:
            await self.engine.close()
        except Exception:
            log.exception("closing the models failed")
        if self.shared_memory is not None:
            self.shared_memory.close()
        self._stopped.set()
        if self.abandoned:
            log.error("stopped: %d accepted calls abandoned", self.abandoned)
        else:
            log.info("stopped: every accepted call answered")

    def force_stop(self) -> None:
        """End the drain at once (a second signal): whatever is still accepted is abandoned."""
        self._forced.set()

    async def _finish_accepted(self, accepted: frozenset[asyncio.Task], deadline: float) -> bool:
        """Wait for the models' accepted work and the ``accepted`` calls; False if cut short first."""
        forced = asyncio.ensure_future(self._forced.wait())
        model_drain = asyncio.ensure_future(self.engine.drain(max(0.0, deadline - time.monotonic())))
        try:
            await asyncio.wait({model_drain, forced}, return_when=asyncio.FIRST_COMPLETED)
            if model_drain.done() and model_drain.exception() is not None:
                log.error("draining the models failed", exc_info=model_drain.exception())
            # Handlers write their answers after the models are done with them; streams end.
            while self.gate.unanswered(accepted) and not forced.done() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return not self.gate.unanswered(accepted)
        finally:
            forced.cancel()
            if not model_drain.done():
                model_drain.cancel()
                await asyncio.gather(model_drain, return_exceptions=True)

    async def _until_quiet(self, deadline: float) -> None:
        """Return once no call arrived for ``HOLD_QUIET_S``: at most ``HOLD_MAX_S``, and past the
        deadline (or after a second signal) only by as much as one quiet period needs."""
        started = time.monotonic()
        self.gate.last_arrival = max(self.gate.last_arrival, started)
        one_period = started + HOLD_QUIET_S * 1.25
        limit = one_period if self._forced.is_set() else max(min(deadline, started + HOLD_MAX_S), one_period)
        while time.monotonic() < limit and time.monotonic() - self.gate.last_arrival < HOLD_QUIET_S:
            await asyncio.sleep(HOLD_QUIET_S / 4)

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


def build_server(
    config: cfg.ServerConfig,
    engine: Engine,
    metrics: Metrics,
    *,
    reuse_port: bool = False,
    shared_memory: shm.SharedMemory | None = None,
) -> tuple[Server, int]:
    """Assemble the server (not started): both APIs, health, reflection, interceptors, port.

    Returns the server and the bound gRPC port (useful with ``grpc_port=0``).
    ``shared_memory``: where system shared memory regions are registered when the config
    allows them (a frontend's: in the engine process); a ``shm.Registry`` of this process's own
    by default.
    """
    gate = drain.CallGate()
    # Metrics outermost (they count held calls too), then the gate, then authentication.
    interceptors = [GrpcMetricsInterceptor(metrics), gate]
    if config.auth_token_file is not None:
        interceptors.append(auth.BearerTokenInterceptor(auth.read_token(config.auth_token_file)))
    # Innermost: only calls that passed auth have their message parsed, and one that does not
    # parse ends INVALID_ARGUMENT instead of grpc's UNKNOWN with a logged traceback.
    interceptors.append(wire.DecodeInterceptor())
    grpc_server = grpc.aio.server(
        interceptors=interceptors, options=grpc_options(config, reuse_port=reuse_port)
    )
    health = HealthReporter(engine)
    server = Server(grpc_server, 0, engine, health, gate, metrics)
    if config.allow_shared_memory:
        server.shared_memory = shm.Registry() if shared_memory is None else shared_memory

    classifier_pb2_grpc.add_ImageClassifierServicer_to_server(
        ImageClassifierServicer(engine, server.state, metrics), grpc_server
    )
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(
            engine,
            server.state,
            metrics,
            enable_model_control=config.enable_model_control,
            shared_memory=server.shared_memory,
        ),
        grpc_server,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, grpc_server)
    reflection.enable_server_reflection(
        (
            classifier_pb2.DESCRIPTOR.services_by_name["ImageClassifier"].full_name,
            grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        grpc_server,
    )

    where = address(config.host, config.grpc_port)
    credentials = _credentials(config)
    try:
        if credentials is None:
            port = grpc_server.add_insecure_port(where)
        else:
            port = grpc_server.add_secure_port(where, credentials)
    except RuntimeError as exc:
        raise cfg.ConfigError(f"cannot listen on {where}: {exc}") from None
    if not port:
        raise cfg.ConfigError(f"cannot listen on {where} (port in use or address not available)")
    server.port = port
    return server, port


@dataclasses.dataclass(frozen=True)
class FrontendRole:
    """What ``serve`` needs to run as one frontend process of several (service.supervisor)."""

    engine: Any  # a service.ipc.engine_client.EngineClient
    metrics: Metrics


def build_engine(config: cfg.ServerConfig, metrics: Metrics) -> Engine:
    """The engine for ``config``: its repository, polled every ``repository_poll_s``
    seconds, on a budget of ``intra_op_threads`` CPUs."""
    from service.engine.repository import ModelRepository  # loads onnxruntime: only when serving

    return ModelRepository(
        config.model_repository,
        metrics,
        poll_interval_s=config.repository_poll_s,
        cpu_budget=config.intra_op_threads,
        trt_cache_dir=config.trt_cache_dir,
    )


def assemble(
    config: cfg.ServerConfig,
    *,
    metrics: Metrics | None = None,
    engine: Engine | None = None,
    reuse_port: bool = False,
    shared_memory: shm.SharedMemory | None = None,
) -> Server:
    """The server ``config`` describes, not started: metrics, engine, gRPC server.

    The one place a server is put together (``serve``, in-process tests and
    benchmarks). ``metrics``: the registry to record into, a fresh ``Metrics()``
    by default. Must run inside the event loop that will serve; the gRPC port is
    bound (``server.port``), the metrics port is not (``server.metrics.start_http``).
    ``engine``: another engine than the in-process one ``config`` describes (a frontend
    process's client of the engine process); ``reuse_port``: see ``grpc_options``;
    ``shared_memory``: see ``build_server`` (a frontend's engine client has one).
    """
    from service.metrics import Metrics

    try:  # before any model loads: its preprocessing takes the decoder chosen here
        gpu_decode.configure(config.image_decoder)
    except gpu_decode.Unavailable as exc:
        raise cfg.ConfigError(f"image_decoder gpu: {exc} (or serve with --image-decoder cpu)") from None
    metrics = Metrics() if metrics is None else metrics
    engine = build_engine(config, metrics) if engine is None else engine
    server, _ = build_server(config, engine, metrics, reuse_port=reuse_port, shared_memory=shared_memory)
    return server


async def serve(config: cfg.ServerConfig, *, frontend: FrontendRole | None = None) -> int:
    """Run a server until SIGTERM/SIGINT, then drain; the process exit status.

    0: drained, every accepted call answered; 1: loading the repository failed (or, for a
    frontend, the engine process went away); ``EXIT_ABANDONED``: the grace period ran out (or
    a second signal came) with accepted calls unanswered, and the log says how many.

    ``frontend``: this process is one of several frontends of ``svertka serve --frontends N``
    (its engine is the engine process, its port is shared, its metrics are served by the
    supervisor); None: the whole server in this process.
    """
    # Before anything opens files: connections, shared memory regions and models each hold one.
    limits.raise_open_files_limit()
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        log.info("received %s", signal.Signals(signum).name)
        stop_requested.set()
        if signals_seen > 1:
            log.warning("second signal: stopping without waiting for in-flight requests")
            server.force_stop()

    if frontend is None:
        server = assemble(config)
    else:
        server = assemble(
            config,
            metrics=frontend.metrics,
            engine=frontend.engine,
            reuse_port=True,
            shared_memory=frontend.engine.shared_memory,
        )
    metrics, engine, port = server.metrics, server.engine, server.port
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    metrics_host = config.metrics_host or config.host
    metrics_port = config.metrics_port
    try:
        if frontend is None:
            metrics_port = metrics.start_http(metrics_host, config.metrics_port)
    except OSError as exc:
        raise cfg.ConfigError(
            f"cannot serve metrics on {address(metrics_host, config.metrics_port)}: {exc}"
        ) from None
    if frontend is not None:
        # The engine process going away ends this frontend like a signal would (its calls get
        # UNAVAILABLE); the supervisor then exits non-zero.
        engine_lost = loop.create_task(frontend.engine.lost.wait())
        engine_lost.add_done_callback(lambda _t: stop_requested.set())
    await server.start()
    if frontend is None:
        log.info(
            "svertka listening: grpc %s metrics %s (tls %s, auth %s)",
            address(config.host, port),
            address(metrics_host, metrics_port),
            "on" if config.tls_cert else "off",
            "on" if config.auth_token_file else "off",
        )
    else:
        log.info("frontend listening on %s (the port is shared)", address(config.host, port))
    exit_code = 0
    load = asyncio.create_task(server.load_models())
    stop_wait = asyncio.create_task(stop_requested.wait())
    await asyncio.wait({load, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if load.done() and load.exception() is not None:
        log.error("loading the model repository failed", exc_info=load.exception())
        stop_requested.set()
        exit_code = 1
    elif not load.done():
        log.info("stop requested while loading models")
        load.cancel()
        await asyncio.gather(load, return_exceptions=True)
    else:
        log.info("serving %s", ", ".join(f"{s.name}:{s.version}:{s.state}" for s in engine.statuses()))
    await stop_wait
    if frontend is not None and frontend.engine.lost.is_set() and exit_code == 0:
        log.error("the engine process went away; this frontend stops")
        exit_code = 1
    try:
        await server.shutdown(config.grace_period_s)
    finally:
        metrics.stop_http()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    if server.abandoned and exit_code == 0:
        exit_code = EXIT_ABANDONED
    return exit_code
