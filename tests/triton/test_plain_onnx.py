"""A torchvision classifier exported with plain ``torch.onnx.export`` (no svertka metadata), served
to tritonclient and perf_analyzer as Triton serves it: names, datatypes and shapes from the graph."""

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
    """torchvision resnet18 (random weights, 10 classes, 64x64 to keep it quick), as its users export it."""
    import torch
    import torchvision

    repo = tmp_path_factory.mktemp("byo")
    path = repo / "resnet18" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(2, 3, 64, 64),), str(path), input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False,
        )  # fmt: skip
    return repo


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    server = ServerProcess(exported, tmp_path_factory.mktemp("logs") / "server.log").start().wait_serving()
    yield server
    assert server.stop() == 0


def test_tritonclient_gets_the_graphs_own_signature_and_onnxruntimes_logits(exported, served):
    session = ort.InferenceSession(str(exported / "resnet18" / "1" / "model.onnx"))
    with grpcclient.InferenceServerClient(served.address) as client:
        meta = client.get_model_metadata("resnet18", as_json=True)
        assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
            ("x", "FP32", ["-1", "3", "64", "64"])
        ]
        assert [(o["name"], o["shape"]) for o in meta["outputs"]] == [("y", ["-1", "10"])]
        x = np.random.default_rng(0).standard_normal((3, 3, 64, 64), dtype=np.float32)
        tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        got = client.infer("resnet18", [tensor]).as_numpy("y")
    np.testing.assert_allclose(got, session.run(None, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_perf_analyzer_runs_against_it(served, tmp_path):
    levels = run_perf_analyzer(served.address, "resnet18", "1:2", tmp_path / "perf.csv")
    assert [c for c, _ in levels] == [1, 2] and all(rate > 0 for _, rate in levels)
