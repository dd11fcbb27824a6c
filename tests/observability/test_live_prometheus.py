"""svertka's metrics as operators get them: a real server, real clients, a real Prometheus.

One ``svertka serve`` subprocess (tiny real ONNX model) and one Debian
Prometheus scraping it every second, once for each server layout
(``tests/reliability/harness.py``'s ``LAYOUTS``: one process, and a
supervisor with an engine and two frontend processes whose counters the one
``/metrics`` sums). A known mix of requests is sent through both APIs — some
failing on purpose, the concurrent ones each on its own connection so that
both frontends take some — and then:

- ``promtool check metrics`` on the live scrape is clean;
- every metric name the dashboard and the rules use is in that scrape;
- PromQL through Prometheus' HTTP API shows exactly the requests sent, by
  code; inferences equal the images/rows sent; histogram_quantile latencies
  lie within what the client measured;
- every dashboard query and every rule evaluates in a real Prometheus;
- ModelStatistics equals the counters; the access log has one line per request;
- with two frontends: every process's series, and a frontend killed three
  times shows in the restart counter, its panel and a pending
  SvertkaFrontendRestarting, with no counter gone back.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest

from bench.target import ServerProcess
from service.metrics import latency_buckets
from tests.observability import artifacts, live
from tests.reliability.harness import LAYOUTS, layout_args, samples_of

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(
        live.PROMETHEUS is None or live.PROMTOOL is None, reason="needs prometheus + promtool"
    ),
]

MODEL = "tiny"
SIZE = 32
N_OK = 40  # valid images, unary Classify
N_BAD = 6  # undecodable bytes -> INVALID_ARGUMENT
N_MISSING = 3  # unknown model -> NOT_FOUND (no model: only the gRPC metrics see it)
TENSOR_REQUESTS = 2  # ModelInfer with TENSOR_ROWS rows each
TENSOR_ROWS = 3
FAIL_ABOVE = 50.0  # the model raises in onnxruntime on any input above this: a real INTERNAL
N_INTERNAL = 1
BROKEN = "broken"  # a corrupt model file: known to the server, never ready


@dataclass
class Traffic:
    layout: str  # one of LAYOUTS
    server: ServerProcess
    prom: live.Prometheus
    baseline: dict[str, float]
    client_latency_s: list[float] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)


def _png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for (n, lv), v in samples_of(text).items():
        if n == name and all(dict(lv).get(k) == want for k, want in labels.items()):
            total += v
    return total


@pytest.fixture(scope="module", params=LAYOUTS)
def traffic(request, tmp_path_factory) -> Traffic:
    from service.gen.inference import grpc_service_pb2 as pb
    from service.gen.inference import grpc_service_pb2_grpc as pb_grpc
    from service.gen.svertka.v1 import classifier_pb2 as cpb
    from service.gen.svertka.v1 import classifier_pb2_grpc as cpb_grpc
    from tests.helpers.tinymodel import make_repository, write_corrupt_model

    layout = request.param
    work = tmp_path_factory.mktemp(f"live-obs-{layout}")
    repo = make_repository(work / "repo", {MODEL: [1]}, fail_above=FAIL_ABOVE)
    write_corrupt_model(repo / BROKEN / "1" / "model.onnx", "garbage")
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(
            live.svertka_server(repo, work, *layout_args(layout), "--access-log", "--log-format", "json")
        )
        prom_dir = work / "prom"
        prom_dir.mkdir()
        prom = stack.enter_context(
            live.prometheus_server(prom_dir, [server.metrics_url.split("/")[2]], artifacts.RULES)
        )
        live.wait_until(
            lambda: prom.scalar('up{job="svertka"}') == 1, 30, "first scrape", prom.proc, prom.log
        )
        before = server.scrape()
        baseline = {
            "inferences": _sum(before, "svertka_inferences_total", model=MODEL),
            "batch_rows": _sum(before, "svertka_batch_size_sum", model=MODEL),
        }
        t = Traffic(layout, server, prom, baseline)

        with grpc.insecure_channel(server.address) as ch:
            classify = cpb_grpc.ImageClassifierStub(ch).Classify

            def one(i: int) -> float:
                # A connection of its own (SO_REUSEPORT hands each connection to one frontend), made
                # before the clock starts.
                own = grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
                with own:
                    grpc.channel_ready_future(own).result(timeout=30)
                    req = cpb.ClassifyRequest(model=MODEL, image=_png(i), top_k=3, id=f"obs-ok-{i}")
                    start = time.perf_counter()
                    resp = cpb_grpc.ImageClassifierStub(own).Classify(req, timeout=30)
                    elapsed = time.perf_counter() - start
                assert len(resp.predictions) == 3
                return elapsed

            with ThreadPoolExecutor(8) as pool:  # concurrent, so batches of more than one form
                t.client_latency_s = list(pool.map(one, range(N_OK)))
            t.ids = [f"obs-ok-{i}" for i in range(N_OK)]
            for i in range(N_BAD):
                start = time.perf_counter()
                with pytest.raises(grpc.RpcError) as err:
                    classify(
                        cpb.ClassifyRequest(model=MODEL, image=b"not an image" * (i + 1), id=f"obs-bad-{i}")
                    )
                t.client_latency_s.append(time.perf_counter() - start)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                t.ids.append(f"obs-bad-{i}")
            for _ in range(N_MISSING):
                with pytest.raises(grpc.RpcError) as err:
                    classify(cpb.ClassifyRequest(model="no-such-model", image=_png(0)))
                assert err.value.code() == grpc.StatusCode.NOT_FOUND

            infer = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer
            rows = np.random.default_rng(1).normal(size=(TENSOR_ROWS, 3, SIZE, SIZE)).astype(np.float32)
            for i in range(TENSOR_REQUESTS):
                req = pb.ModelInferRequest(model_name=MODEL, id=f"obs-tensor-{i}")
                tensor = req.inputs.add()
                tensor.name, tensor.datatype = "input", "FP32"
                tensor.shape.extend(rows.shape)
                req.raw_input_contents.append(rows.tobytes())
                resp = infer(req, timeout=30)
                assert list(resp.outputs[0].shape) == [TENSOR_ROWS, 10]
                t.ids.append(f"obs-tensor-{i}")
            for i in range(N_INTERNAL):
                req = pb.ModelInferRequest(model_name=MODEL, id=f"obs-internal-{i}")
                tensor = req.inputs.add()
                tensor.name, tensor.datatype = "input", "FP32"
                tensor.shape.extend([1, 3, SIZE, SIZE])
                req.raw_input_contents.append(np.full((1, 3, SIZE, SIZE), 1000.0, np.float32).tobytes())
                with pytest.raises(grpc.RpcError) as err:
                    infer(req, timeout=30)
                assert err.value.code() == grpc.StatusCode.INTERNAL
                t.ids.append(f"obs-internal-{i}")

        # Wait until Prometheus has scraped the final state (one more scrape after the last request).
        total = N_OK + N_BAD + TENSOR_REQUESTS + N_INTERNAL
        live.wait_until(
            lambda: prom.scalar(f'sum(svertka_requests_total{{model="{MODEL}"}})') == total,
            30,
            "Prometheus sees every request",
            prom.proc,
            prom.log,
        )
        yield t


def test_promtool_check_metrics_on_live_scrape_is_clean(traffic: Traffic) -> None:
    text = traffic.server.scrape()
    res = subprocess.run(
        [live.PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res.stdout + res.stderr


def test_every_metric_the_dashboard_and_rules_use_is_in_the_live_scrape(traffic: Traffic) -> None:
    exported = {name for name, _ in samples_of(traffic.server.scrape())}
    missing = artifacts.referenced_server_metrics() - exported - artifacts.GPU_ONLY
    if traffic.layout == "one-process":
        assert not exported & artifacts.MULTIPROCESS_ONLY
        missing -= artifacts.MULTIPROCESS_ONLY
    assert not missing, f"referenced but not exported by a running svertka: {sorted(missing)}"


def test_prometheus_counts_exactly_what_was_sent(traffic: Traffic) -> None:
    prom = traffic.prom
    by_code = {
        (r["metric"]["api"], r["metric"]["code"]): float(r["value"][1])
        for r in prom.query(f'sum by (api, code) (svertka_requests_total{{model="{MODEL}"}}) > 0')
    }
    assert by_code == {
        ("image", "OK"): N_OK,
        ("image", "INVALID_ARGUMENT"): N_BAD,
        ("tensor", "OK"): TENSOR_REQUESTS,
        ("tensor", "INTERNAL"): N_INTERNAL,
    }
    # images/rows inferred: the valid images plus the tensor rows; undecodable images never reach the
    # model, and the batch that failed in onnxruntime inferred nothing
    inferred = (
        prom.scalar(f'sum(svertka_inferences_total{{model="{MODEL}"}})') - traffic.baseline["inferences"]
    )
    assert inferred == N_OK + TENSOR_REQUESTS * TENSOR_ROWS
    rows = prom.scalar(f'sum(svertka_batch_size_sum{{model="{MODEL}"}})') - traffic.baseline["batch_rows"]
    assert rows == inferred
    # NOT_FOUND never resolved a model, so only the gRPC server metrics count it
    not_found = prom.scalar(
        'sum(grpc_server_handled_total{grpc_service="svertka.v1.ImageClassifier",grpc_method="Classify",'
        'grpc_code="NOT_FOUND"})'
    )
    assert not_found == N_MISSING
    handled = prom.scalar(
        'sum(grpc_server_handled_total{grpc_service="svertka.v1.ImageClassifier",grpc_method="Classify"})'
    )
    assert handled == N_OK + N_BAD + N_MISSING
    assert prom.scalar(f'svertka_model_ready{{model="{MODEL}",version="1"}}') == 1
    info = prom.query(f'svertka_model_info{{model="{MODEL}"}}')
    assert len(info) == 1 and info[0]["metric"]["provider"] == "CPUExecutionProvider"
    assert info[0]["metric"]["precision"] == "fp32"


def test_histogram_quantiles_lie_within_the_client_measured_range(traffic: Traffic) -> None:
    """Server-side latency <= client-side latency, request by request, so each order statistic is too.

    histogram_quantile interpolates inside the bucket that holds the true
    quantile; the estimate can therefore not exceed the upper bound of the
    bucket holding the client's own quantile.
    """
    buckets = latency_buckets(traffic.prom.scalar("max(svertka_latency_slo_seconds)"))
    lat = sorted(
        traffic.client_latency_s
    )  # every image request that reached the model: OK and INVALID_ARGUMENT
    assert len(lat) == N_OK + N_BAD

    def bucket_bound(seconds: float) -> float:
        return buckets[bisect.bisect_left(buckets, seconds)]

    for q in (0.5, 0.9, 0.99):
        est = traffic.prom.scalar(
            f"histogram_quantile({q}, sum by (le) "
            f'(svertka_request_duration_seconds_bucket{{model="{MODEL}",api="image"}}))'
        )
        client_q = lat[int(np.ceil(q * len(lat))) - 1]
        assert 0 < est <= bucket_bound(client_q), (q, est, client_q, lat[0], lat[-1])
        assert est <= bucket_bound(lat[-1])
    # and the per-stage histograms saw work
    for metric in (
        "svertka_preprocess_seconds",
        "svertka_queue_wait_seconds",
        "svertka_batch_compute_seconds",
    ):
        count = traffic.prom.scalar(f'sum({metric}_count{{model="{MODEL}"}})')
        assert count and count > 0, metric
    assert traffic.prom.scalar(f'sum(svertka_preprocess_seconds_count{{model="{MODEL}"}})') >= N_OK


def test_every_dashboard_query_and_rule_evaluates_in_prometheus(traffic: Traffic) -> None:
    prom = traffic.prom
    empty = []
    for expr in artifacts.dashboard_exprs():
        result = prom.query(artifacts.concrete(expr, rate_interval="1h"))
        if not result:
            empty.append(expr)
    gpu_only = [e for e in empty if artifacts.metric_names(e) <= artifacts.GPU_ONLY]
    # the per-frontend and per-process panels: with several processes only
    multiprocess_only = [
        e
        for e in empty
        if traffic.layout == "one-process" and artifacts.metric_names(e) <= artifacts.MULTIPROCESS_ONLY
    ]
    others = [
        e
        for e in empty
        if e not in gpu_only + multiprocess_only and "svertka_rejections_total" not in e and "code!=" not in e
    ]
    assert not others, f"dashboard queries with no data after traffic: {others}"
    for q in artifacts.variable_queries():
        assert prom.query(artifacts.concrete(q)), q

    def all_rules_evaluated() -> list[dict] | None:
        groups = prom.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if len(rules) == len(artifacts.rules()) and all(
            r.get("lastEvaluation", "0001").startswith("20") for r in rules
        ):
            return rules
        return None

    rules = live.wait_until(all_rules_evaluated, 30, "every rule evaluated once", prom.proc, prom.log)
    unhealthy = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not unhealthy
    # The recording rules produce series from real data. A group's rules are
    # evaluated one after another and each result is stored as it is made, so
    # a query can see one rule's first sample before the next rule's: wait for
    # each rule asserted on, not for one of them.
    for rule in ("svertka_request_duration_seconds:p99_rate5m", "svertka_inferences:rate5m"):
        live.wait_until(
            lambda rule=rule: (prom.scalar(f'model:{rule}{{model="{MODEL}"}}') or 0) > 0,
            30,
            f"recording rule {rule} from real traffic",
        )
    firing = {a["labels"]["alertname"] for a in prom.api("alerts")["alerts"] if a["state"] == "firing"}
    assert "SvertkaTargetDown" not in firing
    # the server-side failure shows in the error-ratio rule (a client's INVALID_ARGUMENT does not count)
    # (rate() needs two samples of the INTERNAL series, which the last requests created: the rule
    # reads 0 until Prometheus has scraped it twice)
    ratio = live.wait_until(
        lambda: prom.scalar(f'model:svertka_requests_server_errors:ratio_rate5m{{model="{MODEL}"}}'),
        30,
        "recording rule server-error ratio above 0",
    )
    assert 0 < ratio < 0.2, ratio


def test_process_panels_sum_every_process_in_either_layout(traffic: Traffic) -> None:
    """CPU, memory and fds of the replica: ``svertka_process_*`` summed with several processes, else ``process_*``.

    Each of those dashboard queries is ``<svertka_process_* sum> or on (instance) <process_* sum>``; at
    one evaluation time it must equal its left side with two frontends, its right side with one process.
    """
    prom = traffic.prom
    fallbacks = [e for e in artifacts.dashboard_exprs() if " or on (instance) " in e]
    assert len(fallbacks) == 3
    at = str(time.time())

    def values(expr: str) -> dict[str, float]:
        data = prom.api("query", query=artifacts.concrete(expr, rate_interval="1m"), time=at)
        return {r["metric"]["instance"]: float(r["value"][1]) for r in data["result"]}

    for expr in fallbacks:
        left, _, right = expr.partition(" or on (instance) ")
        got = values(expr)
        assert len(got) == 1 and all(v > 0 for v in got.values()), (expr, got)
        if traffic.layout == "one-process":
            assert values(left) == {} and got == values(right), expr
        else:
            assert got == values(left) and got != values(right), expr


def test_with_two_frontends_every_process_has_its_series(traffic: Traffic) -> None:
    if traffic.layout == "one-process":
        pytest.skip("svertka_process_* and svertka_frontend_*: with several processes only")
    prom = traffic.prom
    processes = {
        (r["metric"]["role"], r["metric"].get("frontend", "")): float(r["value"][1])
        for r in prom.query("svertka_process_cpu_seconds_total")
    }
    assert set(processes) == {("supervisor", ""), ("engine", ""), ("frontend", "0"), ("frontend", "1")}
    assert all(v > 0 for v in processes.values()), processes
    for name in ("svertka_process_resident_memory_bytes", "svertka_process_open_fds"):
        assert len(prom.query(f"{name} > 0")) == 4, name
    restarts = {
        r["metric"]["frontend"]: float(r["value"][1]) for r in prom.query("svertka_frontend_restarts_total")
    }
    assert restarts == {"0": 0, "1": 0}
    in_flight = {
        r["metric"]["frontend"]: float(r["value"][1])
        for r in prom.query("svertka_frontend_in_flight_requests")
    }
    assert in_flight == {"0": 0, "1": 0}  # every request answered
    # the supervisor's own process_* is one of the four, not the sum
    assert prom.scalar("process_cpu_seconds_total") == processes[("supervisor", "")]


def test_model_that_fails_to_load_is_not_ready_and_its_alert_is_pending(traffic: Traffic) -> None:
    """A corrupt model must be visible to operators: readiness 0, SvertkaModelNotReady pending (for: 5m)."""
    prom = traffic.prom
    assert prom.scalar(f'svertka_model_ready{{model="{BROKEN}"}}') == 0
    assert prom.scalar(f'svertka_model_ready{{model="{MODEL}"}}') == 1
    live.wait_until(
        lambda: prom.query(
            f'ALERTS{{alertname="SvertkaModelNotReady",model="{BROKEN}",alertstate="pending"}}'
        ),
        30,
        "SvertkaModelNotReady pending for the corrupt model",
    )
    assert not prom.query(f'ALERTS{{alertname="SvertkaModelNotReady",model="{MODEL}"}}')


def test_model_statistics_agree_with_prometheus_counters(traffic: Traffic) -> None:
    from service.gen.inference import grpc_service_pb2 as pb
    from service.gen.inference import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(traffic.server.address) as ch:
        stats = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
            pb.ModelStatisticsRequest(name=MODEL), timeout=10
        )
    text = traffic.server.scrape()  # after the call: nothing else runs meanwhile
    (ms,) = stats.model_stats
    assert ms.inference_count == _sum(text, "svertka_inferences_total", model=MODEL)
    assert ms.execution_count == _sum(text, "svertka_batches_total", model=MODEL)
    assert ms.inference_stats.success.count == _sum(text, "svertka_requests_total", model=MODEL, code="OK")
    assert ms.inference_stats.fail.count == N_BAD + N_INTERNAL
    assert sum(b.compute_infer.count for b in ms.batch_stats) == ms.execution_count
    assert sum(b.batch_size * b.compute_infer.count for b in ms.batch_stats) == ms.inference_count


def test_access_log_has_one_line_per_request_with_its_id(traffic: Traffic) -> None:
    lines = []
    for raw in traffic.server.log().splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if rec.get("logger") == "svertka.access":
            lines.append(rec)
    by_id = {}
    for rec in lines:
        by_id.setdefault(rec["request_id"], []).append(rec)
    for rid in traffic.ids:
        assert len(by_id.get(rid, [])) == 1, rid
    for rid in (i for i in traffic.ids if i.startswith("obs-bad-")):
        assert by_id[rid][0]["code"] == "INVALID_ARGUMENT"
    ok = by_id["obs-ok-0"][0]
    assert ok["model"] == MODEL and ok["code"] == "OK" and ok["duration_ms"] > 0
    assert "not an image" not in traffic.server.log()  # no payload bytes in the logs


def _frontend_pid(server: ServerProcess, index: int) -> int | None:
    import psutil

    for child in psutil.Process(server.proc.pid).children():
        with contextlib.suppress(psutil.Error):
            if child.cmdline()[-2:] == ["frontend", str(index)] and child.status() != psutil.STATUS_ZOMBIE:
                return child.pid
    return None


def test_a_frontend_killed_three_times_shows_in_restarts_panel_and_alert(traffic: Traffic) -> None:
    """Last in the module: it kills frontend 1 with SIGKILL three times, the supervisor restarting it."""
    if traffic.layout == "one-process":
        pytest.skip("frontend restarts: with several processes only")
    prom, server = traffic.prom, traffic.server
    total = N_OK + N_BAD + TENSOR_REQUESTS + N_INTERNAL
    started = prom.scalar('svertka_process_start_time_seconds{role="frontend",frontend="1"}')
    pid = _frontend_pid(server, 1)
    for _ in range(3):
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        pid = live.wait_until(
            lambda old=pid: (new := _frontend_pid(server, 1)) not in (None, old) and new,
            30,
            "frontend 1 started again",
            server.proc,
            server.log_path,
        )
    server.wait_serving(60)
    live.wait_until(
        lambda: prom.scalar('svertka_frontend_restarts_total{frontend="1"}') == 3,
        30,
        "Prometheus sees three restarts",
        prom.proc,
        prom.log,
    )
    assert prom.scalar('svertka_frontend_restarts_total{frontend="0"}') == 0
    live.wait_until(
        lambda: (
            (prom.scalar('svertka_process_start_time_seconds{role="frontend",frontend="1"}') or 0) > started
        ),
        30,
        "frontend 1's new start time",
    )
    # the dashboard's panel counts them; the alert is pending (for: 5m), for frontend 1 alone
    (panel,) = [e for e in artifacts.dashboard_exprs() if "svertka_frontend_restarts_total" in e]
    counts = {r["metric"]["frontend"]: float(r["value"][1]) for r in prom.query(artifacts.concrete(panel))}
    assert counts == {"0": 0, "1": 3}
    alerts = live.wait_until(
        lambda: prom.query('ALERTS{alertname="SvertkaFrontendRestarting",alertstate="pending"}'),
        30,
        "SvertkaFrontendRestarting pending",
        prom.proc,
        prom.log,
    )
    assert [a["metric"]["frontend"] for a in alerts] == ["1"]
    # nothing counted was lost or went back: the killed frontend's requests stay in the sums
    assert prom.scalar(f'sum(svertka_requests_total{{model="{MODEL}"}})') == total
    back = prom.query(
        "resets(svertka_requests_total[1h]) > 0 or resets(grpc_server_handled_total[1h]) > 0 "
        "or resets(svertka_request_duration_seconds_bucket[1h]) > 0 "
        "or resets(svertka_process_cpu_seconds_total[1h]) > 0"
    )
    assert not back, back
