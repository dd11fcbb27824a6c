"""Prometheus metrics and Triton-style statistics, recorded at one point.

Everything here hangs off a ``Metrics`` object that takes its registry as a
parameter: importing this module registers nothing (prometheus_client raises
on a time series registered twice), so two servers can live in one test
process. Per model version a ``ModelRecorder`` is the single recording point:
each call updates the Prometheus series and the counters behind
``ModelStatistics`` together, so the two never disagree.

With several processes (``svertka serve --frontends N``) each engine and
frontend process builds its ``Metrics`` with ``multiprocess=True`` and the
supervisor serves the sum (``service.metrics_multiprocess``: the order of the
calls, and what is summed how); everything else is as with one process.

Naming follows Prometheus' conventions (https://prometheus.io/docs/practices/naming/):
one ``svertka_`` prefix, base units (seconds), ``_total`` counters, ``_info``
metadata, histograms with a bucket exactly at the latency SLO. The gRPC
server metrics (recorded by ``service.api.grpc_metrics``) use the
grpc-ecosystem names operators already have dashboards for. No label carries
a per-request value.
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector

from service import __version__, config, metrics_multiprocess
from service.metrics_multiprocess import (
    SupervisorMetrics,
    mark_process_dead,
    multiprocess_environment,
    prepare_multiprocess,
    serve_multiprocess,
)
from service.model_recorder import ModelRecorder

__all__ = [
    "BASE_LATENCY_BUCKETS_S",
    "BATCH_SIZE_BUCKETS",
    "Metrics",
    "SupervisorMetrics",
    "latency_buckets",
    "mark_process_dead",
    "multiprocess_environment",
    "prepare_multiprocess",
    "serve_multiprocess",
]

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


class Metrics:
    """All of svertka's metrics, on one registry that the caller owns (or a fresh one).

    ``multiprocess=True``: this process is the engine or a frontend of a
    server with several processes (``frontend``: the frontend's index, 0..N-1;
    ``None`` in the engine). Its values go to the files the supervisor sums
    (``PROMETHEUS_MULTIPROC_DIR``, which must have been set before
    prometheus_client was imported here, else this raises), gauges carry
    their ``multiprocess_mode``, the process, platform, GC and GPU collectors
    are the supervisor's (so ``process_metrics``/``gpu_metrics`` are ignored),
    and the port is the supervisor's (``start_http`` raises). A frontend also
    has ``svertka_frontend_in_flight_requests{frontend}``.

    ``statistics_sink``: in a frontend process, a callable given each
    finished request's outcome (a dict: model, version, api, code,
    duration_s, queue_s, compute_s, compute_input_s, compute_output_s) in
    place of recording the ``ModelStatistics`` counters here; the engine
    records them (``ModelRecorder.request(..., series=False)``). ``None``
    (the default, and in the one process and the engine): recorded here.
    """

    #: Where ModelRecorder.request sends the statistics half of a request (see the class docstring).
    statistics_sink: Callable[[dict[str, Any]], None] | None = None

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        latency_slo_s: float = config.DEFAULT_LATENCY_SLO_S,
        process_metrics: bool = True,
        gpu_metrics: bool = True,
        multiprocess: bool = False,
        frontend: int | None = None,
    ) -> None:
        if multiprocess:
            metrics_multiprocess.check_child()
        if frontend is not None and (not multiprocess or int(frontend) < 0):
            raise ValueError(f"frontend: an index >= 0, with multiprocess=True; got {frontend!r}")
        self.multiprocess = bool(multiprocess)
        self.frontend = None if frontend is None else int(frontend)

        def mode(multiprocess_mode: str) -> str:
            # One process: prometheus_client's default, as before ("mostrecent" forbids inc/dec).
            return multiprocess_mode if multiprocess else "all"

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
        # Gauge modes with several processes: "livesum" sums the live processes (the engine is the one
        # that writes these); "livemostrecent" keeps the one value last set, without a pid label. A dead
        # process's "live*" values are dropped (mark_process_dead).
        self.queue_depth = Gauge(
            "svertka_queue_depth",
            "Rows waiting in the batching queue.",
            mv,
            registry=r,
            multiprocess_mode=mode("livesum"),
        )
        self.queue_capacity = Gauge(
            "svertka_queue_capacity_rows",
            "Rows the batching queue holds before it rejects.",
            mv,
            registry=r,
            multiprocess_mode=mode("livemostrecent"),
        )
        self.in_flight = Gauge(
            "svertka_in_flight_requests",
            "Requests accepted and not yet answered.",
            mv,
            registry=r,
            multiprocess_mode=mode("livesum"),
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
            multiprocess_mode=mode("livemostrecent"),
        )
        self.model_load_seconds = Gauge(
            "svertka_model_load_seconds",
            "Seconds the loaded model version took from its file to ready: opening its sessions "
            "(where TensorRT builds its engines, unless cached) and the warm-up at every padded "
            "batch size.",
            mv,
            registry=r,
            multiprocess_mode=mode("livemostrecent"),
        )
        self.model_ready = Gauge(
            "svertka_model_ready",
            "1 when the model version is ready to serve, else 0.",
            mv,
            registry=r,
            multiprocess_mode=mode("livemostrecent"),
        )
        self.model_reload_failed = Gauge(
            "svertka_model_reload_failed",
            "1 while the model's newest reload failed (a config.yaml or model file the server "
            "refused) and an older version keeps serving; the reason is in RepositoryIndex and the log.",
            ("model",),
            registry=r,
            multiprocess_mode=mode("livemostrecent"),
        )
        self.latency_slo = Gauge(
            "svertka_latency_slo_seconds",
            "The request latency SLO the buckets and alerts are built around.",
            registry=r,
            multiprocess_mode=mode("livemostrecent"),
        )
        self.latency_slo.set(self.latency_slo_s)
        self.build_info = Gauge(
            "svertka_build_info",
            "svertka build: its version and the runtime libraries it serves with (value 1).",
            ("version", "python", "onnxruntime", "grpcio"),
            registry=r,
            multiprocess_mode=mode("livemostrecent"),
        )
        ort = _package_version("onnxruntime") or _package_version("onnxruntime-gpu")
        self.build_info.labels(__version__, platform.python_version(), ort, _package_version("grpcio")).set(1)

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

        self._frontend_in_flight: Any = None
        if self.frontend is not None:
            self.frontend_in_flight = Gauge(
                "svertka_frontend_in_flight_requests",
                "Requests a frontend process has accepted and not yet answered, by frontend index.",
                ("frontend",),
                registry=r,
                multiprocess_mode="livesum",
            )
            self._frontend_in_flight = self.frontend_in_flight.labels(str(self.frontend))
            self._frontend_in_flight.set(0)  # a restarted frontend's series is back at once, at 0

        # With several processes these are the supervisor's (service.metrics_multiprocess.SupervisorMetrics).
        if process_metrics and not multiprocess:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        if gpu_metrics and not multiprocess:
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

    # -- per frontend (several processes) ----------------------------------
    def frontend_request_started(self) -> None:
        """A frontend accepted a request (once its model is known); no-op outside a frontend process."""
        if self._frontend_in_flight is not None:
            self._frontend_in_flight.inc()

    def frontend_request_finished(self) -> None:
        """The request ``frontend_request_started`` counted has been answered (any outcome)."""
        if self._frontend_in_flight is not None:
            self._frontend_in_flight.dec()

    def set_model_info(
        self,
        name: str,
        version: int,
        *,
        provider: str,
        precision: str,
        arch: str,
        sha256: str = "",
        load_seconds: float | None = None,
    ) -> None:
        """One series per loaded version; a reload (new provider, or new weights under the same
        version: a new sha256) replaces it, so count(svertka_model_info) stays the loaded versions.
        ``load_seconds``: how long it took to load (``svertka_model_load_seconds``)."""
        if load_seconds is not None:
            self.model_load_seconds.labels(name, str(int(version))).set(load_seconds)
        key = (name, int(version))
        with self._lock:
            old = self._info_labels.pop(key, None)
            if old is not None:
                self._remove_gauge(self.model_info, name, str(key[1]), *old)
            self._info_labels[key] = (provider, precision, arch, sha256)
        self.model_info.labels(name, str(key[1]), provider, precision, arch, sha256).set(1)

    def set_reload_failed(self, name: str, failed: bool) -> None:
        self.model_reload_failed.labels(name).set(1 if failed else 0)

    def set_model_ready(self, name: str, version: int, ready: bool) -> None:
        self.model_ready.labels(name, str(int(version))).set(1 if ready else 0)

    def remove_model(self, name: str, version: int) -> None:
        """Drop every series of that version (after unload): no stale readiness or info."""
        key = (name, int(version))
        with self._lock:
            self._recorders.pop(key, None)
            info = self._info_labels.pop(key, None)
        if self.multiprocess:
            # prometheus_client cannot delete from its files: the gauges are marked NaN, which the
            # supervisor leaves out; counters and histograms stay (summed, never reset; a reload of the
            # version continues them).
            for gauge in (
                self.queue_depth,
                self.queue_capacity,
                self.in_flight,
                self.model_ready,
                self.model_load_seconds,
            ):
                gauge.labels(name, str(key[1])).set(math.nan)
            if info is not None:
                self.model_info.labels(name, str(key[1]), *info).set(math.nan)
            return
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
            self.model_load_seconds,
        ):
            metric.remove_by_labels(labels)

    def _remove_gauge(self, gauge: Gauge, *labelvalues: str) -> None:
        if self.multiprocess:
            gauge.labels(*labelvalues).set(math.nan)  # see remove_model
        else:
            gauge.remove(*labelvalues)

    # -- HTTP --------------------------------------------------------------
    def start_http(self, host: str, port: int) -> int:
        """Serve the registry at ``/metrics`` on its own port (service/metrics_http.py); returns the bound port."""
        from service import metrics_http

        if self.multiprocess:
            raise RuntimeError("with several processes the supervisor serves /metrics (SupervisorMetrics)")
        if self._http is not None:
            raise RuntimeError("metrics HTTP server already started")
        self._http = metrics_http.serve(self.registry, host, port)
        return self._http.port

    def stop_http(self) -> None:
        if self._http is None:
            return
        httpd, self._http = self._http, None
        httpd.stop()
