"""Corrupt or incompatible model files: that model is unavailable, loudly; the others serve.

A real ``svertka serve`` process starts on a repository holding one good model
and one broken model of each kind; what an operator sees is checked in the
three places they look: the log, health (per model), and ModelReady /
RepositoryIndex / an inference call. Then a broken *new version* of the good
model is dropped in while it serves: the serving version stays, with zero
failed requests.
"""

from __future__ import annotations

import os
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2

from service.gen.inference import grpc_service_pb2 as kpb
from service.gen.inference import grpc_service_pb2_grpc as kgrpc
from tests.helpers.tinymodel import make_repository, write_corrupt_model
from tests.reliability import harness

pytestmark = pytest.mark.integration

H = health_pb2.HealthCheckResponse
#: Broken model -> what its unavailability reason must say.
BROKEN = {
    "garbage": "onnxruntime cannot load",
    "truncated": "onnxruntime cannot load",
    "bad_metadata": "bad svertka metadata",
    "wrong_classes": "3 labels",
}


@pytest.mark.slow
@pytest.mark.parametrize("server_layout", harness.LAYOUTS)
def test_broken_models_are_unavailable_with_a_reason_and_the_rest_serve(tmp_path, server_layout):
    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    for kind in BROKEN:
        write_corrupt_model(repo / kind.replace("_", "-") / "1" / "model.onnx", kind)
    make_repository(repo, {"badconfig": [1]})
    (repo / "badconfig" / "config.yaml").write_text("max_batch_size: 0\n")

    with harness.running_server(
        repo, tmp_path / "server.log", *harness.layout_args(server_layout), "--repository-poll-s", "0.2"
    ) as server:
        channel = grpc.insecure_channel(server.address)
        stub = kgrpc.GRPCInferenceServiceStub(channel)
        assert server.health() == H.SERVING  # the server starts with the models that are fine
        assert server.health("tiny") == H.SERVING
        assert stub.ModelInfer(harness.tensor_request(model="tiny"), timeout=30).model_version == "1"
        index = {m.name: m for m in stub.RepositoryIndex(kpb.RepositoryIndexRequest(), timeout=10).models}
        log = server.log()
        names = [kind.replace("_", "-") for kind in BROKEN] + ["badconfig"]
        reasons = [*BROKEN.values(), "max_batch_size: expected an integer from 1 to 2147483647, got 0"]
        for name, reason in zip(names, reasons, strict=True):
            assert server.health(name) == H.NOT_SERVING, name
            assert index[name].state == "UNAVAILABLE" and reason in index[name].reason, index[name]
            ready, call = stub.ModelReady.with_call(kpb.ModelReadyRequest(name=name), timeout=10)
            assert ready.ready is False
            assert reason in dict(call.trailing_metadata())["svertka-reason"]
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(harness.tensor_request(model=name), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert (
                info.value.details().startswith(f"model '{name}' is unavailable: ")
                and reason in info.value.details()
            )
            assert f"model '{name}' unavailable: " in log and reason in log

        # A broken new version of a serving model: it keeps serving version 1, nothing fails.
        failures: list[str] = []
        served = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    served.append(
                        stub.ModelInfer(harness.tensor_request(model="tiny"), timeout=30).model_version
                    )
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            staging = repo / "tiny" / ".staging"
            write_corrupt_model(staging / "model.onnx", "truncated")
            os.rename(staging, repo / "tiny" / "2")
            harness.wait_until(
                lambda: "still serving version 1" in server.log(), what="the failed reload to be logged"
            )
            count = len(served)
            harness.wait_until(lambda: len(served) > count + 50, what="more answers after the failed reload")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        assert not failures, failures[:5]
        assert set(served) == {"1"}
        assert server.health("tiny") == H.SERVING
        assert stub.ModelReady(kpb.ModelReadyRequest(name="tiny"), timeout=10).ready
        # Polling does not retry the same broken file over and over (one error, not one per poll).
        assert server.log().count("version 2: onnxruntime cannot load") == 1
        channel.close()


@pytest.mark.parametrize("server_layout", harness.LAYOUTS)
def test_a_config_refused_on_reload_shows_in_monitoring_until_fixed(tmp_path, server_layout):
    """The old version keeps serving, and RepositoryIndex, ModelReady and /metrics all say so."""
    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    with harness.running_server(
        repo, tmp_path / "server.log", *harness.layout_args(server_layout), "--repository-poll-s", "0.2"
    ) as server:
        channel = grpc.insecure_channel(server.address)
        stub = kgrpc.GRPCInferenceServiceStub(channel)

        def failed() -> float:
            return harness.sample(
                harness.scrape(server.metrics_port), "svertka_model_reload_failed", model="tiny"
            )

        def entry() -> kpb.RepositoryIndexResponse.ModelIndex:
            (tiny,) = stub.RepositoryIndex(kpb.RepositoryIndexRequest(), timeout=10).models
            return tiny

        assert failed() == 0 and entry().reason == ""
        (repo / "tiny" / "config.yaml").write_text("max_batch_size: 0\n")
        harness.wait_until(lambda: failed() == 1, what="svertka_model_reload_failed to be 1")
        tiny = entry()
        assert tiny.state == "READY" and tiny.version == "1", tiny
        assert tiny.reason.startswith("reload failed: bad config: ") and "got 0" in tiny.reason, tiny.reason
        assert tiny.reason.endswith("(still serving version 1)"), tiny.reason
        ready, call = stub.ModelReady.with_call(kpb.ModelReadyRequest(name="tiny"), timeout=10)
        assert ready.ready and dict(call.trailing_metadata())["svertka-reload-failed"] == tiny.reason
        assert stub.ModelInfer(harness.tensor_request(model="tiny"), timeout=30).model_version == "1"
        (repo / "tiny" / "config.yaml").write_text("max_batch_size: 4\n")
        harness.wait_until(lambda: failed() == 0, what="svertka_model_reload_failed back to 0")
        assert entry().reason == "" and entry().state == "READY"
        _, call = stub.ModelReady.with_call(kpb.ModelReadyRequest(name="tiny"), timeout=10)
        assert "svertka-reload-failed" not in dict(call.trailing_metadata())
        channel.close()
