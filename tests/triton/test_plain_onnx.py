"""A torchvision classifier exported with plain ``torch.onnx.export`` (no svertka metadata), served
to tritonclient and perf_analyzer as Triton serves it: names, datatypes and shapes from the graph."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from bench.target import ServerProcess
from tests.triton.conftest import CUDART_DIR

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
    binary = str(Path(sys.executable).parent / "perf_analyzer")
    if not os.path.exists(binary):
        pytest.skip("perf_analyzer is not installed (tritonclient[grpc]==2.41.0 bundles it)")
    env = {**os.environ, "LD_LIBRARY_PATH": f"{CUDART_DIR}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    report = tmp_path / "perf.csv"
    command = [
        binary, "-i", "grpc", "-u", served.address, "-m", "resnet18", "--concurrency-range", "1:2",
        "--measurement-interval", "500", "--stability-percentage", "1000", "--max-trials", "10",
        "-f", str(report),
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = report.read_text().strip().splitlines()
    assert sorted(int(r.split(",")[0]) for r in rows[1:]) == [1, 2] and all(
        float(r.split(",")[1]) > 0 for r in rows[1:]
    )
