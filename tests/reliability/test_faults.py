"""Work that must never be computed, and a runtime fault that must stay inside its batch.

Each test first makes a real batch *run* (a model whose graph takes a few
hundred milliseconds of onnxruntime compute per batch, tests/reliability/
slowmodel.py), then queues requests behind it and expires, cancels or
poisons them. What the server computed is read back the way an operator
would: ModelStatistics over gRPC and the Prometheus counters.
"""

from __future__ import annotations

import queue
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.gen.inference import grpc_service_pb2_grpc as kgrpc
from service.gen.svertka.v1 import classifier_pb2 as cpb
from service.gen.svertka.v1 import classifier_pb2_grpc as cgrpc
from tests.api import images
from tests.api.conftest import InProcessServer
from tests.reliability import harness
from tests.reliability.slowmodel import busy_tensor, make_slow_model

#: A few ms each with one thread: a batch runs for ~0.1 s (idle cores) to ~0.3 s (busy ones).
MATMULS = 40
#: ``slow`` runs one row per batch, so requests sent first really queue ahead of the later ones;
#: ``fragile`` batches up to 4 rows so that a poisoned request shares its batch with good ones.
CONFIGS = {
    "slow": "max_batch_size: 1\nmax_queue_size: 16\nintra_op_threads: 1\n",
    "fragile": "max_batch_size: 4\nmax_queue_size: 16\nintra_op_threads: 1\n",
}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    make_slow_model(repo / "slow" / "1" / "model.onnx", matmuls=MATMULS)
    make_slow_model(repo / "fragile" / "1" / "model.onnx", matmuls=2 * MATMULS, fail_above=10.0)
    for name, text in CONFIGS.items():
        (repo / name / "config.yaml").write_text(text)
    server = InProcessServer(repo)
    yield server
    server.close()


@pytest.fixture(scope="module")
def channel(srv):
    with srv.channel() as ch:
        yield ch


class _Counts:
    """ModelStatistics and rejection counters of one model, to compare before and after."""

    def __init__(self, srv: InProcessServer, channel, name: str) -> None:
        stats = harness.model_stats(channel, name)
        self.inferences = stats.inference_count
        self.executions = stats.execution_count
        self.success = stats.inference_stats.success.count
        self.fail = stats.inference_stats.fail.count
        registry = srv.metrics.registry
        self.rejections = {
            reason: registry.get_sample_value(
                "svertka_rejections_total", {"model": name, "version": "1", "reason": reason}
            )
            or 0.0
            for reason in ("deadline", "cancelled", "queue_full")
        }

    def minus(self, before: _Counts) -> dict:
        return {
            "inferences": self.inferences - before.inferences,
            "executions": self.executions - before.executions,
            "success": self.success - before.success,
            "fail": self.fail - before.fail,
            **{f"rejected_{k}": int(v - before.rejections[k]) for k, v in self.rejections.items()},
        }


def _wait_running(srv: InProcessServer, name: str, queued: int = 0) -> None:
    """Until a batch of ``name`` is computing and ``queued`` rows wait behind it."""
    batcher = srv.engine.get(name).batcher
    harness.wait_until(
        lambda: batcher.busy and batcher.queued_rows == queued,
        what=f"{name}: a batch running, {queued} queued",
    )


def _wait_queued(srv: InProcessServer, name: str, rows: int) -> None:
    batcher = srv.engine.get(name).batcher
    harness.wait_until(lambda: batcher.queued_rows == rows, what=f"{name}: {rows} rows queued")


def _wait_settled(srv: InProcessServer, name: str) -> None:
    batcher = srv.engine.get(name).batcher
    harness.wait_until(lambda: not batcher.busy, what=f"{name}: queue empty and nothing running")


def _code(future) -> tuple[grpc.StatusCode, str]:
    try:
        future.result()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def _settle(srv: InProcessServer, name: str, futures) -> None:
    """Let every request of a test finish, so a failing test does not leak work into the next."""
    for future in futures:
        _code(future)
    _wait_settled(srv, name)


def _batch_seconds(tensor_api) -> float:
    """One ``slow`` batch's time on this machine now (best of three round trips).

    The busy branch's cost varies several-fold with how loaded the cores are,
    so deadlines are sized from this measurement, not from a constant.
    """
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        tensor_api.ModelInfer(harness.tensor_request(model="slow"), timeout=60)
        best = min(best, time.perf_counter() - started)
    return best


