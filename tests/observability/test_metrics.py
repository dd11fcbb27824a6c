"""Every recording point of service.metrics, each on a fresh registry.

Values are read back the way Prometheus would see them (the registry's
samples and the text exposition over real HTTP), and the Triton-style
snapshot is checked against the same calls, because ModelStatistics and the
counters must agree.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from service import config
from service.metrics import BATCH_SIZE_BUCKETS, Metrics, latency_buckets
from service.model_recorder import Duration

M = {"model": "tiny", "version": "1"}


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def test_fresh_registry_each_time_and_no_global_registration() -> None:
    from prometheus_client import REGISTRY

    before = set(REGISTRY._names_to_collectors)
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" if they shared a registry
    assert a.registry is not b.registry
    assert set(REGISTRY._names_to_collectors) == before
    a.model("m", 1).request(api="image", code="OK", duration_s=0.01)
    assert value(b, "svertka_requests_total", **M) is None


def test_latency_buckets_have_exact_slo_bound_and_span_sub_ms_to_tens_of_s() -> None:
    b = latency_buckets(config.DEFAULT_LATENCY_SLO_S)
    assert config.DEFAULT_LATENCY_SLO_S in b
    assert b[0] < 0.001 and b[-1] >= 10
    assert list(b) == sorted(set(b))
    assert 0.123 in latency_buckets(0.123)
    with pytest.raises(ValueError):
        latency_buckets(0)


def test_histogram_has_bucket_at_configured_slo() -> None:
    m = Metrics(latency_slo_s=0.2)
    rec = m.model("tiny", 1)
    rec.request(api="image", code="OK", duration_s=0.19)
    rec.request(api="image", code="OK", duration_s=0.21)
    le = {**M, "api": "image", "le": "0.2"}
    assert value(m, "svertka_request_duration_seconds_bucket", **le) == 1
    assert value(m, "svertka_latency_slo_seconds") == 0.2


def test_model_recorder_is_idempotent(metrics: Metrics) -> None:
    assert metrics.model("tiny", 1) is metrics.model("tiny", 1)
    assert metrics.model("tiny", 1) is not metrics.model("tiny", 2)


def test_request_counts_by_api_and_code_and_duration(metrics: Metrics) -> None:
    rec = metrics.model("tiny", 1)
    rec.request(api="image", code="OK", duration_s=0.004, queue_s=0.001, compute_s=0.002)
    rec.request(api="image", code="OK", duration_s=0.3)
    rec.request(api="tensor", code="INVALID_ARGUMENT", duration_s=0.001)
    assert value(metrics, "svertka_requests_total", **M, api="image", code="OK") == 2
    assert value(metrics, "svertka_requests_total", **M, api="tensor", code="INVALID_ARGUMENT") == 1
    assert value(metrics, "svertka_requests_total", **M, api="tensor", code="OK") == 0
    assert value(metrics, "svertka_request_duration_seconds_count", **M, api="image") == 2
    assert value(metrics, "svertka_request_duration_seconds_sum", **M, api="image") == pytest.approx(0.304)
    assert value(metrics, "svertka_request_duration_seconds_bucket", **M, api="image", le="0.1") == 1
    with pytest.raises(ValueError):
        rec.request(api="rest", code="OK", duration_s=0.1)


def test_snapshot_success_fail_queue_compute_follow_triton_semantics(metrics: Metrics) -> None:
    rec = metrics.model("tiny", 1)
    rec.request(api="image", code="OK", duration_s=0.010, queue_s=0.002, compute_s=0.005)
    rec.request(
        api="tensor",
        code="OK",
        duration_s=0.020,
        queue_s=0.003,
        compute_s=0.010,
        compute_input_s=0.001,
        compute_output_s=0.002,
    )
    rec.request(api="tensor", code="RESOURCE_EXHAUSTED", duration_s=0.0005, queue_s=0.5, compute_s=1.0)
    s = rec.snapshot()
    assert s.success == Duration(2, 30_000_000)
    assert s.fail == Duration(1, 500_000)
    # queue / compute count successful requests only, as Triton does
    assert s.queue == Duration(2, 5_000_000)
    assert s.compute_input == Duration(2, 1_000_000)
    assert s.compute_infer == Duration(2, 12_000_000)
    assert s.compute_output == Duration(2, 2_000_000)
    total = sum(
        value(metrics, "svertka_requests_total", **M, api=a, code=c) or 0
        for a in ("image", "tensor")
        for c in ("OK", "RESOURCE_EXHAUSTED")
    )
    assert total == s.success.count + s.fail.count


def test_batch_updates_counters_histograms_and_snapshot_together(metrics: Metrics) -> None:
    rec = metrics.model("tiny", 1)
    assert rec.snapshot().last_inference_ms == 0
    rec.batch(4, input_s=0.001, infer_s=0.004, output_s=0.0005)
    rec.batch(4, input_s=0.001, infer_s=0.006, output_s=0.0005)
    rec.batch(1, input_s=0.0, infer_s=0.002, output_s=0.0)
    assert value(metrics, "svertka_inferences_total", **M) == 9
    assert value(metrics, "svertka_batches_total", **M) == 3
    assert value(metrics, "svertka_batch_size_count", **M) == 3
    assert value(metrics, "svertka_batch_size_sum", **M) == 9
    assert value(metrics, "svertka_batch_size_bucket", **M, le="1.0") == 1
    assert value(metrics, "svertka_batch_size_bucket", **M, le="4.0") == 3
    assert value(metrics, "svertka_batch_compute_seconds_count", **M) == 3
    assert value(metrics, "svertka_batch_compute_seconds_sum", **M) == pytest.approx(0.015)
    s = rec.snapshot()
    assert (s.inference_count, s.execution_count) == (9, 3)
    assert s.last_inference_ms > 1_600_000_000_000  # wall-clock ms, as Triton reports it
    assert s.batch_stats[4] == (Duration(2, 2_000_000), Duration(2, 10_000_000), Duration(2, 1_000_000))
    assert s.batch_stats[1][1] == Duration(1, 2_000_000)
    assert sorted(s.batch_stats) == [1, 4]
    with pytest.raises(ValueError):
        rec.batch(0, input_s=0, infer_s=0, output_s=0)
    assert BATCH_SIZE_BUCKETS[0] == 1


def test_snapshot_is_a_copy(metrics: Metrics) -> None:
    rec = metrics.model("tiny", 1)
    rec.batch(2, input_s=0, infer_s=0.001, output_s=0)
    s = rec.snapshot()
    rec.batch(2, input_s=0, infer_s=0.001, output_s=0)
    assert s.batch_stats[2][1].count == 1 and rec.snapshot().batch_stats[2][1].count == 2


@pytest.mark.parametrize(
    "method, metric",
    [
        ("preprocess", "svertka_preprocess_seconds"),
        ("queued", "svertka_queue_wait_seconds"),
        ("postprocess", "svertka_postprocess_seconds"),
    ],
)
def test_stage_histograms(metrics: Metrics, method: str, metric: str) -> None:
    rec = metrics.model("tiny", 1)
    getattr(rec, method)(0.0004)
    getattr(rec, method)(0.2)
    assert value(metrics, f"{metric}_count", **M) == 2
    assert value(metrics, f"{metric}_sum", **M) == pytest.approx(0.2004)
    assert value(metrics, f"{metric}_bucket", **M, le="0.0005") == 1
    assert value(metrics, f"{metric}_bucket", **M, le="+Inf") == 2


def test_rejections_by_reason_and_unknown_reason_refused(metrics: Metrics) -> None:
    rec = metrics.model("tiny", 1)
    for reason in ("queue_full", "queue_full", "deadline", "cancelled", "invalid_input"):
        rec.rejected(reason)
    assert value(metrics, "svertka_rejections_total", **M, reason="queue_full") == 2
    for reason in ("deadline", "cancelled", "invalid_input"):
        assert value(metrics, "svertka_rejections_total", **M, reason=reason) == 1
    with pytest.raises(ValueError):
        rec.rejected("request-1234")  # a free-form reason would be a cardinality leak


def test_queue_depth_and_in_flight_gauges(metrics: Metrics) -> None:
    rec = metrics.model("tiny", 1)
    rec.queue_depth.inc(5)
    rec.queue_depth.dec(2)
    rec.in_flight.inc()
    assert value(metrics, "svertka_queue_depth", **M) == 3
    assert value(metrics, "svertka_in_flight_requests", **M) == 1
    rec.in_flight.dec()
    assert value(metrics, "svertka_in_flight_requests", **M) == 0


def test_model_info_readiness_and_relabel_on_provider_change(metrics: Metrics) -> None:
    metrics.set_model_info(
        "tiny", 1, provider="CUDAExecutionProvider", precision="fp16", arch="resnet20", sha256="aaaaaaaaaaaa"
    )
    metrics.set_model_info(
        "tiny", 1, provider="CPUExecutionProvider", precision="fp32", arch="resnet20", sha256="aaaaaaaaaaaa"
    )
    info = dict(M, arch="resnet20")
    cpu = dict(info, provider="CPUExecutionProvider", precision="fp32")
    assert value(metrics, "svertka_model_info", **cpu, sha256="aaaaaaaaaaaa") == 1
    # the old combination is gone, so count(svertka_model_info) is the number of loaded versions
    assert (
        value(
            metrics,
            "svertka_model_info",
            **info,
            provider="CUDAExecutionProvider",
            precision="fp16",
            sha256="aaaaaaaaaaaa",
        )
        is None
    )
    # new weights under the same version (a file replaced in place): the series follows them
    metrics.set_model_info(
        "tiny", 1, provider="CPUExecutionProvider", precision="fp32", arch="resnet20", sha256="bbbbbbbbbbbb"
    )
    assert value(metrics, "svertka_model_info", **cpu, sha256="bbbbbbbbbbbb") == 1
    assert value(metrics, "svertka_model_info", **cpu, sha256="aaaaaaaaaaaa") is None
    metrics.set_model_ready("tiny", 1, False)
    assert value(metrics, "svertka_model_ready", **M) == 0
    metrics.set_model_ready("tiny", 1, True)
    assert value(metrics, "svertka_model_ready", **M) == 1


def test_remove_model_drops_only_that_version(metrics: Metrics) -> None:
    for v in (1, 2):
        rec = metrics.model("tiny", v)
        rec.request(api="image", code="OK", duration_s=0.01)
        rec.request(api="image", code="NOT_FOUND", duration_s=0.01)
        rec.batch(1, input_s=0, infer_s=0.001, output_s=0)
        rec.rejected("deadline")
        metrics.set_model_info("tiny", v, provider="CPUExecutionProvider", precision="fp32", arch="a")
        metrics.set_model_ready("tiny", v, True)
    old = metrics.model("tiny", 1)
    metrics.remove_model("tiny", 1)
    text = "\n".join(
        f"{s.name}{s.labels}"
        for fam in metrics.registry.collect()
        for s in fam.samples
        if s.labels.get("model") == "tiny"
    )
    assert "'version': '1'" not in text
    assert value(metrics, "svertka_requests_total", model="tiny", version="2", api="image", code="OK") == 1
    assert value(metrics, "svertka_model_ready", model="tiny", version="2") == 1
    # a reload gets a fresh recorder and fresh series
    new = metrics.model("tiny", 1)
    assert new is not old and new.snapshot().inference_count == 0


def test_build_info_and_process_metrics_present(metrics: Metrics) -> None:
    from service import __version__

    fams = {f.name: f for f in metrics.registry.collect()}
    (sample,) = fams["svertka_build_info"].samples
    assert sample.value == 1 and sample.labels["version"] == __version__
    assert sample.labels["onnxruntime"]  # the version actually installed, not a placeholder
    assert value(metrics, "process_resident_memory_bytes") > 0
    assert value(metrics, "process_open_fds") > 0
    # The CPU counter is a counter and follows this process's work: burn 0.2 s of CPU, see it move.
    assert fams["process_cpu_seconds"].type == "counter"
    before = value(metrics, "process_cpu_seconds_total")
    burn_until = time.process_time() + 0.2
    while time.process_time() < burn_until:
        sum(range(10_000))
    assert value(metrics, "process_cpu_seconds_total") - before >= 0.1


def test_thread_safe_counts(metrics: Metrics) -> None:
    rec = metrics.model("tiny", 1)

    def work() -> None:
        for _ in range(2000):
            rec.batch(2, input_s=0, infer_s=1e-6, output_s=0)
            rec.request(api="tensor", code="OK", duration_s=1e-6)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = rec.snapshot()
    assert (s.inference_count, s.execution_count, s.success.count) == (16000, 8000, 8000)
    assert value(metrics, "svertka_inferences_total", **M) == 16000


def test_http_endpoint_port_zero_serves_exposition(metrics: Metrics) -> None:
    metrics.model("tiny", 1).request(api="image", code="OK", duration_s=0.01)
    port = metrics.start_http("127.0.0.1", 0)
    try:
        assert port > 0
        with pytest.raises(RuntimeError):
            metrics.start_http("127.0.0.1", 0)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        metrics.stop_http()
    names = {f.name for f in text_string_to_metric_families(body)}
    assert {"svertka_requests", "svertka_request_duration_seconds", "process_resident_memory_bytes"} <= names
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    metrics.stop_http()  # idempotent


def test_two_servers_in_one_process_on_separate_ports() -> None:
    a, b = Metrics(), Metrics()
    pa, pb = a.start_http("127.0.0.1", 0), b.start_http("127.0.0.1", 0)
    try:
        assert pa != pb
        a.model("only-a", 1).request(api="image", code="OK", duration_s=0.01)
        body_b = urllib.request.urlopen(f"http://127.0.0.1:{pb}/metrics", timeout=10).read().decode()
        assert "only-a" not in body_b
    finally:
        a.stop_http()
        b.stop_http()


def test_queue_capacity_absent_until_reported(metrics: Metrics) -> None:
    rec = metrics.model("tiny", 1)
    # absent (not 0) so depth/capacity is absent rather than a division by zero
    assert value(metrics, "svertka_queue_capacity_rows", **M) is None
    rec.set_queue_capacity(256)
    assert value(metrics, "svertka_queue_capacity_rows", **M) == 256
    metrics.remove_model("tiny", 1)
    assert value(metrics, "svertka_queue_capacity_rows", **M) is None


def test_error_series_exist_at_zero_before_the_first_error(metrics: Metrics) -> None:
    """rate() needs a sample before the first increment; otherwise the first INTERNAL is invisible."""
    metrics.model("tiny", 1)
    for api in ("image", "tensor"):
        for code in ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "INTERNAL"):
            assert value(metrics, "svertka_requests_total", **M, api=api, code=code) == 0
