"""Prometheus metrics and Triton-style statistics, recorded at one point.

Everything here hangs off a ``Metrics`` object that takes its registry as a
parameter (STYLE.md §7): importing this module registers nothing, and two
servers can live in one test process. Per model version a ``ModelRecorder``
is the single recording point: each call updates the Prometheus series and
the counters behind ``ModelStatistics`` together, so the two never disagree.

Naming follows PROTOCOL.md: one ``svertka_`` prefix, seconds, ``_total``
counters, ``_info`` metadata, histograms with a bucket exactly at the latency
SLO; gRPC server metrics use the grpc-ecosystem names operators already have
dashboards for. No label carries a per-request value.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import inspect
import platform
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import grpc.aio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector

from service import __version__, config

#: Request-scale buckets: sub-millisecond (tiny models, cache-warm CPU) to tens
#: of seconds (a queue backed up behind a slow GPU warm-up). The SLO is added
#: exactly if it is not already one of them, so ``le="<slo>"`` always exists.
BASE_LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.035,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
#: Batch sizes are rows; powers of two (what people configure) up to the
#: largest max_batch_size anyone runs on one onnxruntime session.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REJECTION_REASONS = ("queue_full", "deadline", "cancelled", "invalid_input")
#: gRPC codes a request on a loaded model ends with (NOT_FOUND and the auth codes end before a
#: model is resolved, so they are only in grpc_server_handled_total).
PRECREATED_CODES = (
    "OK",
    "INVALID_ARGUMENT",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "CANCELLED",
    "UNAVAILABLE",
    "INTERNAL",
)
APIS = ("image", "tensor")

_GRPC_TYPES = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}


def latency_buckets(slo_s: float) -> tuple[float, ...]:
    """The latency buckets with ``slo_s`` guaranteed to be an exact bucket bound."""
    if not slo_s > 0:
        raise ValueError(f"latency_slo_s: expected > 0, got {slo_s}")
    return tuple(sorted(set(BASE_LATENCY_BUCKETS_S) | {float(slo_s)}))


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


@dataclasses.dataclass(frozen=True)
class Duration:
    """A Triton ``StatisticDuration``: how many, and their total nanoseconds."""

    count: int = 0
    ns: int = 0

    def plus(self, seconds: float, count: int = 1) -> Duration:
        return Duration(self.count + count, self.ns + max(0, round(seconds * 1e9)))


@dataclasses.dataclass(frozen=True)
class StatsSnapshot:
    """A consistent copy of one model version's Triton-style statistics."""

    last_inference_ms: int
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    batch_stats: dict[int, tuple[Duration, Duration, Duration]]


