"""The gRPC server: assembly (``build_server``), lifecycle and graceful drain.

Lifecycle, as Kubernetes sees it:

1. ``start()``: the port is open, health is NOT_SERVING, inference calls get
   UNAVAILABLE ("models are still loading").
2. ``load_models()``: the manager loads and warms every model; then health
   turns SERVING.
3. ``shutdown(grace_s)`` (SIGTERM/SIGINT in ``serve``): health turns
   NOT_SERVING at once, new inference calls get UNAVAILABLE, streams stop
   reading new requests, and everything already accepted (queued or being
   computed) completes and is answered; after at most ``grace_s`` the gRPC
   server stops and the models are closed.

Importing this module starts nothing; ``build_server`` must run inside the
event loop that will serve (``grpc.aio`` binds to it).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import config as cfg
from service import shm
from service.api import auth, common
from service.api.classifier import ImageClassifierServicer
from service.api.health import HealthReporter
from service.api.inference import InferenceServicer
from service.gen.inference import grpc_service_pb2, grpc_service_pb2_grpc
from service.gen.svertka.v1 import classifier_pb2, classifier_pb2_grpc

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


#: After draining: stop once no inference call arrived for this long (see Server._linger) ...
LINGER_QUIET_S = 0.2
#: ... or after this long at most, whichever comes first.
LINGER_MAX_S = 2.0


def grpc_options(config: cfg.ServerConfig) -> list[tuple[str, int]]:
    """Channel arguments of the server, from the config."""
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Two servers must never share a port silently (tests, a second replica by mistake).
        ("grpc.so_reuseport", 0),
        *KEEPALIVE_OPTIONS,
    ]
    if config.max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", round(config.max_connection_age_s * 1000)))
        options.append(("grpc.max_connection_age_grace_ms", round(config.max_connection_age_grace_s * 1000)))
    return options


def _address(host: str, port: int) -> str:
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
    """One svertka server: the grpc.aio server plus its health, state and model manager."""

    def __init__(self, grpc_server: grpc.aio.Server, port: int, manager, health: HealthReporter) -> None:
        self.grpc_server = grpc_server
        self.port = port
        self.manager = manager
        self.health = health
        self.state = common.ServerState()
        #: Registered system shared memory regions (None unless allow_shared_memory).
        self.shared_memory: shm.Registry | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        """Open the port (health NOT_SERVING until ``load_models`` finishes)."""
        await self.grpc_server.start()
        await self.health.start()

    async def load_models(self) -> None:
        """Load and warm up the repository, then report SERVING."""
        await self.manager.start()
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
        self.state.drain_event.set()
        await self.health.enter_draining()
        log.info("draining: finishing accepted requests (grace %.1f s)", grace_s)
        try:
            await self.manager.drain(grace_s)
        except Exception:
            log.exception("draining the models failed")
        await self._linger(deadline)
        # Let the handlers of finished requests write their responses, then close.
        await self.grpc_server.stop(max(0.5, deadline - time.monotonic()))
        try:
            await self.manager.close()
        except Exception:
            log.exception("closing the models failed")
        if self.shared_memory is not None:
            self.shared_memory.close()
        self._stopped.set()
        log.info("stopped")

    async def _linger(self, deadline: float) -> None:
        """Keep refusing with UNAVAILABLE while clients are still sending, before closing the transport.

        grpc answers calls that arrive while ``stop()`` runs with CANCELLED,
        which a client would read as "I cancelled" rather than "go elsewhere".
        So once everything accepted is answered, wait until no inference call
        has arrived for ``LINGER_QUIET_S`` (at most ``LINGER_MAX_S``, never past
        the grace period): in that window late callers get a clean UNAVAILABLE.
        """
        started = time.monotonic()
        self.state.last_call = max(self.state.last_call, started)
        limit = min(deadline, started + LINGER_MAX_S)
        while time.monotonic() < limit and time.monotonic() - self.state.last_call < LINGER_QUIET_S:
            await asyncio.sleep(LINGER_QUIET_S / 4)

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


def build_server(config: cfg.ServerConfig, manager, metrics) -> tuple[Server, int]:
    """Assemble the server (not started): both APIs, health, reflection, interceptors, port.

    Returns the server and the bound gRPC port (useful with ``grpc_port=0``).
    """
    interceptors = [metrics.grpc_interceptor()]
    if config.auth_token_file is not None:
        interceptors.append(auth.BearerTokenInterceptor(auth.read_token(config.auth_token_file)))
    grpc_server = grpc.aio.server(interceptors=interceptors, options=grpc_options(config))
    health = HealthReporter(manager)
    server = Server(grpc_server, 0, manager, health)
    if config.allow_shared_memory:
        server.shared_memory = shm.Registry()

    classifier_pb2_grpc.add_ImageClassifierServicer_to_server(
        ImageClassifierServicer(manager, server.state), grpc_server
    )
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(
            manager,
            server.state,
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

    address = _address(config.host, config.grpc_port)
    credentials = _credentials(config)
    try:
        if credentials is None:
            port = grpc_server.add_insecure_port(address)
        else:
            port = grpc_server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise cfg.ConfigError(f"cannot listen on {address}: {exc}") from None
    if not port:
        raise cfg.ConfigError(f"cannot listen on {address} (port in use or address not available)")
    server.port = port
    return server, port


async def serve(config: cfg.ServerConfig) -> int:
    """Run a server until SIGTERM/SIGINT, then drain; the process exit status.

    A second signal while draining stops at once (in-flight requests are cancelled).
    """
    from service.metrics import Metrics
    from service.models import ModelManager

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
            force_task = loop.create_task(server.grpc_server.stop(0))
            force_task.add_done_callback(lambda _t: None)

    metrics = Metrics()
    manager = ModelManager(
        config.model_repository,
        metrics,
        poll_interval_s=config.repository_poll_s,
        cpu_budget=config.intra_op_threads,
    )
    server, port = build_server(config, manager, metrics)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    try:
        metrics_port = metrics.start_http(config.host, config.metrics_port)
    except OSError as exc:
        raise cfg.ConfigError(
            f"cannot serve metrics on {_address(config.host, config.metrics_port)}: {exc}"
        ) from None
    await server.start()
    log.info(
        "svertka listening: grpc %s metrics %s (tls %s, auth %s)",
        _address(config.host, port),
        _address(config.host, metrics_port),
        "on" if config.tls_cert else "off",
        "on" if config.auth_token_file else "off",
    )
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
        log.info("serving %s", ", ".join(f"{s.name}:{s.version}:{s.state}" for s in manager.statuses()))
    await stop_wait
    try:
        await server.shutdown(config.grace_period_s)
    finally:
        metrics.stop_http()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return exit_code
