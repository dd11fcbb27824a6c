"""New and removed model versions while clients are sending: atomic swaps, nothing fails.

A new version is dropped into the repository (found by ``--repository-poll-s``
or loaded with RepositoryModelLoad under ``--enable-model-control``), is
loaded and warmed beside the serving one and swapped in; then it is removed
again and the server goes back to the old one. Throughout, a set of clients
keeps both APIs busy and checks every answer against the offline answer *of
the version the server says computed it*, so a request answered by one
version but labelled with another, or a half-swapped model, fails the test.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time

import grpc
import numpy as np
import pytest

from service.gen.inference import grpc_service_pb2 as kpb
from service.gen.inference import grpc_service_pb2_grpc as kgrpc
from service.gen.svertka.v1 import classifier_pb2 as cpb
from service.gen.svertka.v1 import classifier_pb2_grpc as cgrpc
from tests.api import images
from tests.reliability import harness
from tests.reliability.slowmodel import make_slow_model

pytestmark = pytest.mark.integration

#: A little compute per batch (~15 ms) so that requests are in flight at the moment of a swap.
MATMULS = 2
TENSOR_CLIENTS = 5
IMAGE_CLIENTS = 2
STREAM_CLIENTS = 1
#: Answers each phase must see before the next change is made.
PER_PHASE = 150


def _add_version(repo, version: int) -> None:
    """Write the version next to the model and rename it into place, the way a deploy tool should."""
    staging = repo / "tiny" / f".staging-{version}"
    make_slow_model(staging / "model.onnx", matmuls=MATMULS, seed=version)
    os.rename(staging, repo / "tiny" / str(version))


class _Clients:
    """Background clients; ``answers`` holds (client, seq, version, start, end) of every OK answer."""

    def __init__(self, address: str, references: dict[int, dict]) -> None:
        self.address = address
        self.references = references
        self.answers: list[tuple[int, int, int, float, float]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        kinds = ["tensor"] * TENSOR_CLIENTS + ["image"] * IMAGE_CLIENTS + ["stream"] * STREAM_CLIENTS
        self._threads = [threading.Thread(target=self._run, args=(i, kind)) for i, kind in enumerate(kinds)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def count(self, version: int, after: float = 0.0) -> int:
        with self._lock:
            return sum(1 for a in self.answers if a[2] == version and a[3] >= after)

    def _check(self, client: int, seq: int, version: int, got: np.ndarray, kind: str, start: float) -> None:
        ref = self.references.get(version)
        if ref is None:
            problem = f"answered by unexpected version {version}"
        elif not np.allclose(got, ref[kind], atol=1e-4, rtol=1e-4):
            problem = f"answer does not match version {version}'s offline answer"
        else:
            problem = None
        with self._lock:
            if problem:
                self.failures.append(f"client {client} #{seq}: {problem}")
            else:
                self.answers.append((client, seq, version, start, time.monotonic()))

    def _fail(self, client: int, seq: int, text: str) -> None:
        with self._lock:
            self.failures.append(f"client {client} #{seq}: {text}")

    def _run(self, client: int, kind: str) -> None:
        x = self.references["x"]
        image = self.references["image"]
        with grpc.insecure_channel(self.address) as channel:
            tensors = kgrpc.GRPCInferenceServiceStub(channel)
            classifier = cgrpc.ImageClassifierStub(channel)
            outgoing: queue.Queue = queue.Queue()
            stream = (
                tensors.ModelStreamInfer(iter(outgoing.get, None), timeout=600) if kind == "stream" else None
            )
            seq = 0
            while not self._stop.is_set():
                seq += 1
                start = time.monotonic()
                try:
                    if kind == "image":
                        r = classifier.Classify(
                            cpb.ClassifyRequest(model="tiny", image=image, top_k=10), timeout=30
                        )
                        scores = np.zeros(10)
                        for p in r.predictions:
                            scores[p.index] = p.score
                        self._check(client, seq, r.model_version, scores, "image", start)
                        continue
                    request = harness.tensor_request(x, model="tiny", rid=f"{client}-{seq}")
                    if stream is None:
                        r = tensors.ModelInfer(request, timeout=30)
                    else:
                        outgoing.put(request)
                        reply = next(stream)
                        if reply.error_message:
                            self._fail(client, seq, f"stream: {reply.error_message}")
                            continue
                        r = reply.infer_response
                    self._check(client, seq, int(r.model_version), harness.logits_of(r)[0], "tensor", start)
                except grpc.RpcError as exc:
                    self._fail(client, seq, f"{exc.code().name}: {exc.details()}")
                    if stream is not None:
                        return
            if stream is not None:
                outgoing.put(None)
                for extra in stream:
                    self._fail(client, seq, f"unexpected extra answer {extra.infer_response.id}")


def _references(repo, versions) -> dict:
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32), dtype=np.float32)
    image = images.png(7)
    refs: dict = {"x": x, "image": image}
    for v in versions:
        path = repo / "tiny" / str(v) / "model.onnx"
        pixels = images.preprocess(repo, "tiny", v, image)
        refs[v] = {
            "tensor": harness.offline_logits(path, x)[0],
            "image": images.softmax(harness.offline_logits(path, pixels[None])[0].astype(np.float64)),
        }
    return refs


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", ["poll", "rpc"])
@pytest.mark.parametrize("server_layout", harness.LAYOUTS)
def test_versions_swap_under_load_without_a_failed_request(tmp_path, mechanism, server_layout):
    repo = tmp_path / "repo"
    make_slow_model(repo / "tiny" / "1" / "model.onnx", matmuls=MATMULS, seed=1)
    (repo / "tiny" / "config.yaml").write_text("max_batch_size: 8\n")
    # The references of both versions come from a copy built the same way, before the server sees version 2.
    ref_repo = tmp_path / "ref"
    make_slow_model(ref_repo / "tiny" / "1" / "model.onnx", matmuls=MATMULS, seed=1)
    make_slow_model(ref_repo / "tiny" / "2" / "model.onnx", matmuls=MATMULS, seed=2)
    refs = _references(ref_repo, (1, 2))
    assert not np.allclose(refs[1]["tensor"], refs[2]["tensor"], atol=1e-2)  # the versions are told apart

    args = ("--repository-poll-s", "0.2") if mechanism == "poll" else ("--enable-model-control",)
    with harness.running_server(
        repo, tmp_path / "server.log", *harness.layout_args(server_layout), *args
    ) as server:
        control = grpc.insecure_channel(server.address)
        stub = kgrpc.GRPCInferenceServiceStub(control)

        def reload() -> None:
            if mechanism == "rpc":
                stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="tiny"), timeout=60)

        with _Clients(server.address, refs) as clients:
            harness.wait_until(lambda: clients.count(1) >= PER_PHASE, what="answers from version 1")
            added = time.monotonic()
            _add_version(repo, 2)
            reload()
            harness.wait_until(lambda: clients.count(2) >= PER_PHASE, what="answers from version 2")
            removed = time.monotonic()
            shutil.rmtree(repo / "tiny" / "2")
            reload()
            harness.wait_until(lambda: clients.count(1, after=removed) >= PER_PHASE, what="version 1 again")
            harness.wait_until(
                lambda: "model 'tiny' version 2 unloaded" in server.log(), what="version 2 unloaded"
            )
        stats = stub.ModelStatistics(kpb.ModelStatisticsRequest(name="tiny"), timeout=10)
        index = stub.RepositoryIndex(kpb.RepositoryIndexRequest(), timeout=10)
        control.close()
        log = server.log()

    assert not clients.failures, clients.failures[:10]
    # From each client's point of view the swaps are atomic: 1...1 2...2 1...1, never back and forth.
    by_client: dict[int, list[int]] = {}
    for client, _seq, version, _start, _end in sorted(clients.answers):
        by_client.setdefault(client, []).append(version)
    for client, versions in by_client.items():
        changes = [b for a, b in zip(versions, versions[1:], strict=False) if a != b]
        assert changes in ([2, 1], [1], []), f"client {client} saw versions change as {changes}"
    # Requests version 1 had accepted finished on it after version 2 had started taking requests.
    first_v2_start = min(start for _, _, v, start, _ in clients.answers if v == 2)
    first_v2 = min(end for _, _, v, _, end in clients.answers if v == 2)
    finished_on_old = sum(
        1 for _, _, v, start, end in clients.answers if v == 1 and start < first_v2_start < end
    )
    assert "model 'tiny' version 2 ready" in log and "(replacing version 1)" in log
    assert [(s.name, s.version) for s in stats.model_stats] == [("tiny", "1")]
    assert [(m.name, m.version, m.state) for m in index.models] == [("tiny", "1", "READY")]
    harness.record_figures(
        f"version_swap_{mechanism}",
        answers=len(clients.answers),
        failed=len(clients.failures),
        answers_by_version={v: sum(1 for a in clients.answers if a[2] == v) for v in (1, 2)},
        seconds_to_first_v2_answer=round(first_v2 - added, 2),
        v1_answers_in_flight_across_the_swap=finished_on_old,
    )
