"""A bad model directory stops only its own model: bad settings, misnamed versions, replaced files.

A real ``svertka serve`` process starts on a repository holding one good
model, models whose ``config.yaml`` holds non-finite or wrong-typed values,
and models whose only version directory breaks the version rule (an int64
overflow, a Unicode digit, a leading zero). The good model serves; each bad
one is UNAVAILABLE with a reason that names the problem; a failed
RepositoryModelLoad is UNAVAILABLE (not INTERNAL) however often it is
repeated, and leaves the server's thread count where it was. A model file
replaced in place shows its new sha256 in ModelConfig, in
``svertka_model_info`` and in the access log.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from service import layout
from service.engine import loading
from service.gen.inference import grpc_service_pb2 as kpb
from service.gen.inference import grpc_service_pb2_grpc as kgrpc
from service.gen.svertka.v1 import classifier_pb2 as cpb
from service.gen.svertka.v1 import classifier_pb2_grpc as cgrpc
from tests.api import images
from tests.helpers.tinymodel import make_repository, make_tiny_model
from tests.reliability import harness

pytestmark = pytest.mark.integration

H = health_pb2.HealthCheckResponse
#: Failed RepositoryModelLoad calls after the warm-up ones.
FAILED_LOADS = 50

#: model -> (config.yaml, a phrase its reason must hold)
BAD_CONFIGS = {
    "inf-pixels": ("max_image_pixels: .inf\n", "max_image_pixels: expected an integer from 1 to 9223372036854775807, got inf (number)"),
    "nan-queue": ("max_queue_size: .nan\n", "max_queue_size: expected an integer from 1 to 2147483647, got nan (number)"),
    "float-batch": ("max_batch_size: 8.0\n", "max_batch_size: expected an integer from 1 to 2147483647, got 8.0 (number)"),
    "bool-rows": ("max_rows_per_request: true\n", "max_rows_per_request: expected an integer from 1 to 2147483647, got True (boolean)"),
    "string-queue": ('max_queue_size: "100"\n', "max_queue_size: expected an integer from 1 to 2147483647, got '100' (string)"),
}  # fmt: skip
#: model -> its only version directory, which is no version
BAD_VERSIONS = {"overflow": "99999999999999999999999", "superscript": "²", "leading-zero": "01"}


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _settled_threads(pid: int, target: int) -> int:
    """The server's thread count once it is back at ``target`` (polled), or the last count after 30 s."""
    try:
        harness.wait_until(lambda: _threads(pid) == target, timeout_s=30, interval_s=0.1)
    except TimeoutError:
        pass
    return _threads(pid)


@pytest.mark.slow
def test_bad_configs_and_version_directories_stop_only_their_model(tmp_path):
    repo = make_repository(tmp_path / "repo", {"tiny": [1], **{name: [1] for name in BAD_CONFIGS}})
    for name, (text, _) in BAD_CONFIGS.items():
        (repo / name / "config.yaml").write_text(text)
    for name, directory in BAD_VERSIONS.items():
        make_tiny_model(repo / name / directory / "model.onnx")

    with harness.running_server(repo, tmp_path / "server.log", "--enable-model-control") as server:
        pid = server.proc.pid
        channel = grpc.insecure_channel(server.address)
        stub = kgrpc.GRPCInferenceServiceStub(channel)
        assert server.health() == H.SERVING and server.health("tiny") == H.SERVING
        assert stub.ModelInfer(harness.tensor_request(model="tiny"), timeout=30).model_version == "1"
        reply = cgrpc.ImageClassifierStub(channel).Classify(
            cpb.ClassifyRequest(model="tiny", image=images.png(1)), timeout=30
        )
        assert reply.model_version == 1
        index = {m.name: m for m in stub.RepositoryIndex(kpb.RepositoryIndexRequest(), timeout=10).models}
        reasons = {name: reason for name, (_, reason) in BAD_CONFIGS.items()}
        reasons.update({name: f"skipped {d!r}" for name, d in BAD_VERSIONS.items()})
        for name, reason in reasons.items():
            assert server.health(name) == H.NOT_SERVING, name
            assert index[name].state == "UNAVAILABLE" and reason in index[name].reason, index[name]
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(harness.tensor_request(model=name), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            assert reason in info.value.details()
        assert "skipping directories '99999999999999999999999'" in server.log()

        def failed_load(name: str) -> None:
            with pytest.raises(grpc.RpcError) as info:
                stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=name), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            assert f"model '{name}' failed to load: " in info.value.details()
            assert reasons[name] in info.value.details()

        names = list(reasons)
        for name in names:  # the first calls may start threads that stay (gRPC's, the loader's)
            failed_load(name)
        before = _settled_threads(pid, _threads(pid))
        rss_before = _rss_mib(pid)
        for i in range(FAILED_LOADS):
            failed_load(names[i % len(names)])
        after = _settled_threads(pid, before)
        rss_after = _rss_mib(pid)
        assert stub.ModelInfer(harness.tensor_request(model="tiny"), timeout=30).model_version == "1"
        channel.close()
    harness.record_figures(
        "bad_repository",
        failed_loads=FAILED_LOADS,
        threads_before=before,
        threads_after=after,
        rss_mib_before=round(rss_before, 1),
        rss_mib_after=round(rss_after, 1),
    )
    assert after == before


def _model_config_sha(stub) -> str:
    config = stub.ModelConfig(kpb.ModelConfigRequest(name="tiny"), timeout=10).config
    return config.parameters["sha256"].string_value


def _replace(path: Path, seed: int) -> str:
    staging = path.with_name(".staging.onnx")
    make_tiny_model(staging, seed=seed)
    os.replace(staging, path)
    return loading.file_fingerprint(path)


@pytest.mark.slow
@pytest.mark.parametrize("server_layout", harness.LAYOUTS)
def test_a_model_file_replaced_in_place_shows_its_new_fingerprint(tmp_path, server_layout):
    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    path = repo / "tiny" / "1" / layout.MODEL_FILE
    first = loading.file_fingerprint(path)
    args = ("--enable-model-control", "--repository-poll-s", "0.2", "--access-log", "--log-format", "json")
    with harness.running_server(
        repo, tmp_path / "server.log", *harness.layout_args(server_layout), *args
    ) as server:
        channel = grpc.insecure_channel(server.address)
        stub = kgrpc.GRPCInferenceServiceStub(channel)

        def info_sha() -> set[str]:
            samples = harness.scrape(server.metrics_port)
            return {
                dict(labels)["sha256"]
                for (name, labels) in samples
                if name == "svertka_model_info" and dict(labels)["model"] == "tiny"
            }

        def answered_by(rid: str) -> str:
            stub.ModelInfer(harness.tensor_request(model="tiny", rid=rid), timeout=30)
            records = harness.wait_until(
                lambda: [
                    r
                    for r in harness.json_log_records(server.log())
                    if r.get("logger") == "svertka.access" and r.get("request_id") == rid
                ],
                what=f"the access line of {rid}",
            )
            return records[0]["sha256"]

        assert _model_config_sha(stub) == first and info_sha() == {first}
        assert answered_by("before") == first

        second = _replace(path, seed=21)  # same version label, other weights; polling sees it
        harness.wait_until(lambda: _model_config_sha(stub) == second, what="the polled reload")
        assert info_sha() == {second} and answered_by("polled") == second

        third = _replace(path, seed=22)
        stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="tiny"), timeout=60)
        assert _model_config_sha(stub) == third and info_sha() == {third}
        assert answered_by("loaded") == third
        assert len({first, second, third}) == 3
        channel.close()
