"""Graphs whose batch dimension is fixed at 1, as ``torch.onnx.export`` writes them without ``dynamic_axes``.

Served as Triton serves ``max_batch_size: 0``: ModelMetadata and ModelConfig give the full
shape ``[1, ...]``, a request's input must be exactly that, nothing is batched. Images to such
a file with svertka's metadata run one at a time.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.gen.inference import grpc_service_pb2 as pb
from service.gen.inference import grpc_service_pb2_grpc as pb_grpc
from tests.api import images
from tests.api.conftest import InProcessServer
from tests.helpers.tinymodel import build_tiny_model, save_graph, tiny_meta


def _plain_batch_of_one(path: Path) -> None:
    """[1, 3, 8, 8] float -> global average pool -> a linear layer -> [1, 4]."""
    rng = np.random.default_rng(1)
    init = [
        numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("GlobalAveragePool", ["input.1"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], ["191"], transB=1),
    ]
    save_graph(
        path, nodes, [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("191", TensorProto.FLOAT, [1, 4])], init,
    )  # fmt: skip


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fixed")
    _plain_batch_of_one(root / "plain1" / "1" / "model.onnx")
    model = build_tiny_model(tiny_meta(num_classes=5))  # svertka's metadata, batch fixed at 1
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    (root / "tiny1" / "1").mkdir(parents=True)
    onnx.save(model, str(root / "tiny1" / "1" / "model.onnx"))
    (root / "tiny1" / "config.yaml").write_text("max_batch_size: 8\n")  # no batch is formed anyway
    return root


@pytest.fixture(scope="module", params=["one-process", "engine-process"])
def stub(request, repository):
    server = InProcessServer(repository, engine_process=request.param == "engine-process")
    with server.channel() as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)
    server.close()


def _request(x: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="plain1")
    request.inputs.add(name="input.1", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def test_metadata_and_config_give_the_full_shape_and_max_batch_size_0(stub):
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="plain1"), timeout=10)
    assert [(t.name, list(t.shape)) for t in meta.inputs] == [("input.1", [1, 3, 8, 8])]
    assert [(t.name, list(t.shape)) for t in meta.outputs] == [("191", [1, 4])]
    config = stub.ModelConfig(pb.ModelConfigRequest(name="plain1"), timeout=10).config
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [1, 3, 8, 8] and list(config.output[0].dims) == [1, 4]
    dynamic = stub.ModelConfig(pb.ModelConfigRequest(name="tiny1"), timeout=10).config
    assert dynamic.max_batch_size == 0 and list(dynamic.input[0].dims) == [1, 3, 32, 32]


def test_concurrent_requests_of_one_each_run_alone_and_match_onnxruntime(stub, repository):
    session = ort.InferenceSession(str(repository / "plain1" / "1" / "model.onnx"))
    xs = np.random.default_rng(3).standard_normal((16, 1, 3, 8, 8), dtype=np.float32)

    def infer(x):
        response = stub.ModelInfer(_request(x), timeout=30)
        assert list(response.outputs[0].shape) == [1, 4]
        return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(1, 4)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # would be batched if the model allowed it
        got = list(pool.map(infer, xs))
    for x, y in zip(xs, got, strict=True):
        np.testing.assert_allclose(y, session.run(None, {"input.1": x})[0], rtol=1e-5, atol=1e-6)


def test_a_request_with_another_batch_is_refused_with_the_shape_it_must_have(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(_request(np.zeros((2, 3, 8, 8), np.float32)), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected FP32 shape [1,3,8,8], got [2,3,8,8]" in info.value.details(), info.value.details()


def test_several_images_to_a_batch_of_one_model_run_one_at_a_time(stub, repository):
    pictures = [images.png(seed, size=32) for seed in range(3)]
    request = pb.ModelInferRequest(model_name="tiny1")
    tensor = request.inputs.add(name="input", datatype="BYTES", shape=[3])
    tensor.contents.bytes_contents.extend(pictures)
    response = stub.ModelInfer(request, timeout=30)
    got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(3, 5)
    batch = np.stack([images.preprocess(repository, "tiny1", 1, p) for p in pictures])
    expected = np.concatenate([images.offline_logits(repository, "tiny1", 1, row[None]) for row in batch])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
