"""One /metrics over several processes: prometheus_client's multiprocess mode, summed by the supervisor.

Real processes, without the rest of the multi-process server: this test is
the supervisor (``prepare_multiprocess`` or ``multiprocess_environment``,
``SupervisorMetrics`` on a real metrics port, ``process_started``,
``process_exited``, ``frontend_restarted``), and each engine or
frontend is ``tests/observability/multiprocess_child.py`` in a subprocess,
recording through ``Metrics(multiprocess=True)`` what the test tells it to.
A frontend is killed with SIGKILL and started again; every page is checked
for the exact sums, for counters and histograms that never went down since
the page before, and with ``promtool check metrics``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from service.metrics import Metrics
from service.metrics_multiprocess import (
    ENV,
    SupervisorMetrics,
    mark_process_dead,
    multiprocess_environment,
    prepare_multiprocess,
    serve_multiprocess,
)
from tests.helpers import ROOT
from tests.reliability.harness import samples_of

PROMTOOL = shutil.which("promtool")
MONOTONE_SUFFIXES = ("_total", "_bucket", "_count", "_sum")
M = {"model": "tiny", "version": "1"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Child:
    """An engine or frontend stand-in; calling it sends one command and waits for its answer."""

    def __init__(self, role: str, index: int, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.observability.multiprocess_child", role, str(index)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.pid = self.proc.pid

    def __call__(self, op: str, **args: object) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"child {self.pid} exited (code {self.proc.poll()})"
        reply = json.loads(line)
        assert reply["ok"], reply
        return reply

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


class Supervisor:
    """What service/supervisor.py does for the metrics, and nothing else."""

    def __init__(self, metrics: SupervisorMetrics, env: dict[str, str] | None = None) -> None:
        self.metrics = metrics
        self.path = metrics.path
        self.port = metrics.port
        self.env = env
        self.children: list[Child] = []
        self.pages: list[Samples] = []

    def start(self, role: str, index: int) -> Child:
        child = Child(role, index, self.env)
        self.children.append(child)
        self.metrics.process_started(role, index, child.pid)
        return child

    def restart(self, index: int) -> Child:
        self.metrics.frontend_restarted(index)
        return self.start("frontend", index)

    def kill(self, child: Child) -> None:
        child.kill()  # SIGKILL, reaped
        self.metrics.process_exited(child.pid)

    def scrape(self) -> Samples:
        """The page, checked: promtool-clean, no pid label, nothing monotone went down or vanished."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        if PROMTOOL is not None:
            res = subprocess.run(
                [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
            )
            assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), (
                res.stdout + res.stderr
            )
        page = samples_of(text)
        assert not [key for key in page if "pid" in dict(key[1])], "no series carries a pid label"
        if self.pages:
            before = self.pages[-1]
            for key, value in before.items():
                if key[0].endswith(MONOTONE_SUFFIXES):
                    assert key in page, f"{key} vanished"
                    assert page[key] >= value, f"{key} went down: {value} -> {page[key]}"
        self.pages.append(page)
        return page


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    """prepare_multiprocess: the variable in this process's environment, which the children inherit."""
    before = os.environ.pop(ENV, None)
    try:
        path = prepare_multiprocess(tmp_path)
        assert os.environ[ENV] == str(path) and not os.listdir(path)
        metrics = SupervisorMetrics(path, frontends=2, gpu_metrics=False)
        metrics.start_http("127.0.0.1", 0)
        sup = Supervisor(metrics)
        try:
            yield sup
        finally:
            for child in sup.children:
                child.close()
            sup.metrics.close()
        assert not path.exists()
    finally:  # a later test's `svertka serve` must not inherit it
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


@pytest.fixture
def supervisor_env(tmp_path: Path) -> Iterator[Supervisor]:
    """multiprocess_environment + serve_multiprocess: the variable only in the children's environment."""
    path = tmp_path / "metrics"
    path.mkdir()
    (path / "counter_4242.db").write_bytes(b"stale")  # a previous run's: removed
    env = {**os.environ, **multiprocess_environment(path)}
    assert ENV not in os.environ and sorted(os.listdir(path)) == []
    metrics = serve_multiprocess(path, "127.0.0.1", 0, frontends=2, gpu_metrics=False)
    sup = Supervisor(metrics, env)
    try:
        yield sup
    finally:
        for child in sup.children:
            child.close()
        metrics.stop()


def v(page: Samples, name: str, **labels: str) -> float | None:
    return page.get((name, tuple(sorted(labels.items()))))


