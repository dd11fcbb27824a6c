"""One ``/metrics`` for several processes: prometheus_client's multiprocess mode, summed by the supervisor.

With ``svertka serve --frontends N`` (N > 1) a supervisor starts one engine
and N frontends; each of them records into a :class:`service.metrics.Metrics`
built with ``multiprocess=True``, whose values prometheus_client keeps in
memory-mapped files (one per process and kind) in one directory. The
supervisor serves the sum of those files, plus its own series, on the metrics
port (:class:`SupervisorMetrics`). Order matters, because prometheus_client
picks its value class from ``PROMETHEUS_MULTIPROC_DIR`` once, when it is
imported:

1. supervisor, *before* it starts any child: ``env =
   multiprocess_environment(path)`` (makes the directory, empty; returns
   ``{PROMETHEUS_MULTIPROC_DIR: path}`` for the children's environment), or
   ``path = prepare_multiprocess()`` (a fresh directory, the variable set in
   ``os.environ`` for every child started afterwards). Children are started
   as subprocesses or with the ``spawn`` method, never forked from a process
   holding prometheus state;
2. supervisor: ``sup = serve_multiprocess(path, host, port, frontends=N)``
   (or ``SupervisorMetrics(path, frontends=N)`` and ``start_http``);
3. engine / each frontend: ``Metrics(multiprocess=True)`` /
   ``Metrics(multiprocess=True, frontend=i)``, which refuses to start if its
   prometheus_client was imported without the variable;
4. supervisor: ``sup.process_started(role, index, pid)`` after starting a
   child; ``sup.process_exited(pid)`` once it has exited, before its
   replacement starts; ``sup.frontend_restarted(index)`` when it starts a
   frontend again; at exit ``sup.stop()`` (``close()`` also removes the
   directory).

What the scrape shows, and why counters never go backwards: counters and
histograms are summed over every file, a dead process's included (when it
exits its files are folded into one ``*_dead.db`` file per kind, under the
same lock as the scrape, so the directory does not grow with restarts);
gauges are ``livesum`` (in-flight, queue depth: the sum over live processes)
or ``livemostrecent`` (one value, the last one set: readiness, model info,
capacity, SLO, build info), and a dead process's gauges are dropped. A gauge
sample set to NaN is a removed series (``Metrics.remove_model``) and is left
out. As a last guard every counter and histogram sample is served as at least
the value served before.
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, values
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.registry import Collector

#: The variable prometheus_client reads at import to pick its file-backed values.
ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Gauge modes whose files belong to a live process (deleted when it is marked dead).
LIVE_GAUGE_MODES = ("liveall", "livemin", "livemax", "livesum", "livemostrecent")
#: The file a dead process's counters (histograms) are folded into: ``counter_dead.db``.
DEAD = "dead"
ROLES = ("supervisor", "engine", "frontend")

# Serialises reading the directory with folding a dead process's files into it (both in the supervisor).
_LOCK = threading.Lock()


def multiprocess_environment(path: str | os.PathLike[str]) -> dict[str, str]:
    """Supervisor, before starting any child: ``path`` made (private) and emptied of value files.

    Returns the variables the children's environment must have; this
    process's ``os.environ`` is left alone.
    """
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in [*path.glob("*.db"), *path.glob("*.db.tmp")]:  # a previous run's, in a reused directory
        stale.unlink(missing_ok=True)
    return {ENV: str(path)}


def prepare_multiprocess(parent: str | os.PathLike[str] | None = None) -> Path:
    """Supervisor, before starting any child: a fresh, private, empty directory for the value files.

    Sets ``PROMETHEUS_MULTIPROC_DIR`` in ``os.environ`` so that every child
    started afterwards (spawn or subprocess) inherits it; returns the path.
    ``parent``: where to make it (default: the system's temporary directory).
    The supervisor removes it at exit (``SupervisorMetrics.close``).
    """
    path = Path(tempfile.mkdtemp(prefix="svertka-metrics-", dir=parent))
    os.environ.update(multiprocess_environment(path))
    return path


def active() -> bool:
    """Whether this process's prometheus_client writes its values to files (``ENV`` was set at import)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def check_child() -> Path:
    """In an engine or frontend: the directory, or a RuntimeError that says what went wrong."""
    if not active():
        raise RuntimeError(
            f"Metrics(multiprocess=True): prometheus_client was imported without {ENV} set; the "
            "supervisor must put it in the environment (multiprocess_environment or prepare_multiprocess) "
            "before it starts this process (a subprocess or spawn, not fork)"
        )
    path = os.environ.get(ENV, "")
    if not os.path.isdir(path):
        raise RuntimeError(f"Metrics(multiprocess=True): {ENV}={path!r} is not a directory")
    return Path(path)


def _directory(path: str | os.PathLike[str] | None) -> str:
    path = os.fspath(path) if path is not None else os.environ.get(ENV)
    if not path or not os.path.isdir(path):
        raise ValueError(f"no metrics directory: pass one or set {ENV}")
    return path


def mark_process_dead(pid: int, path: str | os.PathLike[str] | None = None) -> None:
    """Supervisor, once a child has exited (and before its replacement starts): its bookkeeping.

    Drops its live gauges (its in-flight requests no longer count) and folds
    its counter and histogram files into ``<kind>_dead.db``, so their sums
    stay as they were and the directory holds one file per kind for all the
    dead. Never call it for a process that may still write: what it writes
    after is lost.
    """
    path = _directory(path)
    pid = int(pid)
    with _LOCK:
        for mode in LIVE_GAUGE_MODES:
            try:
                os.remove(os.path.join(path, f"gauge_{mode}_{pid}.db"))
            except FileNotFoundError:
                pass
        for kind in ("counter", "histogram", "summary"):
            dead = os.path.join(path, f"{kind}_{pid}.db")
            if not os.path.exists(dead):
                continue
            archive = os.path.join(path, f"{kind}_{DEAD}.db")
            sources = [archive, dead] if os.path.exists(archive) else [dead]
            merged = MultiProcessCollector.merge(_readable(sources), accumulate=False)
            tmp = archive + ".tmp"  # not *.db: a scrape never reads it
            if os.path.exists(tmp):
                os.remove(tmp)
            out = MmapedDict(tmp)
            try:
                for metric in merged:
                    for s in metric.samples:
                        key = mmap_key(
                            metric.name, s.name, list(s.labels), list(s.labels.values()), metric.documentation
                        )
                        out.write_value(key, s.value, 0.0)
            finally:
                out.close()
            os.replace(tmp, archive)
            os.remove(dead)


def _readable(files: Iterable[str]) -> list[str]:
    """The files with a header: one a process is creating this instant is still empty (and has no values)."""
    out = []
    for f in files:
        try:
            if os.path.getsize(f) >= 8:
                out.append(f)
        except FileNotFoundError:  # a live gauge file of a process just marked dead
            pass
    return out


class MultiprocessCollector(Collector):
    """The sum over every process's files in ``path``, as prometheus_client's ``MultiProcessCollector``.

    Different in three ways: NaN gauge samples (removed series) are left out
    before summing; reading is serialised with ``mark_process_dead``'s folding;
    counter and histogram samples never go below what was served before
    (a float sum in another order may differ in its last bit).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = _directory(path)
        self._served: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def collect(self) -> Iterable[Metric]:
        with _LOCK:
            files = _readable(glob.glob(os.path.join(self._path, "*.db")))
            # prometheus_client's own reading and summing, with the NaN filter between the two.
            metrics = MultiProcessCollector._read_metrics(files)
            for metric in metrics.values():
                if metric.type == "gauge":
                    metric.samples = [s for s in metric.samples if not math.isnan(s.value)]
            merged = list(MultiProcessCollector._accumulate_metrics(metrics, True))
            for metric in merged:
                if metric.type in ("counter", "histogram", "summary"):
                    metric.samples = [self._monotone(s) for s in metric.samples]
        return merged

    def _monotone(self, sample: Any) -> Any:
        key = (sample.name, tuple(sorted(sample.labels.items())))
        before = self._served.get(key)
        if before is not None and sample.value < before:
            return sample._replace(value=before)
        self._served[key] = sample.value
        return sample


class _Child:
    __slots__ = ("collector", "cpu_base", "cpu_seen", "pid")

    def __init__(self) -> None:
        self.pid: int | None = None
        self.collector: ProcessCollector | None = None
        self.cpu_base = 0.0  # CPU seconds of the slot's earlier processes
        self.cpu_seen = 0.0  # the current process's CPU seconds, as last read


class _ProcessesCollector(Collector):
    """The supervisor's own series: restarts per frontend, and CPU, memory and fds per process."""

    def __init__(self, frontends: int) -> None:
        self._lock = threading.Lock()
        self._restarts: dict[int, int] = {i: 0 for i in range(frontends)}
        self._slots: dict[tuple[str, int], _Child] = {}
        self._by_pid: dict[int, tuple[str, int]] = {}
        self.started("supervisor", 0, os.getpid())

    def restarted(self, index: int) -> None:
        with self._lock:
            self._restarts[int(index)] = self._restarts.get(int(index), 0) + 1

    def started(self, role: str, index: int, pid: int) -> None:
        if role not in ROLES:
            raise ValueError(f"role: expected one of {ROLES}, got {role!r}")
        slot = (role, int(index))
        with self._lock:
            if role == "frontend":
                self._restarts.setdefault(slot[1], 0)
            child = self._slots.setdefault(slot, _Child())
            if child.pid is not None:  # its exit was not reported: count what was seen of it
                self._by_pid.pop(child.pid, None)
                child.cpu_base += child.cpu_seen
            child.pid = int(pid)
            child.cpu_seen = 0.0
            child.collector = ProcessCollector(pid=lambda p=int(pid): p, registry=None)
            self._by_pid[int(pid)] = slot

    def exited(self, pid: int) -> None:
        with self._lock:
            slot = self._by_pid.pop(int(pid), None)
            if slot is None:
                return
            child = self._slots[slot]
            stats = self._read(child)  # a process not yet reaped still has its final CPU time
            if stats:
                child.cpu_seen = max(child.cpu_seen, stats.get("process_cpu_seconds_total", 0.0))
            child.cpu_base += child.cpu_seen
            child.cpu_seen = 0.0
            child.pid = None
            child.collector = None

    @staticmethod
    def _read(child: _Child) -> dict[str, float]:
        if child.collector is None:
            return {}
        out = {}
        for family in child.collector.collect():
            for s in family.samples:
                out[s.name] = s.value
        return out

    def collect(self) -> Iterable[Metric]:
        labels = ("role", "frontend")
        restarts = CounterMetricFamily(
            "svertka_frontend_restarts",
            "Frontend processes the supervisor started again after one exited, by frontend index.",
            labels=("frontend",),
        )
        cpu = CounterMetricFamily(
            "svertka_process_cpu_seconds",
            "User and system CPU time of each svertka process (all its processes in that role and "
            "index, restarted ones included).",
            labels=labels,
        )
        rss = GaugeMetricFamily(
            "svertka_process_resident_memory_bytes", "Resident memory of each svertka process.", labels=labels
        )
        fds = GaugeMetricFamily(
            "svertka_process_open_fds", "Open file descriptors of each svertka process.", labels=labels
        )
        start = GaugeMetricFamily(
            "svertka_process_start_time_seconds",
            "Start time of each svertka process since the Unix epoch (changes when it is restarted).",
            labels=labels,
        )
        with self._lock:
            for index, n in sorted(self._restarts.items()):
                restarts.add_metric([str(index)], n)
            for (role, index), child in sorted(self._slots.items()):
                shown = [role, "" if role != "frontend" else str(index)]
                stats = self._read(child)
                if stats:
                    child.cpu_seen = max(child.cpu_seen, stats.get("process_cpu_seconds_total", 0.0))
                    if "process_resident_memory_bytes" in stats:
                        rss.add_metric(shown, stats["process_resident_memory_bytes"])
                    if "process_open_fds" in stats:
                        fds.add_metric(shown, stats["process_open_fds"])
                    if "process_start_time_seconds" in stats:
                        start.add_metric(shown, stats["process_start_time_seconds"])
                cpu.add_metric(shown, child.cpu_base + child.cpu_seen)
        return [restarts, cpu, rss, fds, start]


class SupervisorMetrics:
    """The supervisor's side: the one ``/metrics`` of a server with several processes.

    Its registry holds the sum over the children's files
    (:class:`MultiprocessCollector`), the supervisor's own series
    (``svertka_frontend_restarts_total{frontend}``, ``svertka_process_*{role,
    frontend}`` for every process), and, as a single-process server has them,
    prometheus_client's process, platform and GC collectors (``process_*``:
    the supervisor process) and the GPU collector. None of it depends on
    whether this process's prometheus_client reads ``ENV``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        frontends: int = 0,
        registry: CollectorRegistry | None = None,
        process_metrics: bool = True,
        gpu_metrics: bool = True,
    ) -> None:
        self.path = Path(_directory(path))
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.collector = MultiprocessCollector(self.path)
        r.register(self.collector)
        self._processes = _ProcessesCollector(int(frontends))
        r.register(self._processes)
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        if gpu_metrics:
            from service.gpu_metrics import GpuCollector

            self.gpu = GpuCollector()
            r.register(self.gpu)
        self._http: Any = None

    def process_started(self, role: str, index: int, pid: int) -> None:
        """A child is running: ``role`` "engine" (index 0) or "frontend" (its index, 0..N-1).

        Its CPU, memory, fds and start time become ``svertka_process_*{role, frontend}``.
        """
        self._processes.started(role, index, pid)

    def process_exited(self, pid: int) -> None:
        """A child has exited (any way, SIGKILL included): call before starting its replacement."""
        self._processes.exited(pid)
        mark_process_dead(pid, self.path)

    def frontend_restarted(self, index: int) -> None:
        """The supervisor starts frontend ``index`` again after it exited: ``svertka_frontend_restarts_total``."""
        self._processes.restarted(index)

    # -- HTTP --------------------------------------------------------------
    def start_http(self, host: str, port: int) -> int:
        """Serve the registry at ``/metrics`` (service/metrics_http.py, its limits); returns the bound port."""
        from service import metrics_http

        if self._http is not None:
            raise RuntimeError("metrics HTTP server already started")
        self._http = metrics_http.serve(self.registry, host, port)
        return self._http.port

    @property
    def port(self) -> int:
        """The bound metrics port (0 before ``start_http``)."""
        return self._http.port if self._http is not None else 0

    def stop_http(self) -> None:
        if self._http is None:
            return
        httpd, self._http = self._http, None
        httpd.stop()

    stop = stop_http

    def close(self) -> None:
        """At exit, after every child has exited: stop serving and remove the directory."""
        self.stop_http()
        shutil.rmtree(self.path, ignore_errors=True)


def serve_multiprocess(
    path: str | os.PathLike[str],
    host: str,
    port: int,
    *,
    frontends: int = 0,
    process_metrics: bool = True,
    gpu_metrics: bool = True,
) -> SupervisorMetrics:
    """Supervisor: ``SupervisorMetrics`` for ``path``, serving on ``host:port`` (``.port``: the bound one)."""
    sup = SupervisorMetrics(
        path, frontends=frontends, process_metrics=process_metrics, gpu_metrics=gpu_metrics
    )
    sup.start_http(host, port)
    return sup
