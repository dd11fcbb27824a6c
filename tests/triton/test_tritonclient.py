"""Triton's own clients against svertka: tritonclient.grpc and perf_analyzer, unchanged."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import queue
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.api import images
from tests.triton.conftest import run_perf_analyzer

pytestmark = pytest.mark.triton

MODEL = "tiny"


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(server.address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def session(repository):
    return ort.InferenceSession(
        str(repository / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )


def _input(x: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def test_metadata_config_and_readiness(client, repository):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    meta = client.get_model_metadata(MODEL, as_json=True)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]
    config = client.get_model_config(MODEL, as_json=True)["config"]
    assert config["max_batch_size"] == 16
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == "10000"
    sha256 = config["parameters"]["sha256"]["string_value"]  # which weights answer: the file's sha256
    assert sha256 == hashlib.sha256((repository / MODEL / "1" / "model.onnx").read_bytes()).hexdigest()[:12]
    server_meta = client.get_server_metadata(as_json=True)
    assert {"statistics", "system_shared_memory"} <= set(server_meta["extensions"])
    index = client.get_model_repository_index(as_json=True)
    assert index["models"] == [{"name": MODEL, "version": "1", "state": "READY"}]


def test_infer_equals_onnxruntime_bit_for_bit(client, session):
    for rows in (1, 4):
        x = np.random.default_rng(rows).normal(size=(rows, 3, 32, 32)).astype(np.float32)
        result = client.infer(MODEL, [_input(x)], request_id=f"bits{rows}")
        assert result.get_response().id == f"bits{rows}"
        np.testing.assert_array_equal(result.as_numpy("logits"), session.run(None, {"input": x})[0])


#: Rounds of 64 concurrent requests, until one shares a batch. The batcher dispatches at once when
#: idle, so whether two requests meet in a batch depends on scheduling: on a busy 2-core host one
#: round with --frontends 2 once ran all 64 alone. Every round's answers are checked.
BATCHING_ROUNDS = 5


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(client, session):
    xs = [np.random.default_rng(100 + i).normal(size=(1, 3, 32, 32)).astype(np.float32) for i in range(64)]
    rounds = []
    for _ in range(BATCHING_ROUNDS):
        before = client.get_inference_statistics(MODEL).model_stats[0]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda x: client.infer(MODEL, [_input(x)]).as_numpy("logits"), xs))
        after = client.get_inference_statistics(MODEL).model_stats[0]
        inferences = after.inference_count - before.inference_count
        executions = after.execution_count - before.execution_count
        assert inferences == 64
        for x, logits in zip(xs, got, strict=True):
            single = session.run(None, {"input": x})[0]
            np.testing.assert_allclose(logits, single, rtol=1e-5, atol=1e-5)
            assert logits.argmax() == single.argmax()
        rounds.append(executions)
        if executions < inferences:
            break
    assert rounds[-1] < 64, f"{rounds} batches for 64 rows in each round: nothing was batched"
    assert max(b.batch_size for b in after.batch_stats) > 1


def test_encoded_images_as_bytes_with_classification(client, repository):
    payloads = [images.png(1), images.jpeg(2)]
    inp = grpcclient.InferInput("input", [2], "BYTES")
    inp.set_data_from_numpy(np.array(payloads, dtype=np.object_))
    out = grpcclient.InferRequestedOutput("logits", class_count=3)
    top3 = client.infer(MODEL, [inp], outputs=[out]).as_numpy("logits")
    assert top3.shape == (2, 3)
    x = np.stack([images.preprocess(repository, MODEL, 1, p) for p in payloads])
    expected = images.offline_logits(repository, MODEL, 1, x)
    for row in range(2):
        indices = [int(item.decode().split(":")[1]) for item in top3[row]]
        assert indices == np.argsort(-expected[row], kind="stable")[:3].tolist()


def test_streaming(client, session):
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    xs = {
        f"s{i}": np.random.default_rng(200 + i).normal(size=(1, 3, 32, 32)).astype(np.float32)
        for i in range(10)
    }
    try:
        for rid, x in xs.items():
            client.async_stream_infer(MODEL, [_input(x)], request_id=rid)
        client.async_stream_infer("nope", [_input(xs["s0"])], request_id="bad")
        got = [responses.get(timeout=30) for _ in range(11)]
    finally:
        client.stop_stream()
    errors = [error for _, error in got if error is not None]
    assert len(errors) == 1 and "model 'nope' is not in the repository" in errors[0].message()
    for result, _ in (g for g in got if g[1] is None):
        rid = result.get_response().id
        np.testing.assert_allclose(
            result.as_numpy("logits"), session.run(None, {"input": xs[rid]})[0], rtol=1e-5, atol=1e-5
        )


def test_errors_reach_tritonclient_with_their_status(client):
    x = np.zeros((1, 3, 16, 16), np.float32)
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [_input(x)])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "expected FP32 shape [N,3,32,32], got [1,3,16,16]" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.get_cuda_shared_memory_status()
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"


@pytest.fixture()
def shm_object():
    """A POSIX shared memory object as ``shm_open`` makes it on Linux: ``/dev/shm/<name>``.

    (tritonclient.utils.shared_memory does the same through its C helper, but imports
    pkg_resources, which this environment's setuptools no longer ships.)
    """
    made = []

    def make(size: int) -> tuple[str, Path]:
        path = Path("/dev/shm") / f"svertka-tc-{os.getpid()}-{len(made)}"
        path.write_bytes(bytes(size))
        made.append(path)
        return "/" + path.name, path

    yield make
    for path in made:
        path.unlink(missing_ok=True)


def test_tritonclient_system_shared_memory(client, session, shm_object):
    x = np.random.default_rng(7).normal(size=(2, 3, 32, 32)).astype(np.float32)
    in_key, in_path = shm_object(x.nbytes)
    out_key, out_path = shm_object(4096)
    in_path.write_bytes(x.tobytes())
    client.unregister_system_shared_memory()
    client.register_system_shared_memory("in", in_key, x.nbytes)
    client.register_system_shared_memory("out", out_key, 4096)
    try:
        status = client.get_system_shared_memory_status(as_json=True)
        assert {r["name"]: r["key"] for r in status["regions"].values()} == {"in": in_key, "out": out_key}
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_shared_memory("in", x.nbytes)
        out = grpcclient.InferRequestedOutput("logits")
        out.set_shared_memory("out", 2 * 10 * 4)
        result = client.infer(MODEL, [inp], outputs=[out])
        assert result.get_output("logits").shape == [2, 10]
        got = np.frombuffer(out_path.read_bytes()[: 2 * 10 * 4], np.float32).reshape(2, 10)
        np.testing.assert_array_equal(got, session.run(None, {"input": x})[0])
        # a region that is not registered: the client library surfaces INVALID_ARGUMENT
        missing = grpcclient.InferInput("input", list(x.shape), "FP32")
        missing.set_shared_memory("nope", x.nbytes)
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL, [missing])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "region 'nope' is not registered" in info.value.message()
    finally:
        client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode", ["unary", "streaming", "shared-memory"], ids=["unary", "streaming", "shared-memory"]
)
def test_perf_analyzer_runs_against_the_server(server, tmp_path, mode):
    # No --input-data: perf_analyzer's default "random" FP32 data is random bytes, NaN and Inf
    # included, which svertka computes like Triton does (reject_non_finite_inputs is off).
    extra = {"unary": (), "streaming": ("--streaming",), "shared-memory": ("--shared-memory", "system")}[mode]
    levels = run_perf_analyzer(server.address, MODEL, "1:4", tmp_path / "perf.csv", *extra)
    assert [c for c, _ in levels] == [1, 2, 3, 4] and all(rate > 0 for _, rate in levels)


def test_default_model_infer_equals_onnxruntime_bit_for_bit(tmp_path):
    """The same parity on the real default model (ResNet-20 with BatchNorm), when `make model` built it."""
    from bench.target import ServerProcess

    model_file = Path(__file__).resolve().parents[2] / "models" / "digits" / "1" / "model.onnx"
    if not model_file.is_file():
        pytest.skip(f"{model_file} is not built: run `make model`")
    repo = tmp_path / "repo"
    (repo / "digits").mkdir(parents=True)
    (repo / "digits" / "1").symlink_to(model_file.parent)
    server = ServerProcess(repo, tmp_path / "server.log").start().wait_serving()
    try:
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        with grpcclient.InferenceServerClient(server.address) as client:
            for rows in (1, 3):
                x = np.random.default_rng(rows).normal(size=(rows, 3, 32, 32)).astype(np.float32)
                got = client.infer("digits", [_input(x)]).as_numpy("logits")
                np.testing.assert_array_equal(got, session.run(None, {"input": x})[0])
    finally:
        assert server.stop() == 0
