"""One model version's recording point: its Prometheus series and its Triton-style statistics together.

Each call updates both, under one lock for the statistics, so the two never
disagree and a snapshot is never torn. The series themselves are the
families of :class:`service.metrics.Metrics`.

With several processes (``svertka serve --frontends N``, see
docs/observability.md) a finished request is seen by a frontend, but the
statistics behind ``ModelStatistics`` must be owned by one process, the
engine: the frontend's ``request`` records the series and hands the outcome
to ``Metrics.statistics_sink`` (which sends it to the engine; or the frontend
calls ``request(..., statistics=False)``/``request_series`` and sends it
itself), and the engine records the statistics (``request(..., series=False)``
or ``request_statistics``). The Prometheus series are summed over the
processes by the supervisor.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

if TYPE_CHECKING:
    from service.metrics import Metrics

log = logging.getLogger(__name__)

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

    In which process, when there are several (one engine, N frontends): the
    frontend that answered a request calls ``request`` (series here, the
    statistics to ``Metrics.statistics_sink``; or ``request_series`` /
    ``request(..., statistics=False)``) and ``postprocess``, plus
    ``preprocess``/``rejected("invalid_input")`` where it decodes; the engine
    calls ``request_statistics`` (or ``request(..., series=False)``) with the
    outcome the frontend sends it, and everything it decides itself:
    ``queued``, ``batch``, ``rejected`` (queue_full, deadline, cancelled),
    ``queue_depth``, ``in_flight``, ``set_queue_capacity``, and ``snapshot``
    for ``ModelStatistics``. In one process all of it happens there, and
    ``request`` records both at once, as always.
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
        if m.frontend is None:
            # The engine's gauges (the one process's, or the engine process's): they exist from load.
            self.queue_depth = m.queue_depth.labels(*labels)
            self.in_flight = m.in_flight.labels(*labels)
            if m.multiprocess:
                # A removed version's gauges are kept, marked NaN (prometheus_client cannot delete a
                # series from its files): a recorder for it again starts them at 0, as a fresh child.
                self.queue_depth.set(0)
                self.in_flight.set(0)
        # In a frontend process they are made only if used (__getattr__): a zero from each frontend
        # would keep a version's queue depth on the page after the engine removed it.
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

    def __getattr__(self, name: str) -> Any:
        if name in ("queue_depth", "in_flight"):  # only reached in a frontend process (see __init__)
            child = getattr(self._m, name).labels(*self._labels)
            setattr(self, name, child)
            return child
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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
        series: bool = True,
        statistics: bool = True,
    ) -> None:
        """One finished request. ``code`` is the gRPC status name ("OK", ...).

        ``compute_s`` is the total compute time of the batch(es) the request
        rode in. Triton splits it into input/infer/output; pass
        ``compute_input_s``/``compute_output_s`` when known and the rest is
        counted as infer (without them all of it is infer, which on the CPU
        provider is nearly exact: inputs are not copied).

        ``series``: the Prometheus series (``request_series``); ``statistics``:
        the counters behind ``ModelStatistics`` (``request_statistics``). One
        process records both (the defaults); with several, the frontend records
        the series and hands the statistics to ``Metrics.statistics_sink`` (or
        passes ``statistics=False`` and sends the outcome itself), and the
        engine, given the outcome, calls this with ``series=False``.
        """
        if api not in APIS:
            raise ValueError(f"api: expected one of {APIS}, got {api!r}")
        if series:
            self.request_series(api=api, code=code, duration_s=duration_s)
        if not statistics:
            return
        sink = self._m.statistics_sink
        if sink is not None:  # a frontend process: the engine owns the statistics
            outcome = {
                "model": self.name,
                "version": self.version,
                "api": api,
                "code": str(code),
                "duration_s": float(duration_s),
                "queue_s": float(queue_s),
                "compute_s": float(compute_s),
                "compute_input_s": float(compute_input_s or 0.0),
                "compute_output_s": float(compute_output_s or 0.0),
            }
            try:
                sink(outcome)
            except Exception:  # recording never fails a request
                log.warning(
                    "%s v%d: the request outcome could not be sent", self.name, self.version, exc_info=True
                )
        else:
            self.request_statistics(
                code=code,
                duration_s=duration_s,
                queue_s=queue_s,
                compute_s=compute_s,
                compute_input_s=compute_input_s,
                compute_output_s=compute_output_s,
            )

    def request_series(self, *, api: str, code: str, duration_s: float) -> None:
        """The Prometheus half of ``request``: ``svertka_requests_total`` and the request duration.

        Called where the request finished: the frontend process (with several).
        """
        if api not in APIS:
            raise ValueError(f"api: expected one of {APIS}, got {api!r}")
        self._request_counter(api, str(code)).inc()
        self._duration[api].observe(duration_s)

    def request_statistics(
        self,
        *,
        code: str,
        duration_s: float,
        queue_s: float = 0.0,
        compute_s: float = 0.0,
        compute_input_s: float | None = None,
        compute_output_s: float | None = None,
    ) -> None:
        """The ``ModelStatistics`` half of ``request`` (arguments as there).

        Called in the one process that owns the statistics: the engine (with
        several processes, from the outcome a frontend sends it).
        """
        with self._lock:
            if str(code) == "OK":
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