def test_deadline_expiring_in_the_queue_is_never_computed(srv, channel):
    tensor_api = kgrpc.GRPCInferenceServiceStub(channel)
    image_api = cgrpc.ImageClassifierStub(channel)
    # Five one-row batches of T each: the late requests wait >= 4T behind them, their deadline is 2T.
    late_deadline_s = 2 * _batch_seconds(tensor_api)
    before = _Counts(srv, channel, "slow")
    ahead = [tensor_api.ModelInfer.future(harness.tensor_request(model="slow"), timeout=60) for _ in range(5)]
    late = []
    try:
        _wait_running(srv, "slow", queued=4)
        late = [
            tensor_api.ModelInfer.future(
                harness.tensor_request(model="slow", rid="late-t"), timeout=late_deadline_s
            ),
            image_api.Classify.future(
                cpb.ClassifyRequest(model="slow", image=images.png(1), id="late-i"), timeout=late_deadline_s
            ),
        ]
        assert [_code(f)[0] for f in late] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
        assert [_code(f)[0] for f in ahead] == [grpc.StatusCode.OK] * 5
    finally:
        _settle(srv, "slow", ahead + late)
    delta = _Counts(srv, channel, "slow").minus(before)
    # Five rows computed in five batches (the requests ahead); the two late ones never were.
    assert {k: delta[k] for k in ("inferences", "executions", "success", "fail")} == {
        "inferences": 5,
        "executions": 5,
        "success": 5,
        "fail": 2,
    }
    # Counted as rejected before compute. Which reason depends on who noticed first: the server's
    # deadline timer ("deadline") or the client's own deadline arriving as a cancel ("cancelled").
    assert delta["rejected_deadline"] + delta["rejected_cancelled"] == 2
    assert delta["rejected_queue_full"] == 0


def test_a_cancelled_stream_frees_its_queued_work(srv, channel):
    tensor_api = kgrpc.GRPCInferenceServiceStub(channel)
    batcher = srv.engine.get("slow").batcher
    before = _Counts(srv, channel, "slow")
    ahead = [tensor_api.ModelInfer.future(harness.tensor_request(model="slow"), timeout=60) for _ in range(4)]

    def stream_rows() -> int:
        """Rows queued beyond the requests ahead that still wait (one of those not done is computing)."""
        waiting_ahead = max(sum(not f.done() for f in ahead) - 1, 0)
        return batcher.queued_rows - waiting_ahead

    outgoing: queue.Queue = queue.Queue()
    stream = None
    try:
        _wait_running(srv, "slow", queued=3)
        stream = tensor_api.ModelStreamInfer(iter(outgoing.get, None), timeout=60)
        for i in range(3):
            outgoing.put(harness.tensor_request(model="slow", rid=f"s{i}"))
        harness.wait_until(lambda: stream_rows() == 3, what="the stream's 3 rows queued behind the others")
        stream.cancel()
        # The stream's rows leave the queue; the requests ahead are still there or computing.
        harness.wait_until(lambda: stream_rows() == 0, what="the stream's rows dropped")
        assert [_code(f)[0] for f in ahead] == [grpc.StatusCode.OK] * 4
    finally:
        if stream is not None:
            stream.cancel()
        _settle(srv, "slow", ahead)
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    delta = _Counts(srv, channel, "slow").minus(before)
    # Only the four requests ahead were computed: the stream's three never were.
    assert delta["inferences"] == 4 and delta["executions"] == 4
    assert delta["rejected_cancelled"] == 3
    # The model is not wedged: the next request is computed on its own.
    assert tensor_api.ModelInfer(harness.tensor_request(model="slow"), timeout=60).model_name == "slow"


def test_a_runtime_failure_fails_only_its_batch(srv, channel):
    tensor_api = kgrpc.GRPCInferenceServiceStub(channel)
    before = _Counts(srv, channel, "fragile")
    first = tensor_api.ModelInfer.future(
        harness.tensor_request(busy_tensor(), model="fragile", rid="a"), timeout=60
    )
    _wait_running(srv, "fragile")
    # One poisoned request (a value above the model's fail_above makes onnxruntime raise) and two
    # good ones queue behind the running batch and form the next batch together.
    poisoned = tensor_api.ModelInfer.future(
        harness.tensor_request(busy_tensor(100.0), model="fragile", rid="p"), timeout=60
    )
    mates = [
        tensor_api.ModelInfer.future(
            harness.tensor_request(busy_tensor(), model="fragile", rid=f"m{i}"), timeout=60
        )
        for i in range(2)
    ]
    try:
        # All three waiting at once: the batcher takes them together (max_batch_size 4).
        _wait_queued(srv, "fragile", 3)
        assert _code(first)[0] == grpc.StatusCode.OK
        for future in (poisoned, *mates):
            code, details = _code(future)
            assert code == grpc.StatusCode.INTERNAL
            assert details.startswith("model 'fragile' version 1: inference failed on a batch of 3 rows: ")
    finally:
        _settle(srv, "fragile", [first, poisoned, *mates])
    # The next batch runs normally and answers exactly what the first one did.
    after = tensor_api.ModelInfer(harness.tensor_request(busy_tensor(), model="fragile"), timeout=60)
    np.testing.assert_array_equal(harness.logits_of(after), harness.logits_of(first.result()))
    _wait_settled(srv, "fragile")
    delta = _Counts(srv, channel, "fragile").minus(before)
    assert (delta["inferences"], delta["executions"], delta["success"], delta["fail"]) == (2, 2, 2, 3)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="fragile"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
