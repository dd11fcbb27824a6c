"""A graph with outputs besides its classifier's, served as Triton serves them.

ModelMetadata and ModelConfig list every output with its datatype; ModelInfer returns every
output when none is named, or the ones named, each in its own datatype and equal to
onnxruntime's; requests batched together each get their own rows of every output. An output
svertka cannot split by rows is UNAVAILABLE with the reason.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service import modelmeta
from service.gen.inference import grpc_service_pb2 as pb
from service.gen.inference import grpc_service_pb2_grpc as pb_grpc
from tests.api.conftest import InProcessServer
from tests.helpers.tinymodel import save_graph

#: name -> (KServe datatype, numpy dtype, dims after the batch), in graph order
OUTPUTS = {
    "logits": ("FP32", "<f4", (4,)),
    "features": ("FP32", "<f4", (3,)),
    "top": ("INT64", "<i8", ()),
    "half": ("FP16", "<f2", (2, 2)),
}


def _save(path: Path, nodes, outputs, init) -> None:
    save_graph(
        path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])], outputs, init
    )


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multi")
    rng = np.random.default_rng(4)
    init = [
        numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.asarray([-1, 2, 2], np.int64), "shape22"),
    ]
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"]),
        helper.make_node("Gemm", ["features", "w"], ["logits"], transB=1),
        helper.make_node("ArgMax", ["logits"], ["top"], axis=1, keepdims=0),
        helper.make_node("Cast", ["logits"], ["logits16"], to=TensorProto.FLOAT16),
        helper.make_node("Reshape", ["logits16", "shape22"], ["half"]),
    ]
    v = helper.make_tensor_value_info
    types = {"FP32": TensorProto.FLOAT, "INT64": TensorProto.INT64, "FP16": TensorProto.FLOAT16}
    outputs = [v(name, types[dt], ["n", *dims]) for name, (dt, _, dims) in OUTPUTS.items()]
    _save(root / "multi" / "1" / "model.onnx", nodes, outputs, init)
    # An extra output whose size after the batch is not fixed cannot be split into rows.
    _save(root / "ragged" / "1" / "model.onnx", nodes[:3] + [helper.make_node("NonZero", ["logits"], ["nz"])],
          [v("logits", TensorProto.FLOAT, ["n", 4]), v("nz", TensorProto.INT64, [2, "k"])], init[:1])  # fmt: skip
    return root


@pytest.fixture(scope="module", params=["one-process", "engine-process"])
def stub(request, repository):
    server = InProcessServer(repository, engine_process=request.param == "engine-process")
    with server.channel() as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)
    server.close()


def _request(x: np.ndarray, *names: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="multi")
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    for name in names:
        request.outputs.add(name=name)
    return request


def _outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    got = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        (datatype, dtype, _) = OUTPUTS[tensor.name]
        assert tensor.datatype == datatype, tensor
        got[tensor.name] = np.frombuffer(raw, dtype).reshape(tuple(tensor.shape))
    return got


def test_metadata_and_config_list_every_output(stub):
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="multi"), timeout=10)
    assert [(o.name, o.datatype, list(o.shape)) for o in meta.outputs] == [
        (name, dt, [-1, *dims]) for name, (dt, _, dims) in OUTPUTS.items()
    ]
    config = stub.ModelConfig(pb.ModelConfigRequest(name="multi"), timeout=10).config
    assert [(o.name, list(o.dims)) for o in config.output] == [
        (n, list(d)) for n, (_, _, d) in OUTPUTS.items()
    ]


def test_every_output_comes_back_as_onnxruntime_computes_it_batched_or_not(stub, repository):
    session = ort.InferenceSession(str(repository / "multi" / "1" / "model.onnx"))
    xs = np.random.default_rng(5).standard_normal((12, 3, 3, 8, 8), dtype=np.float32)

    def infer(x):
        return _outputs(stub.ModelInfer(_request(x), timeout=30))

    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # requests share batches
        answers = list(pool.map(infer, xs))
    for x, got in zip(xs, answers, strict=True):
        assert list(got) == list(OUTPUTS)
        for name, want in zip(OUTPUTS, session.run(list(OUTPUTS), {"x": x}), strict=True):
            assert got[name].shape == want.shape, name
            np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_named_outputs_only_and_classification_on_the_classifiers_output_only(stub):
    x = np.random.default_rng(6).standard_normal((2, 3, 8, 8), dtype=np.float32)
    got = _outputs(stub.ModelInfer(_request(x, "top", "half"), timeout=30))
    assert list(got) == ["top", "half"] and got["top"].dtype == np.int64
    request = _request(x, "features")
    request.outputs[0].parameters["classification"].int64_param = 2
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "applies to the classifier's output 'logits' only" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(_request(x, "nope"), timeout=30)
    assert "has outputs ['logits', 'features', 'top', 'half']" in info.value.details()


def test_an_output_that_cannot_be_split_into_rows_is_unavailable_with_the_reason(stub):
    (entry,) = [
        m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models if m.name == "ragged"
    ]
    assert entry.state == "UNAVAILABLE"
    assert (
        "output 'nz' has shape [2, 'k']" in entry.reason and "sizes after the batch are fixed" in entry.reason
    )


def test_packing_round_trips_every_datatype():
    meta = modelmeta.ModelMeta(
        labels=("a", "b", "c"), crop=(8, 8), resize=8, mean=(0, 0, 0), std=(1, 1, 1), arch="x",
        extra_outputs=[("f16", "float16", (5,)), ("i64", "int64", ()), ("mask", "bool", (2, 3))],
    )  # fmt: skip
    rng = np.random.default_rng(7)
    arrays = [
        rng.standard_normal((4, 3)).astype(np.float32),
        rng.standard_normal((4, 5)).astype(np.float16),
        rng.integers(-(2**62), 2**62, 4),
        rng.random((4, 2, 3)) > 0.5,
    ]
    packed = modelmeta.pack_outputs(meta, arrays)
    assert packed.dtype == np.float32 and packed.shape == (4, meta.row_width) == (4, 3 + 3 + 2 + 2)
    np.testing.assert_array_equal(packed[:, :3], arrays[0])
    for index, array in enumerate(arrays[1:]):
        np.testing.assert_array_equal(modelmeta.extra_output(meta, packed[1:3], index), array[1:3])
