"""The Grafana dashboard imports as is and asks only for metrics svertka defines.

The live check (names present in a real scrape, queries run by a real
Prometheus) is in test_live_prometheus.py; this one needs no server.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from service.metrics import Metrics
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
    }
    assert required <= used, required - used
    exprs = " ".join(artifacts.dashboard_exprs())
    assert "by (model, code)" in exprs
    assert "provider, precision" in exprs


def test_every_referenced_name_is_defined_by_metrics_module() -> None:
    """Names the dashboard and rules use exist in the exposition of a Metrics object with traffic."""
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
    m.grpc_handled.labels("s", "m", "unary", "OK").inc()
    exported = {s.name for fam in m.registry.collect() for s in fam.samples}
    missing = artifacts.referenced_server_metrics() - exported - artifacts.GPU_ONLY
    assert not missing, f"dashboard/rules reference metrics svertka does not export: {sorted(missing)}"
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