def series(page: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value for (n, labels), value in page.items() if n == name}


def test_one_page_sums_every_process_and_counters_survive_sigkill(supervisor: Supervisor) -> None:
    sup = supervisor
    engine = sup.start("engine", 0)
    f0, f1 = sup.start("frontend", 0), sup.start("frontend", 1)

    engine("load", sha="aaaaaaaaaaaa")
    engine("batches", n=3, size=4)
    engine("rejected", reason="queue_full")
    engine("gauges", depth=5, in_flight=2)
    f0("requests", n=7, api="image", code="OK", s=0.004)
    f1("requests", n=5, api="image", code="OK", s=0.2)
    f1("requests", n=2, api="tensor", code="INVALID_ARGUMENT", s=0.001)
    # The statistics half goes to the engine: what each frontend's statistics_sink was given.
    engine("outcomes", outcomes=f0("sent")["outcomes"] + f1("sent")["outcomes"])
    f0("accept", n=3)
    f1("accept", n=1)

    p = sup.scrape()
    assert v(p, "svertka_requests_total", **M, api="image", code="OK") == 12
    assert v(p, "svertka_requests_total", **M, api="tensor", code="INVALID_ARGUMENT") == 2
    assert v(p, "svertka_requests_total", **M, api="image", code="CANCELLED") == 0  # precreated, summed
    assert v(p, "svertka_request_duration_seconds_count", **M, api="image") == 12
    assert v(p, "svertka_request_duration_seconds_bucket", **M, api="image", le="0.1") == 7
    assert v(p, "svertka_request_duration_seconds_bucket", **M, api="image", le="+Inf") == 12
    assert math.isclose(v(p, "svertka_request_duration_seconds_sum", **M, api="image"), 7 * 0.004 + 5 * 0.2)
    assert v(p, "svertka_postprocess_seconds_count", **M) == 14
    assert v(p, "svertka_inferences_total", **M) == 12
    assert v(p, "svertka_batches_total", **M) == 3
    assert v(p, "svertka_batch_size_bucket", **M, le="4.0") == 3
    assert v(p, "svertka_queue_wait_seconds_count", **M) == 3
    assert v(p, "svertka_rejections_total", **M, reason="queue_full") == 1
    handled = "grpc_server_handled_total"
    grpc = {"grpc_service": "svertka.v1.ImageClassifier", "grpc_method": "Classify", "grpc_type": "unary"}
    assert v(p, handled, **grpc, grpc_code="OK") == 12
    assert v(p, "grpc_server_started_total", **grpc) == 14
    # Gauges: livesum over the live processes (the engine writes these two); one series each
    # for the values one process sets (no pid label: checked on every page).
    assert v(p, "svertka_queue_depth", **M) == 5
    assert v(p, "svertka_in_flight_requests", **M) == 2
    assert v(p, "svertka_queue_capacity_rows", **M) == 64
    assert series(p, "svertka_model_ready") == {tuple(sorted(M.items())): 1}
    (info,) = series(p, "svertka_model_info")
    assert dict(info)["sha256"] == "aaaaaaaaaaaa"
    assert len(series(p, "svertka_build_info")) == 1
    assert series(p, "svertka_latency_slo_seconds") == {(): 0.1}
    assert series(p, "svertka_frontend_in_flight_requests") == {
        (("frontend", "0"),): 3,
        (("frontend", "1"),): 1,
    }
    assert series(p, "svertka_frontend_restarts_total") == {(("frontend", "0"),): 0, (("frontend", "1"),): 0}
    roles = {dict(labels)["role"] for labels in series(p, "svertka_process_cpu_seconds_total")}
    assert roles == {"supervisor", "engine", "frontend"}
    assert v(p, "process_cpu_seconds_total") is not None  # the supervisor's own, as one process has them
    # ModelStatistics is the engine's alone, and agrees with the summed series.
    snap = engine("snapshot")
    assert (snap["success"], snap["fail"], snap["inference_count"], snap["execution_count"]) == (12, 2, 12, 3)
    assert f0("own", name="svertka_requests_total", labels={**M, "api": "image", "code": "OK"})["value"] == 7
    assert f0("snapshot")["success"] == 0, "a frontend keeps no statistics of its own"

    # SIGKILL a frontend: nothing it counted is lost, its in-flight requests are no longer counted.
    sup.kill(f1)
    assert not list(sup.path.glob(f"*_{f1.pid}.db")), "its files are folded or dropped"
    assert (sup.path / "counter_dead.db").exists() and (sup.path / "histogram_dead.db").exists()
    p = sup.scrape()
    assert v(p, "svertka_requests_total", **M, api="image", code="OK") == 12
    assert v(p, "svertka_requests_total", **M, api="tensor", code="INVALID_ARGUMENT") == 2
    assert math.isclose(v(p, "svertka_request_duration_seconds_sum", **M, api="image"), 7 * 0.004 + 5 * 0.2)
    assert series(p, "svertka_frontend_in_flight_requests") == {(("frontend", "0"),): 3}

    # Started again, twice: its new counts add up, its restarts are counted under its index.
    f1 = sup.restart(1)
    f1("requests", n=4, api="image", code="OK", s=0.05)
    f1("accept", n=2)
    p = sup.scrape()
    assert v(p, "svertka_requests_total", **M, api="image", code="OK") == 16
    assert v(p, "svertka_request_duration_seconds_bucket", **M, api="image", le="0.1") == 11
    assert series(p, "svertka_frontend_in_flight_requests") == {
        (("frontend", "0"),): 3,
        (("frontend", "1"),): 2,
    }
    assert v(p, "svertka_frontend_restarts_total", frontend="1") == 1
    sup.kill(f1)
    f1 = sup.restart(1)
    f1("requests", n=1, api="image", code="OK", s=0.05)
    f0("answer", n=3)
    p = sup.scrape()
    assert v(p, "svertka_requests_total", **M, api="image", code="OK") == 17
    assert v(p, "grpc_server_handled_total", **grpc, grpc_code="OK") == 17
    assert v(p, "svertka_frontend_restarts_total", frontend="1") == 2
    assert v(p, "svertka_frontend_restarts_total", frontend="0") == 0
    assert series(p, "svertka_frontend_in_flight_requests") == {
        (("frontend", "0"),): 0,
        (("frontend", "1"),): 0,
    }
    assert sorted(f.name for f in sup.path.glob("*_dead.db")) == ["counter_dead.db", "histogram_dead.db"]

    # Unloaded: its gauges are gone from the page (as with one process); its counters stay.
    engine("remove")
    p = sup.scrape()
    for name in (
        "svertka_model_ready",
        "svertka_model_info",
        "svertka_queue_depth",
        "svertka_in_flight_requests",
    ):
        assert not series(p, name), name
    assert not series(p, "svertka_queue_capacity_rows")
    assert v(p, "svertka_requests_total", **M, api="image", code="OK") == 17
    # Loaded again (new weights): one info series, the gauges back from 0, the counters continue.
    engine("load", sha="bbbbbbbbbbbb")
    f0("requests", n=1, api="image", code="OK", s=0.004)
    p = sup.scrape()
    assert series(p, "svertka_model_ready") == {tuple(sorted(M.items())): 1}
    (info,) = series(p, "svertka_model_info")
    assert dict(info)["sha256"] == "bbbbbbbbbbbb"
    assert v(p, "svertka_queue_depth", **M) == 0 and v(p, "svertka_in_flight_requests", **M) == 0
    assert v(p, "svertka_requests_total", **M, api="image", code="OK") == 18


