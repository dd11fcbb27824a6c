"""inference.GRPCInferenceService with our own stubs: metadata, inference, statistics, streams."""

from __future__ import annotations

import concurrent.futures
import struct

import grpc
import numpy as np
import pytest

from service import __version__
from service.engine.loading import file_fingerprint
from service.gen.inference import grpc_service_pb2 as pb
from service.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.gen.inference import model_config_pb2 as mc
from tests.api import images


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _infer_request(
    x: np.ndarray, *, model="tiny", raw=True, rid="", classification=None
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=rid)
    request.parameters["priority"].uint64_param = 1  # accepted and ignored, like every unknown parameter
    request.parameters["triton_enable_empty_final_response"].bool_param = False
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    if raw:
        request.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    if classification is not None:
        request.outputs.add(name="logits").parameters["classification"].int64_param = classification
    return request


def _logits(response: pb.ModelInferResponse) -> np.ndarray:
    (out,) = response.outputs
    assert out.datatype == "FP32"
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(out.shape))


def test_server_and_model_metadata(stub):
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert (meta.name, meta.version) == ("svertka", __version__)
    assert {"classification", "statistics"} <= set(meta.extensions)
    model = stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"))
    assert (model.name, list(model.versions), model.platform) == ("tiny", ["2"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("input", "FP32", [-1, 3, 32, 32])]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [("logits", "FP32", [-1, 10])]
    assert stub.ModelReady(pb.ModelReadyRequest(name="tiny")).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="tiny", version="2")).ready


def test_model_config_is_what_perf_analyzer_reads(server, stub):
    config = stub.ModelConfig(pb.ModelConfigRequest(name="small")).config
    settings = server.engine.get("small").settings
    assert config.name == "small" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == settings.max_batch_size
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.dynamic_batching.max_queue_delay_microseconds == round(settings.max_queue_delay_ms * 1000)
    assert config.dynamic_batching.default_queue_policy.max_queue_size == settings.max_queue_size
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input", mc.TYPE_FP32, [3, 16, 16])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("logits", mc.TYPE_FP32, [4])]
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert config.instance_group[0].count == settings.instances
    assert config.parameters["execution_provider"].string_value == "CPUExecutionProvider"
    assert config.model_transaction_policy.decoupled is False
    # Which weights answer: the model file's fingerprint at load (a file replaced in place shows).
    sha256 = config.parameters["sha256"].string_value
    assert len(sha256) == 12 and sha256 == file_fingerprint(server.engine.get("small").path)
    assert config.parameters["reject_non_finite_inputs"].string_value == "false"


def test_raw_and_typed_infer_equal_onnxruntime_bit_for_bit(tiny_repository, stub):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 32, 32)).astype(np.float32)
    expected = images.offline_logits(tiny_repository, "tiny", 2, x)
    response = stub.ModelInfer(_infer_request(x, rid="abc"))
    assert (response.model_name, response.model_version, response.id) == ("tiny", "2", "abc")
    np.testing.assert_array_equal(_logits(response), expected)
    np.testing.assert_array_equal(_logits(stub.ModelInfer(_infer_request(x, raw=False))), expected)


def test_several_rows_in_one_request(tiny_repository, stub):
    x = np.random.default_rng(1).normal(size=(5, 3, 32, 32)).astype(np.float32)
    got = _logits(stub.ModelInfer(_infer_request(x)))
    assert got.shape == (5, 10)
    np.testing.assert_allclose(
        got, images.offline_logits(tiny_repository, "tiny", 2, x), rtol=1e-5, atol=1e-5
    )


def test_bytes_input_decodes_images_like_the_image_api(tiny_repository, stub):
    payloads = [images.png(11), images.jpeg(12)]
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="input", datatype="BYTES", shape=[2])
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(p)) + p for p in payloads))
    got = _logits(stub.ModelInfer(request))
    x = np.stack([images.preprocess(tiny_repository, "tiny", 2, p) for p in payloads])
    np.testing.assert_allclose(
        got, images.offline_logits(tiny_repository, "tiny", 2, x), rtol=1e-5, atol=1e-5
    )


