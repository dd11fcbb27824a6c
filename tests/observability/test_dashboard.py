"""The Grafana dashboard imports as is and asks only for metrics svertka defines.

The live check (names present in a real scrape, queries run by a real
Prometheus) is in test_live_prometheus.py; this one needs no server.
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CollectorRegistry

from service import metrics as metrics_module
from service.metrics import Metrics, SupervisorMetrics
from tests.observability import artifacts


def test_dashboard_is_self_contained_and_importable() -> None:
    d = artifacts.dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    assert "id" not in d or d["id"] is None  # an id from another Grafana would clash on import
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    panels = artifacts.dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
    # no two panels overlap on the 24-column grid
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))


def test_dashboard_covers_what_operators_ask_for() -> None:
    used = set()
    for expr in artifacts.dashboard_exprs():
        used |= artifacts.metric_names(expr)
    required = {
        "svertka_requests_total",  # throughput, errors by code
        "svertka_inferences_total",
        "svertka_request_duration_seconds_bucket",  # latency percentiles
        "svertka_queue_wait_seconds_bucket",  # ... per stage
        "svertka_preprocess_seconds_bucket",
        "svertka_batch_compute_seconds_bucket",
        "svertka_postprocess_seconds_bucket",
        "svertka_batch_size_bucket",  # batch-size distribution
        "svertka_queue_depth",
        "svertka_model_info",  # provider / precision
        # several processes (svertka serve --frontends N): per frontend and per process
        "svertka_frontend_in_flight_requests",
        "svertka_frontend_restarts_total",
        "svertka_process_cpu_seconds_total",
        "svertka_process_resident_memory_bytes",
        "svertka_process_open_fds",
    }
    assert required <= used, required - used
    exprs = " ".join(artifacts.dashboard_exprs())
    assert "by (model, code)" in exprs
    assert "provider, precision" in exprs
    assert "by (instance, frontend)" in exprs and "by (instance, role, frontend)" in exprs


def test_process_panels_are_right_with_one_process_and_with_several() -> None:
    """``process_*`` is the supervisor alone with several processes: never used without ``svertka_process_*``.

    Each expression on prometheus_client's process series sums ``svertka_process_*`` (every process of
    a replica with several) and falls back, per instance, to ``process_*`` (the one process) with
    ``or on (instance)``, in that order. No rule uses ``process_*``.
    """
    checked = 0
    for expr in artifacts.dashboard_exprs():
        names = artifacts.metric_names(expr)
        for name in {n for n in names if n.startswith("process_")}:
            assert f"svertka_{name}" in names, expr
            left, sep, right = expr.partition(" or on (instance) ")
            assert sep and f"svertka_{name}" in left and name in artifacts.metric_names(right), expr
            assert left.startswith("sum by (instance) (") and right.startswith("sum by (instance) ("), expr
            checked += 1
    assert checked == 3  # CPU, resident memory, open fds
    for expr in artifacts.rule_exprs():
        assert not {n for n in artifacts.metric_names(expr) if n.startswith("process_")}, expr


def test_panels_only_several_processes_fill_are_in_their_own_row() -> None:
    """A panel that is empty with one process sits under the row that says so."""
    panels = sorted(artifacts.dashboard_panels(), key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    row = None
    multiprocess_only = []
    for p in panels:
        if p["type"] == "row":
            row = p
            continue
        names = set().union(*(artifacts.metric_names(t["expr"]) for t in p["targets"]))
        if names <= artifacts.MULTIPROCESS_ONLY:
            assert row is not None and "--frontends" in row["title"], p["title"]
            assert "empty with one process" in row["title"]
            multiprocess_only.append(p["title"])
    assert len(multiprocess_only) == 4, multiprocess_only


def test_every_referenced_name_is_defined_by_metrics_module(tmp_path) -> None:
    """Names the dashboard and rules use exist in the exposition of a Metrics object with traffic.

    Those of a server with several processes, in the supervisor's (``SupervisorMetrics``), or, for
    the one a frontend process exports, in service/metrics.py (tests/observability/
    test_metrics_multiprocess.py and test_live_prometheus.py scrape it from real processes).
    """
    m = Metrics(CollectorRegistry())
    rec = m.model("digits", 1)
    rec.request(api="image", code="OK", duration_s=0.01)
    rec.batch(2, input_s=0, infer_s=0.001, output_s=0)
    for method in ("preprocess", "queued", "postprocess"):
        getattr(rec, method)(0.001)
    rec.rejected("queue_full")
    rec.set_queue_capacity(256)
    m.set_model_info("digits", 1, provider="CPUExecutionProvider", precision="fp32", arch="resnet20")
    m.set_model_ready("digits", 1, True)
    m.set_reload_failed("digits", False)
    m.grpc_handled.labels("s", "m", "unary", "OK").inc()
    exported = {s.name for fam in m.registry.collect() for s in fam.samples}
    missing = (
        artifacts.referenced_server_metrics() - exported - artifacts.GPU_ONLY - artifacts.MULTIPROCESS_ONLY
    )
    assert not missing, f"dashboard/rules reference metrics svertka does not export: {sorted(missing)}"
    assert not exported & artifacts.MULTIPROCESS_ONLY  # with one process: none of them
    supervisor = SupervisorMetrics(tmp_path, frontends=2, gpu_metrics=False)
    supervisor.process_started("engine", 0, os.getpid())
    supervisor.process_started("frontend", 0, os.getpid())
    from_supervisor = {s.name for fam in supervisor.registry.collect() for s in fam.samples}
    src = Path(metrics_module.__file__).read_text()
    for name in artifacts.MULTIPROCESS_ONLY:
        assert name in from_supervisor or f'"{name}"' in src, name
    assert artifacts.referenced_server_metrics() & artifacts.MULTIPROCESS_ONLY <= from_supervisor | {
        "svertka_frontend_in_flight_requests"
    }
    # and the GPU names the dashboard uses are the ones the NVML collector would export
    from service import gpu_metrics

    src = open(gpu_metrics.__file__).read()
    for name in artifacts.referenced_server_metrics() & artifacts.GPU_ONLY:
        assert f'"{name}"' in src


def test_metric_name_extraction() -> None:
    got = artifacts.metric_names(
        'histogram_quantile(0.99, sum by (le, model) (rate(a_seconds_bucket{model=~"$model", le="0.1"}'
        "[$__rate_interval]))) / on (model) group_left b_total offset 5m > 1e3 unless c"
    )
    assert got == {"a_seconds_bucket", "b_total", "c"}