def test_counters_stay_monotone_and_exact_while_processes_write_and_die(supervisor_env: Supervisor) -> None:
    sup = supervisor_env
    f0, f1 = sup.start("frontend", 0), sup.start("frontend", 1)
    f0("spin")
    f1("spin")
    key = "svertka_requests_total"
    for _ in range(5):
        sup.scrape()  # each checks nothing went down since the page before
        time.sleep(0.05)
    sup.kill(f0)  # mid-write
    killed = MultiProcessCollector.merge([str(sup.path / "counter_dead.db")], accumulate=False)
    (dead,) = [
        s.value
        for m in killed
        for s in m.samples
        if s.name == key and s.labels == {**M, "api": "image", "code": "OK"}
    ]
    assert dead > 0
    f0 = sup.restart(0)
    f0("spin")
    for _ in range(5):
        sup.scrape()
        time.sleep(0.05)
    spun = f0("stop")["spun"] + f1("stop")["spun"]
    p = sup.scrape()
    assert v(p, key, **M, api="image", code="OK") == dead + spun, "each request counted exactly once"
    assert v(p, "svertka_frontend_restarts_total", frontend="0") == 1


def test_mark_process_dead_keeps_the_sum_of_two_folded_processes(tmp_path: Path) -> None:
    # The folding on its own, on files written by hand in prometheus_client's format.
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    key = mmap_key(
        "svertka_batches", "svertka_batches_total", ["model", "version"], ["tiny", "1"], "Batches executed."
    )
    for pid, n in ((101, 2.0), (102, 3.0), (103, 4.0)):
        d = MmapedDict(str(tmp_path / f"counter_{pid}.db"))
        d.write_value(key, n, 0.0)
        d.close()
    (tmp_path / "gauge_livesum_101.db").write_bytes(b"")
    mark_process_dead(101, tmp_path)
    mark_process_dead(102, tmp_path)
    mark_process_dead(999, tmp_path)  # nothing of it: nothing happens
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_103.db", "counter_dead.db"]
    (metric,) = MultiProcessCollector.merge([str(p) for p in tmp_path.glob("*.db")])
    assert [(s.name, s.value) for s in metric.samples] == [("svertka_batches_total", 9.0)]