def test_classification_extension(tiny_repository, stub):
    x = np.random.default_rng(2).normal(size=(2, 3, 32, 32)).astype(np.float32)
    response = stub.ModelInfer(_infer_request(x, classification=3))
    (out,) = response.outputs
    assert (out.datatype, list(out.shape)) == ("BYTES", [2, 3])
    raw, items = response.raw_output_contents[0], []
    while raw:
        (n,) = struct.unpack_from("<I", raw)
        items.append(raw[4 : 4 + n].decode())
        raw = raw[4 + n :]
    expected = images.offline_logits(tiny_repository, "tiny", 2, x)
    for row in range(2):
        top = np.argsort(-expected[row], kind="stable")[:3]
        got = [item.split(":") for item in items[row * 3 : row * 3 + 3]]
        assert [int(index) for _, index, _ in got] == top.tolist()
        assert [label for _, _, label in got] == [f"class{i}" for i in top]
        np.testing.assert_allclose([float(score) for score, _, _ in got], expected[row, top], rtol=1e-5)


def test_statistics_count_rows_batches_and_outcomes(make_server, tmp_path):
    """Concurrent requests are batched: fewer executions than inferences, every caller its own rows."""
    from tests.helpers.tinymodel import make_repository

    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    (repo / "tiny" / "config.yaml").write_text("max_batch_size: 16\nmax_queue_delay_ms: 20\n")
    srv = make_server(repo)
    xs = [np.random.default_rng(i).normal(size=(1, 3, 32, 32)).astype(np.float32) for i in range(48)]
    with srv.channel() as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        singles = [_logits(stub.ModelInfer(_infer_request(x))) for x in xs[:8]]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda x: _logits(stub.ModelInfer(_infer_request(x))), xs))
        for single, joint in zip(singles, together[:8], strict=True):
            np.testing.assert_allclose(joint, single, rtol=1e-5, atol=1e-5)
        for x, joint in zip(xs, together, strict=True):
            np.testing.assert_allclose(joint, images.offline_logits(repo, "tiny", 1, x), rtol=1e-5, atol=1e-5)
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(_infer_request(np.zeros((1, 3, 8, 8), np.float32)))  # one failure
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="tiny")).model_stats
    (s,) = stats
    assert (s.name, s.version) == ("tiny", "1")
    assert s.inference_count == 56
    if srv.engine_process is None:
        # In one process the 16 callers' requests reach the batcher in bursts. An engine in its
        # own process keeps up with one frontend's arrivals on this model, so it may run each
        # request alone (dispatching to an idle instance at once): the counts below still hold.
        assert s.execution_count < s.inference_count
    assert sum(b.compute_infer.count * b.batch_size for b in s.batch_stats) == 56
    assert s.inference_stats.success.count == 56 and s.inference_stats.fail.count == 1
    assert s.inference_stats.queue.count == 56 and s.inference_stats.compute_infer.ns > 0
    assert s.last_inference > 0


def test_stream_infer_answers_each_request_with_its_id(tiny_repository, stub):
    xs = {
        f"r{i}": np.random.default_rng(50 + i).normal(size=(1, 3, 32, 32)).astype(np.float32)
        for i in range(20)
    }

    def requests():
        for rid, x in xs.items():
            yield _infer_request(x, rid=rid)
        bad = _infer_request(xs["r0"], rid="bad")
        bad.inputs[0].name = "pixels"
        yield bad

    responses = list(stub.ModelStreamInfer(requests(), timeout=60))
    assert len(responses) == 21
    by_id = {r.infer_response.id: r for r in responses}
    assert "unknown input 'pixels'" in by_id["bad"].error_message
    for rid, x in xs.items():
        assert by_id[rid].error_message == ""
        np.testing.assert_allclose(
            _logits(by_id[rid].infer_response),
            images.offline_logits(tiny_repository, "tiny", 2, x),
            rtol=1e-5,
            atol=1e-5,
        )
