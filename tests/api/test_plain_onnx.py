"""ONNX classifiers without svertka metadata (a torchvision or timm export, a file from another team).

Served through the tensor API as Triton serves them: input and output names,
datatypes and shapes from the graph, classes named by index. Their
preprocessing is unknown, so images (Classify, BYTES) get FAILED_PRECONDITION
saying so; what svertka cannot serve is UNAVAILABLE with a reason that says
what it serves. Plain ONNX graphs made here with onnx.helper; a real
torchvision export is in tests/triton/test_plain_onnx.py.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import annotate
from service.gen.inference import grpc_service_pb2 as pb
from service.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.gen.svertka.v1 import classifier_pb2 as cpb
from service.gen.svertka.v1 import classifier_pb2_grpc as cpb_grpc
from tests.api import images
from tests.api.conftest import InProcessServer

SUPPORTED = "svertka serves classifiers with one image input"
ANNOTATED_LABELS = ("ant", "bee", "cat", "dog")


def _save(path: Path, inputs, outputs, nodes, initializers=()) -> None:
    graph = helper.make_graph(nodes, "plain", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _head(source: str, output: str, classes: int = 4) -> tuple[list, list]:
    """Global average pool -> flatten -> a linear layer: [N, 3, H, W] float -> [N, classes]."""
    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array(rng.standard_normal((classes, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "b")
    nodes = [
        helper.make_node("GlobalAveragePool", [source], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], [output], transB=1),
    ]
    return nodes, [weight, bias]


@pytest.fixture(scope="module")
def plain_repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plain")
    v = helper.make_tensor_value_info
    nodes, init = _head("data", "scores")
    _save(root / "plainnchw" / "1" / "model.onnx", [v("data", TensorProto.FLOAT, ["n", 3, 8, 8])],
          [v("scores", TensorProto.FLOAT, ["n", 4])], nodes, init)  # fmt: skip
    # The same graph annotated (svertka annotate --out): a fully known model, images included.
    labels = root / "labels.txt"
    labels.write_text("".join(f"{label}\n" for label in ANNOTATED_LABELS))
    (root / "annotated" / "1").mkdir(parents=True)
    pre = annotate.Preprocessing(resize=10, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    out = root / "annotated" / "1" / "model.onnx"
    annotate.annotate(annotate.Request(root / "plainnchw" / "1" / "model.onnx", labels, pre, out=out))
    nodes, init = _head("nchw", "out")
    _save(root / "plainu8" / "1" / "model.onnx", [v("pixels", TensorProto.UINT8, ["n", 8, 8, 3])],
          [v("out", TensorProto.FLOAT, ["n", 4])],
          [helper.make_node("Cast", ["pixels"], ["f"], to=TensorProto.FLOAT),
           helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2]), *nodes], init)  # fmt: skip
    nodes, init = _head("data32", "scores16")  # an FP16 input, cast to float inside the graph
    _save(root / "plainfp16" / "1" / "model.onnx", [v("data", TensorProto.FLOAT16, ["n", 3, 8, 8])],
          [v("scores16", TensorProto.FLOAT, ["n", 4])],
          [helper.make_node("Cast", ["data"], ["data32"], to=TensorProto.FLOAT), *nodes], init)  # fmt: skip
    nodes, init = _head("data", "raw")
    _save(root / "plainsoftmax" / "1" / "model.onnx", [v("data", TensorProto.FLOAT, ["n", 3, 8, 8])],
          [v("prob", TensorProto.FLOAT, ["n", 4])],
          [*nodes, helper.make_node("Softmax", ["raw"], ["prob"], axis=1)], init)  # fmt: skip
    nodes, init = _head("left", "y")
    _save(root / "twoinputs" / "1" / "model.onnx",
          [v("left", TensorProto.FLOAT, ["n", 3, 8, 8]), v("right", TensorProto.FLOAT, ["n", 3, 8, 8])],
          [v("y", TensorProto.FLOAT, ["n", 4])], nodes, init)  # fmt: skip
    nodes, init = _head("x", "y")
    _save(root / "anysize" / "1" / "model.onnx", [v("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
          [v("y", TensorProto.FLOAT, ["n", 4])], nodes, init)  # fmt: skip
    _save(root / "grey" / "1" / "model.onnx", [v("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
          [v("y", TensorProto.FLOAT, ["n", 1, 1, 1])], [helper.make_node("GlobalAveragePool", ["x"], ["y"])])  # fmt: skip
    return root


@pytest.fixture(scope="module", params=["one-process", "engine-process"])
def plain_server(request, plain_repository):
    srv = InProcessServer(plain_repository, engine_process=request.param == "engine-process")
    yield srv
    srv.close()


@pytest.fixture()
def stub(plain_server):
    with plain_server.channel() as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _infer(stub, model: str, name: str, datatype: str, x: np.ndarray) -> pb.ModelInferResponse:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return stub.ModelInfer(request, timeout=30)


@pytest.mark.parametrize(
    "model, name, datatype, shape, output",
    [
        ("plainnchw", "data", "FP32", [3, 8, 8], "scores"),
        ("plainu8", "pixels", "UINT8", [8, 8, 3], "out"),
        ("plainfp16", "data", "FP16", [3, 8, 8], "scores16"),
    ],
)
def test_a_plain_classifier_is_served_as_its_graph_says(
    stub, plain_repository, model, name, datatype, shape, output
):
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=10)
    ((inp,), (out,)) = meta.inputs, meta.outputs
    assert (inp.name, inp.datatype, list(inp.shape)) == (name, datatype, [-1, *shape])
    assert (out.name, out.datatype, list(out.shape)) == (output, "FP32", [-1, 4])
    rng = np.random.default_rng(2)
    x = (rng.integers(0, 256, (5, *shape), dtype=np.uint8) if datatype == "UINT8"
         else rng.standard_normal((5, *shape), dtype=np.float32).astype(datatype.lower().replace("fp", "float")))  # fmt: skip
    config = stub.ModelConfig(pb.ModelConfigRequest(name=model), timeout=10).config
    assert config.parameters["precision"].string_value == ("fp16" if datatype == "FP16" else "fp32")
    response = _infer(stub, model, name, datatype, x)
    got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(5, 4)
    session = ort.InferenceSession(str(plain_repository / model / "1" / "model.onnx"))
    np.testing.assert_allclose(got, session.run(None, {name: x})[0], rtol=1e-5, atol=1e-5)
    # classes are named by index
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=[1, *shape])
    request.raw_input_contents.append(x[:1].tobytes())
    request.outputs.add(name=output).parameters["classification"].int64_param = 1
    top = stub.ModelInfer(request, timeout=30).raw_output_contents[0][4:].decode()  # "score:index:label"
    assert top.split(":")[1] == top.split(":")[2] == str(int(got[0].argmax()))


def test_a_graph_ending_in_softmax_is_known_to_give_probabilities(plain_repository):
    """Its scores are its values, never softmaxed a second time (what Classify reports once a
    file's preprocessing is known; the tensor API's classification reports raw values, as Triton's)."""
    from service.engine import interface, runtime

    def meta(model: str):
        path = plain_repository / model / "1" / "model.onnx"
        return runtime.graph_metadata(ort.InferenceSession(str(path)), path)

    softmax, plain = meta("plainsoftmax"), meta("plainnchw")
    assert (softmax.output, plain.output) == ("probabilities", "logits")
    row = np.asarray([0.1, 0.6, 0.2, 0.1], np.float32)
    assert [round(p, 6) for _, _, p in interface.top_k(softmax, row, 2)] == [0.6, 0.2]
    softmaxed = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    assert [round(p, 6) for _, _, p in interface.top_k(plain, row, 1)] == [round(float(softmaxed[1]), 6)]


def test_images_to_a_plain_classifier_say_why_not(plain_server, stub):
    with plain_server.channel() as channel:
        with pytest.raises(grpc.RpcError) as info:
            cpb_grpc.ImageClassifierStub(channel).Classify(
                cpb.ClassifyRequest(model="plainnchw", image=images.png(1)), timeout=30
            )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has no svertka metadata" in info.value.details()
    assert "ModelInfer with FP32 [N,3,8,8]" in info.value.details(), info.value.details()
    assert "svertka annotate adds it" in info.value.details()
    request = pb.ModelInferRequest(model_name="plainu8")
    tensor = request.inputs.add(name="pixels", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(images.png(1))
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    "model, reason",
    [
        ("twoinputs", "the graph has 2 inputs ['left', 'right']"),
        ("anysize", "its height and width are not fixed in the graph"),
        ("grey", "no axis of 3 colour channels after the batch"),
    ],
)
def test_what_svertka_cannot_serve_is_unavailable_with_the_reason(stub, model, reason):
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    (entry,) = [m for m in index.models if m.name == model]
    assert entry.state == "UNAVAILABLE"
    assert reason in entry.reason and SUPPORTED in entry.reason, entry.reason
    ready = stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=10)
    assert not ready.ready