def test_multiprocess_metrics_refuse_a_process_without_the_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(RuntimeError, match="prepare_multiprocess"):
        Metrics(multiprocess=True)
    with pytest.raises(ValueError, match="frontend"):
        Metrics(frontend=0)
    with pytest.raises(ValueError, match=ENV):
        mark_process_dead(1)
    with pytest.raises(RuntimeError, match="supervisor"):
        Metrics.start_http(_FakeMultiprocess(), "127.0.0.1", 0)  # type: ignore[arg-type]


class _FakeMultiprocess:
    multiprocess = True
    _http = None


def test_one_process_records_series_and_statistics_together_or_apart() -> None:
    m = Metrics(CollectorRegistry(), process_metrics=False, gpu_metrics=False)
    assert not m.multiprocess and m.frontend is None
    rec = m.model("tiny", 1)
    rec.request(api="image", code="OK", duration_s=0.01, queue_s=0.002, compute_s=0.003)
    rec.request(api="image", code="OK", duration_s=0.01, statistics=False)  # a frontend's half
    rec.request(api="image", code="INTERNAL", duration_s=0.02, series=False)  # the engine's half
    rec.request_series(api="tensor", code="OK", duration_s=0.01)
    rec.request_statistics(code="OK", duration_s=0.01, compute_s=0.001)

    def count(api: str, code: str) -> float | None:
        return m.registry.get_sample_value("svertka_requests_total", {**M, "api": api, "code": code})

    assert (count("image", "OK"), count("image", "INTERNAL"), count("tensor", "OK")) == (2, 0, 1)
    snap = rec.snapshot()
    assert (snap.success.count, snap.fail.count) == (2, 1)
    assert snap.queue.ns == 2_000_000 and snap.compute_infer.ns == 4_000_000
    # A frontend's sink gets the outcome in place of its statistics; the engine records it.
    frontend = Metrics(CollectorRegistry(), process_metrics=False, gpu_metrics=False)
    sent: list[dict] = []
    frontend.statistics_sink = sent.append
    frontend.model("tiny", 1).request(api="tensor", code="OK", duration_s=0.5, queue_s=0.25, compute_s=0.125)
    assert frontend.model("tiny", 1).snapshot().success.count == 0
    assert (
        frontend.registry.get_sample_value("svertka_requests_total", {**M, "api": "tensor", "code": "OK"})
        == 1
    )
    (outcome,) = sent
    assert outcome == {
        "model": "tiny",
        "version": 1,
        "api": "tensor",
        "code": "OK",
        "duration_s": 0.5,
        "queue_s": 0.25,
        "compute_s": 0.125,
        "compute_input_s": 0.0,
        "compute_output_s": 0.0,
    }
    model, version = outcome.pop("model"), outcome.pop("version")
    m.model(model, version).request(**outcome, series=False)
    snap = rec.snapshot()
    assert (snap.success.count, snap.success.ns, snap.queue.ns) == (3, 520_000_000, 252_000_000)
    assert count("tensor", "OK") == 1, "the engine's half adds no series"
    frontend.statistics_sink = lambda outcome: 1 / 0  # a broken sink never fails the request
    frontend.model("tiny", 1).request(api="tensor", code="OK", duration_s=0.5)
    m.frontend_request_started()  # no-op outside a frontend process
    m.frontend_request_finished()
    assert m.registry.get_sample_value("svertka_frontend_in_flight_requests", {"frontend": "0"}) is None
    with pytest.raises(ValueError):
        rec.request(api="nope", code="OK", duration_s=0.0)