class ModelRecorder:
    """The one recording point for one (model, version).

    Called from the event loop and possibly from executor threads; the
    Triton counters are guarded by a lock so a snapshot is never torn
    (prometheus_client's own children are already thread-safe).

    Who calls what: ``request`` once per finished request (success or not,
    both APIs); ``rejected`` additionally when the reason is one of
    ``REJECTION_REASONS``; ``preprocess`` per decoded image; ``queued`` per
    request when its batch starts; ``batch`` per executed batch;
    ``postprocess`` per request.
    """

    def __init__(self, metrics: Metrics, name: str, version: int) -> None:
        self.name = name
        self.version = int(version)
        labels = (name, str(self.version))
        self._labels = labels
        m = metrics
        self._requests: dict[tuple[str, str], Counter] = {}
        self._m = m
        self._duration = {api: m.request_duration.labels(*labels, api) for api in APIS}
        self._queue_hist = m.queue_wait.labels(*labels)
        self._preprocess_hist = m.preprocess.labels(*labels)
        self._compute_hist = m.batch_compute.labels(*labels)
        self._postprocess_hist = m.postprocess.labels(*labels)
        self._batch_size_hist = m.batch_size.labels(*labels)
        self._inferences = m.inferences_total.labels(*labels)
        self._batches = m.batches_total.labels(*labels)
        self._rejections = {r: m.rejections_total.labels(*labels, r) for r in REJECTION_REASONS}
        self.queue_depth = m.queue_depth.labels(*labels)
        self.in_flight = m.in_flight.labels(*labels)
        self._queue_capacity = m.queue_capacity
        # Series for the codes a resolved request can end with exist from load, at 0: Prometheus'
        # rate() needs a sample before the first increment, or the first error of a kind is
        # invisible to the error-ratio rules (a counter born at 1 has no increase).
        for api in APIS:
            for code in PRECREATED_CODES:
                self._requests[(api, code)] = m.requests_total.labels(*labels, api, code)

        self._lock = threading.Lock()
        self._last_inference_ms = 0
        self._inference_count = 0
        self._execution_count = 0
        self._success = Duration()
        self._fail = Duration()
        self._queue = Duration()
        self._compute_input = Duration()
        self._compute_infer = Duration()
        self._compute_output = Duration()
        self._batch_stats: dict[int, tuple[Duration, Duration, Duration]] = {}

    def _request_counter(self, api: str, code: str) -> Counter:
        key = (api, code)
        child = self._requests.get(key)
        if child is None:
            child = self._m.requests_total.labels(*self._labels, api, code)
            self._requests[key] = child
        return child

    def request(
        self,
        *,
        api: str,
        code: str,
        duration_s: float,
        queue_s: float = 0.0,
        compute_s: float = 0.0,
        compute_input_s: float | None = None,
        compute_output_s: float | None = None,
    ) -> None:
        """One finished request. ``code`` is the gRPC status name ("OK", ...).

        ``compute_s`` is the total compute time of the batch(es) the request
        rode in. Triton splits it into input/infer/output; pass
        ``compute_input_s``/``compute_output_s`` when known and the rest is
        counted as infer (without them all of it is infer, which on the CPU
        provider is nearly exact: inputs are not copied).
        """
        if api not in APIS:
            raise ValueError(f"api: expected one of {APIS}, got {api!r}")
        code = str(code)
        self._request_counter(api, code).inc()
        self._duration[api].observe(duration_s)
        with self._lock:
            if code == "OK":
                self._success = self._success.plus(duration_s)
                # Triton counts queue/compute for successful requests only.
                self._queue = self._queue.plus(queue_s)
                c_in = compute_input_s or 0.0
                c_out = compute_output_s or 0.0
                self._compute_input = self._compute_input.plus(c_in)
                self._compute_infer = self._compute_infer.plus(max(0.0, compute_s - c_in - c_out))
                self._compute_output = self._compute_output.plus(c_out)
            else:
                self._fail = self._fail.plus(duration_s)

    def set_queue_capacity(self, rows: int) -> None:
        """The queue bound (``max_queue_size`` rows), so alerts can say "80 % full".

        Created only when called: an absent capacity leaves the saturation
        ratio absent instead of dividing by zero.
        """
        self._queue_capacity.labels(*self._labels).set(rows)

    def rejected(self, reason: str) -> None:
        """A request refused or dropped before compute, for one of ``REJECTION_REASONS``."""
        child = self._rejections.get(reason)
        if child is None:
            raise ValueError(f"reason: expected one of {REJECTION_REASONS}, got {reason!r}")
        child.inc()

    def preprocess(self, seconds: float) -> None:
        """Decode + resize + normalize of one image."""
        self._preprocess_hist.observe(seconds)

    def queued(self, seconds: float) -> None:
        """One request's wait from enqueue to the start of its batch."""
        self._queue_hist.observe(seconds)

    def batch(self, size: int, *, input_s: float, infer_s: float, output_s: float) -> None:
        """One executed batch of ``size`` rows and its three compute stages."""
        if size < 1:
            raise ValueError(f"size: expected >= 1, got {size}")
        self._inferences.inc(size)
        self._batches.inc()
        self._batch_size_hist.observe(size)
        self._compute_hist.observe(input_s + infer_s + output_s)
        now_ms = int(time.time() * 1000)
        with self._lock:
            self._inference_count += size
            self._execution_count += 1
            self._last_inference_ms = now_ms
            b_in, b_inf, b_out = self._batch_stats.get(size, (Duration(), Duration(), Duration()))
            self._batch_stats[size] = (b_in.plus(input_s), b_inf.plus(infer_s), b_out.plus(output_s))

    def postprocess(self, seconds: float) -> None:
        """Top-k / response building for one request."""
        self._postprocess_hist.observe(seconds)

    def snapshot(self) -> StatsSnapshot:
        """A consistent copy of the statistics, for ``ModelStatistics``."""
        with self._lock:
            return StatsSnapshot(
                last_inference_ms=self._last_inference_ms,
                inference_count=self._inference_count,
                execution_count=self._execution_count,
                success=self._success,
                fail=self._fail,
                queue=self._queue,
                compute_input=self._compute_input,
                compute_infer=self._compute_infer,
                compute_output=self._compute_output,
                batch_stats=dict(self._batch_stats),
            )