def test_an_annotated_copy_classifies_images_as_its_metadata_says(plain_server, plain_repository):
    """``svertka annotate --out`` made ``annotated`` from ``plainnchw``'s graph: Classify serves it
    with its labels, on the server's preprocessing of the image and onnxruntime's logits."""
    image = images.png(3, size=24)
    with plain_server.channel() as channel:
        response = cpb_grpc.ImageClassifierStub(channel).Classify(
            cpb.ClassifyRequest(model="annotated", image=image, top_k=4), timeout=30
        )
    batch = images.preprocess(plain_repository, "annotated", 1, image)[None]
    expected = images.softmax(images.offline_logits(plain_repository, "annotated", 1, batch))[0]
    got = {p.label: p.score for p in response.predictions}
    assert got == pytest.approx(dict(zip(ANNOTATED_LABELS, expected.tolist(), strict=True)), abs=1e-5)
    assert response.predictions[0].label == ANNOTATED_LABELS[int(expected.argmax())]


def test_a_plain_model_is_hot_reloaded_with_its_new_fingerprint(tmp_path):
    """The guarantees of svertka's own files: a new version found by polling replaces the old one, and
    ModelConfig's sha256 says which weights answer."""
    import os
    import time

    v = helper.make_tensor_value_info

    def write(version: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        weight = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
        nodes = [
            helper.make_node("GlobalAveragePool", ["data"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Gemm", ["flat", "w"], ["scores"], transB=1),
        ]
        staging = tmp_path / f".v{version}" / "model.onnx"
        _save(staging, [v("data", TensorProto.FLOAT, ["n", 3, 8, 8])], [v("scores", TensorProto.FLOAT, ["n", 4])],
              nodes, [weight])  # fmt: skip
        (tmp_path / "repo" / "plain").mkdir(parents=True, exist_ok=True)
        os.rename(staging.parent, tmp_path / "repo" / "plain" / str(version))  # whole, as deployments should

    write(1, seed=1)
    server = InProcessServer(tmp_path / "repo", repository_poll_s=0.1)
    try:
        with server.channel() as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            x = np.random.default_rng(3).standard_normal((2, 3, 8, 8), dtype=np.float32)
            first = stub.ModelConfig(pb.ModelConfigRequest(name="plain"), timeout=10).config.parameters[
                "sha256"
            ]
            assert _infer(stub, "plain", "data", "FP32", x).model_version == "1"
            write(2, seed=2)
            deadline = time.monotonic() + 30
            while (response := _infer(stub, "plain", "data", "FP32", x)).model_version != "2":
                assert time.monotonic() < deadline, "version 2 was not served within 30 s"
                time.sleep(0.05)
            got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 4)
            session = ort.InferenceSession(str(tmp_path / "repo" / "plain" / "2" / "model.onnx"))
            np.testing.assert_allclose(got, session.run(None, {"data": x})[0], rtol=1e-5, atol=1e-6)
            second = stub.ModelConfig(pb.ModelConfigRequest(name="plain"), timeout=10).config.parameters[
                "sha256"
            ]
            assert first.string_value and second.string_value and first.string_value != second.string_value
    finally:
        server.close()
