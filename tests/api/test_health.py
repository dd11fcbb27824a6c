"""Health transitions, per-model health, startup gating and server reflection."""

from __future__ import annotations

import queue
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from service.gen.inference import grpc_service_pb2 as kpb
from service.gen.inference import grpc_service_pb2_grpc as kgrpc
from service.gen.svertka.v1 import classifier_pb2 as cpb
from service.gen.svertka.v1 import classifier_pb2_grpc as cgrpc
from tests.api import images
from tests.helpers.tinymodel import make_repository, write_corrupt_model

H = health_pb2.HealthCheckResponse


def _check(channel, service=""):
    return (
        health_pb2_grpc.HealthStub(channel)
        .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        .status
    )


def _watch(channel, service, out: queue.Queue):
    """Collect Watch updates on a thread until the stream ends."""
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service))

    def pump():
        try:
            for response in call:
                out.put(response.status)
        except grpc.RpcError:
            pass

    threading.Thread(target=pump, daemon=True).start()
    return call


def test_not_serving_until_loaded_then_serving_then_not_serving_on_drain(make_server, tmp_path):
    srv = make_server(make_repository(tmp_path / "repo", {"tiny": [1]}), load=False)
    with srv.channel() as channel:
        updates: queue.Queue = queue.Queue()
        call = _watch(channel, "", updates)
        assert updates.get(timeout=10) == H.NOT_SERVING
        assert _check(channel) == H.NOT_SERVING
        assert kgrpc.GRPCInferenceServiceStub(channel).ServerReady(kpb.ServerReadyRequest()).ready is False
        # Inference before the models are loaded is refused as "try again", not "no such model".
        with pytest.raises(grpc.RpcError) as info:
            cgrpc.ImageClassifierStub(channel).Classify(
                cpb.ClassifyRequest(model="tiny", image=images.png(0))
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "models are still loading" in info.value.details()

        srv.call(srv.server.load_models())
        assert updates.get(timeout=30) == H.SERVING
        assert _check(channel) == H.SERVING
        assert _check(channel, "tiny") == H.SERVING
        assert _check(channel, "svertka.v1.ImageClassifier") == H.SERVING
        assert kgrpc.GRPCInferenceServiceStub(channel).ServerReady(kpb.ServerReadyRequest()).ready is True

        srv.call(srv.server.health.enter_draining())
        assert updates.get(timeout=10) == H.NOT_SERVING
        assert _check(channel, "tiny") == H.NOT_SERVING
        call.cancel()


def test_unknown_service_is_not_found(server):
    with server.channel() as channel:
        with pytest.raises(grpc.RpcError) as info:
            _check(channel, "no-such-model")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_corrupt_model_is_not_serving_and_the_others_serve(make_server, tmp_path):
    repo = make_repository(tmp_path / "repo", {"good": [1]})
    write_corrupt_model(repo / "broken" / "1" / "model.onnx", "garbage")
    srv = make_server(repo)
    with srv.channel() as channel:
        assert _check(channel) == H.SERVING
        assert _check(channel, "good") == H.SERVING
        assert _check(channel, "broken") == H.NOT_SERVING
        stub = kgrpc.GRPCInferenceServiceStub(channel)
        ready, call = stub.ModelReady.with_call(kpb.ModelReadyRequest(name="broken"))
        assert ready.ready is False
        reason = dict(call.trailing_metadata()).get("svertka-reason", "")
        assert "broken" in reason
        index = stub.RepositoryIndex(kpb.RepositoryIndexRequest())
        states = {m.name: (m.state, m.reason) for m in index.models}
        assert states["good"] == ("READY", "")
        assert states["broken"][0] == "UNAVAILABLE" and states["broken"][1]
        assert [m.name for m in stub.RepositoryIndex(kpb.RepositoryIndexRequest(ready=True)).models] == [
            "good"
        ]


def test_reflection_lists_and_describes_every_service(server):
    with server.channel() as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {
            "svertka.v1.ImageClassifier",
            "inference.GRPCInferenceService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services
        # A tool can resolve request types across files (grpc_service.proto imports model_config.proto).
        from google.protobuf.descriptor_pool import DescriptorPool

        pool = DescriptorPool(db)
        config = pool.FindMessageTypeByName("inference.ModelConfigResponse").fields_by_name["config"]
        assert config.message_type.full_name == "inference.ModelConfig"
        method = pool.FindServiceByName("svertka.v1.ImageClassifier").methods_by_name["ClassifyStream"]
        assert method.client_streaming and method.server_streaming


def test_a_server_whose_every_model_failed_is_not_serving(make_server, tmp_path):
    repo = tmp_path / "repo"
    write_corrupt_model(repo / "broken" / "1" / "model.onnx", "truncated")
    srv = make_server(repo)
    with srv.channel() as channel:
        assert _check(channel) == H.NOT_SERVING
        assert _check(channel, "broken") == H.NOT_SERVING
        assert kgrpc.GRPCInferenceServiceStub(channel).ServerReady(kpb.ServerReadyRequest()).ready is False
        assert kgrpc.GRPCInferenceServiceStub(channel).ServerLive(kpb.ServerLiveRequest()).live is True