class Metrics:
    """All of svertka's metrics, on one registry that the caller owns (or a fresh one)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        latency_slo_s: float = config.DEFAULT_LATENCY_SLO_S,
        process_metrics: bool = True,
        gpu_metrics: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.latency_slo_s = float(latency_slo_s)
        buckets = latency_buckets(self.latency_slo_s)
        r = self.registry
        mv = ("model", "version")

        self.requests_total = Counter(
            "svertka_requests",
            "Finished requests by API and gRPC status code.",
            (*mv, "api", "code"),
            registry=r,
        )
        self.request_duration = Histogram(
            "svertka_request_duration_seconds",
            "End-to-end request duration inside the server (receive to response), all outcomes.",
            (*mv, "api"),
            buckets=buckets,
            registry=r,
        )
        self.queue_wait = Histogram(
            "svertka_queue_wait_seconds",
            "Time a request waited in the batching queue before its batch started.",
            mv,
            buckets=buckets,
            registry=r,
        )
        self.preprocess = Histogram(
            "svertka_preprocess_seconds",
            "Decode, resize and normalize time per image.",
            mv,
            buckets=buckets,
            registry=r,
        )
        self.batch_compute = Histogram(
            "svertka_batch_compute_seconds",
            "Inference compute time per executed batch (input copy + run + output copy).",
            mv,
            buckets=buckets,
            registry=r,
        )
        self.postprocess = Histogram(
            "svertka_postprocess_seconds",
            "Top-k and response building time per request.",
            mv,
            buckets=buckets,
            registry=r,
        )
        self.batch_size = Histogram(
            "svertka_batch_size", "Rows per executed batch.", mv, buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.inferences_total = Counter("svertka_inferences", "Rows (images) inferred.", mv, registry=r)
        self.batches_total = Counter("svertka_batches", "Batches executed.", mv, registry=r)
        self.queue_depth = Gauge("svertka_queue_depth", "Rows waiting in the batching queue.", mv, registry=r)
        self.queue_capacity = Gauge(
            "svertka_queue_capacity_rows", "Rows the batching queue holds before it rejects.", mv, registry=r
        )
        self.in_flight = Gauge(
            "svertka_in_flight_requests", "Requests accepted and not yet answered.", mv, registry=r
        )
        self.rejections_total = Counter(
            "svertka_rejections",
            "Requests refused or dropped before compute, by reason "
            "(queue_full, deadline, cancelled, invalid_input).",
            (*mv, "reason"),
            registry=r,
        )
        self.model_info = Gauge(
            "svertka_model_info",
            "Loaded model version: execution provider, precision, architecture and the first 12 hex "
            "digits of model.onnx's sha256 (value 1).",
            (*mv, "provider", "precision", "arch", "sha256"),
            registry=r,
        )
        self.model_ready = Gauge(
            "svertka_model_ready", "1 when the model version is ready to serve, else 0.", mv, registry=r
        )
        self.latency_slo = Gauge(
            "svertka_latency_slo_seconds",
            "The request latency SLO the buckets and alerts are built around.",
            registry=r,
        )
        self.latency_slo.set(self.latency_slo_s)
        self.build_info = Gauge(
            "svertka_build_info",
            "svertka build: its version and the runtime libraries it serves with (value 1).",
            ("version", "python", "onnxruntime", "grpcio"),
            registry=r,
        )
        ort = _package_version("onnxruntime") or _package_version("onnxruntime-gpu")
        self.build_info.labels(__version__, platform.python_version(), ort, grpc.__version__).set(1)

        self.grpc_started = Counter(
            "grpc_server_started",
            "RPCs started on the server.",
            ("grpc_service", "grpc_method", "grpc_type"),
            registry=r,
        )
        self.grpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success or failure.",
            ("grpc_service", "grpc_method", "grpc_type", "grpc_code"),
            registry=r,
        )
        self.grpc_handling = Histogram(
            "grpc_server_handling_seconds",
            "Response latency of RPCs handled by the server (whole stream for streaming RPCs).",
            ("grpc_service", "grpc_method", "grpc_type"),
            buckets=buckets,
            registry=r,
        )

        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        if gpu_metrics:
            from service.gpu_metrics import GpuCollector

            self.gpu = GpuCollector()
            r.register(self.gpu)

        self._recorders: dict[tuple[str, int], ModelRecorder] = {}
        self._info_labels: dict[tuple[str, int], tuple[str, str, str, str]] = {}
        self._lock = threading.Lock()
        self._http: Any = None

    # -- per-model -----------------------------------------------------
    def model(self, name: str, version: int) -> ModelRecorder:
        """The recorder for (name, version); the same object on every call."""
        key = (name, int(version))
        with self._lock:
            rec = self._recorders.get(key)
            if rec is None:
                rec = ModelRecorder(self, name, int(version))
                self._recorders[key] = rec
            return rec

    def set_model_info(
        self, name: str, version: int, *, provider: str, precision: str, arch: str, sha256: str = ""
    ) -> None:
        """One series per loaded version; a reload (new provider, or new weights under the same
        version: a new sha256) replaces it, so count(svertka_model_info) stays the loaded versions."""
        key = (name, int(version))
        with self._lock:
            old = self._info_labels.pop(key, None)
            if old is not None:
                self.model_info.remove(name, str(key[1]), *old)
            self._info_labels[key] = (provider, precision, arch, sha256)
        self.model_info.labels(name, str(key[1]), provider, precision, arch, sha256).set(1)

    def set_model_ready(self, name: str, version: int, ready: bool) -> None:
        self.model_ready.labels(name, str(int(version))).set(1 if ready else 0)

    def remove_model(self, name: str, version: int) -> None:
        """Drop every series of that version (after unload): no stale readiness or info."""
        key = (name, int(version))
        with self._lock:
            self._recorders.pop(key, None)
            self._info_labels.pop(key, None)
        labels = {"model": name, "version": str(key[1])}
        for metric in (
            self.requests_total,
            self.request_duration,
            self.queue_wait,
            self.preprocess,
            self.batch_compute,
            self.postprocess,
            self.batch_size,
            self.inferences_total,
            self.batches_total,
            self.queue_depth,
            self.queue_capacity,
            self.in_flight,
            self.rejections_total,
            self.model_info,
            self.model_ready,
        ):
            metric.remove_by_labels(labels)

    # -- gRPC ------------------------------------------------------------
    def grpc_interceptor(self) -> grpc.aio.ServerInterceptor:
        return _GrpcMetricsInterceptor(self)

    # -- HTTP --------------------------------------------------------------
    def start_http(self, host: str, port: int) -> int:
        """Serve the registry at ``/metrics`` on its own port (service/metrics_http.py); returns the bound port."""
        from service.metrics_http import MetricsHTTPServer

        if self._http is not None:
            raise RuntimeError("metrics HTTP server already started")
        httpd = MetricsHTTPServer(make_wsgi_app(self.registry), host, port)
        port = httpd.start()
        self._http = httpd
        return port

    def stop_http(self) -> None:
        if self._http is None:
            return
        httpd, self._http = self._http, None
        httpd.stop()


def _code_name(code: Any) -> str | None:
    if code is None:
        return None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    return str(code)


#: Wrapped method handlers kept by the interceptor: far above the number of RPC methods served.
_MAX_WRAPPED_HANDLERS = 256


class _GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """grpc-ecosystem server metrics for grpc.aio, all four RPC types.

    The handler's behaviour is wrapped so the status is read where it is
    decided: a normal return is OK unless the servicer ``set_code`` something
    else; ``context.abort`` leaves its code on the context; a cancelled task
    is CANCELLED (DEADLINE_EXCEEDED when the deadline is what ran out); any
    other exception is UNKNOWN, which is what grpc sends for it.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        # The wrapped handler of each method, made on its first call: the servicer's handler
        # object is the same for every call of a method, so the wrapping (and the label
        # lookups) is paid once per method, not once per request.
        self._wrapped: dict[tuple[str, Any], grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        key = (handler_call_details.method or "", handler)
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrap(key[0], handler)
            if len(self._wrapped) < _MAX_WRAPPED_HANDLERS:  # a handler made per call is not kept
                self._wrapped[key] = wrapped
        return wrapped

    def _wrap(self, full: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, _, method = full.lstrip("/").partition("/")
        rtype = _GRPC_TYPES[(bool(handler.request_streaming), bool(handler.response_streaming))]
        labels = (service, method, rtype)
        m = self._m
        started = m.grpc_started.labels(*labels)
        handling = m.grpc_handling.labels(*labels)
        handled: dict[str, Any] = {}

        def finish(start: float, code: str) -> None:
            counter = handled.get(code)
            if counter is None:
                counter = handled[code] = m.grpc_handled.labels(*labels, code)
            counter.inc()
            handling.observe(time.perf_counter() - start)

        def outcome(context: Any, exc: BaseException | None) -> str:
            set_code = None
            try:
                set_code = _code_name(context.code())
            except Exception:  # pragma: no cover - contexts without code()
                set_code = None
            if exc is None:
                return set_code or "OK"
            if isinstance(exc, asyncio.CancelledError):
                try:
                    remaining = context.time_remaining()
                except Exception:  # pragma: no cover
                    remaining = None
                if remaining is not None and remaining <= 0:
                    return "DEADLINE_EXCEEDED"
                return "CANCELLED"
            if set_code and set_code != "OK":
                return set_code
            return "UNKNOWN"

        if handler.response_streaming and handler.request_streaming:
            behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif handler.response_streaming:
            behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        elif handler.request_streaming:
            behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        else:
            behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler

        if inspect.isasyncgenfunction(behavior):

            async def wrapped_agen(request_or_iterator: Any, context: Any) -> AsyncIterator[Any]:
                started.inc()
                start = time.perf_counter()
                try:
                    async for response in behavior(request_or_iterator, context):
                        yield response
                except BaseException as exc:
                    finish(start, outcome(context, exc))
                    raise
                finish(start, outcome(context, None))

            wrapped: Callable[..., Any] = wrapped_agen
        elif inspect.iscoroutinefunction(behavior):

            async def wrapped_coro(request_or_iterator: Any, context: Any) -> Any:
                started.inc()
                start = time.perf_counter()
                try:
                    result = await behavior(request_or_iterator, context)
                except BaseException as exc:
                    finish(start, outcome(context, exc))
                    raise
                finish(start, outcome(context, None))
                return result

            wrapped = wrapped_coro
        elif inspect.isgeneratorfunction(behavior):
            # grpc.aio runs synchronous handlers in its migration thread pool; keep them synchronous.

            def wrapped_gen(request_or_iterator: Any, context: Any) -> Iterator[Any]:
                started.inc()
                start = time.perf_counter()
                try:
                    yield from behavior(request_or_iterator, context)
                except BaseException as exc:
                    finish(start, outcome(context, exc))
                    raise
                finish(start, outcome(context, None))

            wrapped = wrapped_gen
        else:

            def wrapped_sync(request_or_iterator: Any, context: Any) -> Any:
                started.inc()
                start = time.perf_counter()
                try:
                    result = behavior(request_or_iterator, context)
                except BaseException as exc:
                    finish(start, outcome(context, exc))
                    raise
                finish(start, outcome(context, None))
                return result

            wrapped = wrapped_sync

        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
