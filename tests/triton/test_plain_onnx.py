"""torchvision classifiers exported with plain ``torch.onnx.export`` (no svertka metadata), served
to tritonclient and perf_analyzer as Triton serves them: names, datatypes and shapes from the graph.

resnet18 with a dynamic batch dimension (batched); mobilenet_v3_small as ``torch.onnx.export``
writes it by default, its batch fixed at 1 (Triton's ``max_batch_size: 0``: nothing batched,
shapes reported whole)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from bench.target import ServerProcess
from tests.triton.conftest import run_perf_analyzer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """Random weights, 10 classes, 64x64 to keep it quick, exported as their users export them."""
    import torch
    import torchvision

    repo = tmp_path_factory.mktemp("byo")
    torch.manual_seed(0)
    for name, model, dynamic in (
        ("resnet18", torchvision.models.resnet18(num_classes=10), {"x": {0: "batch"}, "y": {0: "batch"}}),
        ("mobilenet", torchvision.models.mobilenet_v3_small(num_classes=10), None),
    ):
        path = repo / name / "1" / "model.onnx"
        path.parent.mkdir(parents=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.eval(), (torch.randn(1, 3, 64, 64),), str(path), input_names=["x"], output_names=["y"],
                dynamic_axes=dynamic, dynamo=False,
            )  # fmt: skip
    return repo


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    server = ServerProcess(exported, tmp_path_factory.mktemp("logs") / "server.log").start().wait_serving()
    yield server
    assert server.stop() == 0


@pytest.mark.parametrize("model, batch, rows", [("resnet18", "-1", 3), ("mobilenet", "1", 1)])
def test_tritonclient_gets_the_graphs_own_signature_and_onnxruntimes_logits(
    exported, served, model, batch, rows
):
    session = ort.InferenceSession(str(exported / model / "1" / "model.onnx"))
    with grpcclient.InferenceServerClient(served.address) as client:
        meta = client.get_model_metadata(model, as_json=True)
        assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
            ("x", "FP32", [batch, "3", "64", "64"])
        ]
        assert [(o["name"], o["shape"]) for o in meta["outputs"]] == [("y", [batch, "10"])]
        config = client.get_model_config(model, as_json=True)["config"]
        assert int(config.get("max_batch_size", 0)) == (0 if batch == "1" else 32)
        x = np.random.default_rng(0).standard_normal((rows, 3, 64, 64), dtype=np.float32)
        tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        got = client.infer(model, [tensor]).as_numpy("y")
    np.testing.assert_allclose(got, session.run(None, {"x": x})[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", ["resnet18", "mobilenet"])
def test_perf_analyzer_runs_against_it(served, tmp_path, model):
    levels = run_perf_analyzer(served.address, model, "1:2", tmp_path / "perf.csv")
    assert [c for c, _ in levels] == [1, 2] and all(rate > 0 for _, rate in levels)


def test_tritonclient_reads_every_output_of_a_graph_with_several(tmp_path_factory):
    """A classifier with its features and its argmax beside the logits: each in its own datatype."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    repo = tmp_path_factory.mktemp("multi")
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["features"]),
            helper.make_node("Gemm", ["features", "w"], ["logits"], transB=1),
            helper.make_node("ArgMax", ["logits"], ["top"], axis=1, keepdims=0),
        ],
        "multi",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 5]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("top", TensorProto.INT64, ["n"]),
        ],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = repo / "multi" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))
    x = np.random.default_rng(2).standard_normal((4, 3, 16, 16), dtype=np.float32)
    want = ort.InferenceSession(str(path)).run(None, {"x": x})
    server = ServerProcess(repo, tmp_path_factory.mktemp("logs") / "server.log").start().wait_serving()
    try:
        with grpcclient.InferenceServerClient(server.address) as client:
            meta = client.get_model_metadata("multi", as_json=True)
            assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [
                ("logits", "FP32"), ("features", "FP32"), ("top", "INT64")
            ]  # fmt: skip
            tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            result = client.infer("multi", [tensor])
            for name, expected in zip(("logits", "features", "top"), want, strict=True):
                np.testing.assert_allclose(result.as_numpy(name), expected, rtol=1e-5, atol=1e-6)
            assert result.as_numpy("top").dtype == np.int64
    finally:
        assert server.stop() == 0
