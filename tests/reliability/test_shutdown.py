"""SIGTERM while unary calls *and pipelined streams* are busy: nothing accepted is lost or doubled.

tests/api/test_lifecycle.py covers unary calls on a fast model. Here the
model takes ~40 ms per batch, so at the signal there are requests queued and
computing, and streams have several requests outstanding each. The server's
access log (one line per request that reached a model) is the record of what
it accepted; it must equal what the clients got back as OK, request id for
request id, and no id may come back twice.
"""

from __future__ import annotations

import signal
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

GRACE_S = 15.0
#: Requests a stream keeps outstanding (sent, not yet answered).
STREAM_WINDOW = 4
KINDS = ["tensor"] * 3 + ["image"] * 2 + ["tensor_stream"] * 2 + ["image_stream"] * 2


class _Record:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answers: list[tuple[str, str, float]] = []  # (request id, code, monotonic time)
        self.endings: list[tuple[str, str]] = []  # how each client's traffic ended: (code, details)
        self.ok = threading.Semaphore(0)

    def answer(self, rid: str, code: str) -> None:
        with self.lock:
            self.answers.append((rid, code, time.monotonic()))
        if code == "OK":
            self.ok.release()


def _tensor(x: np.ndarray, rid: str) -> kpb.ModelInferRequest:
    return harness.tensor_request(x, model="slow", rid=rid)


def _unary(address: str, no: int, kind: str, record: _Record, x, image) -> None:
    with grpc.insecure_channel(address) as channel:
        tensors = kgrpc.GRPCInferenceServiceStub(channel)
        classifier = cgrpc.ImageClassifierStub(channel)
        for i in range(1_000_000):
            rid = f"{kind}{no}-{i}"
            try:
                if kind == "tensor":
                    assert tensors.ModelInfer(_tensor(x, rid), timeout=60).id == rid
                else:
                    assert (
                        classifier.Classify(
                            cpb.ClassifyRequest(model="slow", image=image, id=rid), timeout=60
                        ).id
                        == rid
                    )
            except grpc.RpcError as exc:
                record.answer(rid, exc.code().name)
                record.endings.append((exc.code().name, exc.details() or ""))
                return
            record.answer(rid, "OK")


def _stream(address: str, no: int, kind: str, record: _Record, x, image) -> None:
    """Keep STREAM_WINDOW requests outstanding on one stream until the server ends it."""
    window = threading.Semaphore(STREAM_WINDOW)
    finished = threading.Event()

    def requests():
        i = 0
        while not finished.is_set():
            if not window.acquire(timeout=0.1):
                continue
            rid = f"{kind}{no}-{i}"
            i += 1
            if kind == "tensor_stream":
                yield _tensor(x, rid)
            else:
                yield cpb.ClassifyRequest(model="slow", image=image, id=rid)

    with grpc.insecure_channel(address) as channel:
        if kind == "tensor_stream":
            call = kgrpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests(), timeout=120)
        else:
            call = cgrpc.ImageClassifierStub(channel).ClassifyStream(requests(), timeout=120)
        try:
            for reply in call:
                # A request read just as the drain began is refused in-band (the stream stays
                # orderly): the image API says UNAVAILABLE, Triton's stream only has the message.
                if kind == "tensor_stream":
                    rid, message = reply.infer_response.id, reply.error_message
                    code = "OK" if not message else "UNAVAILABLE" if "shutting down" in message else message
                else:
                    rid = reply.id
                    code = reply.error.code_name if reply.HasField("error") else "OK"
                record.answer(rid, code)
                window.release()
            record.endings.append(("OK", "stream ended without a status"))
        except grpc.RpcError as exc:
            record.endings.append((exc.code().name, exc.details() or ""))
        finally:
            finished.set()


@pytest.mark.slow
def test_sigterm_with_busy_streams_loses_nothing_and_answers_nothing_twice(tmp_path):
    repo = tmp_path / "repo"
    make_slow_model(repo / "slow" / "1" / "model.onnx", matmuls=6)
    (repo / "slow" / "config.yaml").write_text("max_batch_size: 4\nintra_op_threads: 1\n")
    x = np.full((1, 3, 32, 32), 0.5, np.float32)
    image = images.png(2)
    server = harness.ServerProcess(
        repo,
        tmp_path / "server.log",
        "--access-log",
        "--log-format",
        "json",
        "--grace-period-s",
        str(GRACE_S),
    )
    try:
        server.start().wait_serving()
        record = _Record()
        threads = [
            threading.Thread(
                target=_stream if kind.endswith("stream") else _unary,
                args=(server.address, no, kind, record, x, image),
            )
            for no, kind in enumerate(KINDS)
        ]
        for t in threads:
            t.start()
        for _ in range(150):  # every client is getting answers before the signal
            assert record.ok.acquire(timeout=60)
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=GRACE_S + 30)
        exit_code = server.wait(timeout_s=GRACE_S + 30)
        exited_after_s = time.monotonic() - signalled
        log = server.log()
    finally:
        server.kill()

    assert exit_code == 0
    assert exited_after_s < GRACE_S
    # Every client's traffic ended with UNAVAILABLE (draining, or the port closed): nothing else.
    assert len(record.endings) == len(KINDS)
    assert {code for code, _ in record.endings} == {"UNAVAILABLE"}, record.endings
    assert any("shutting down" in details for _, details in record.endings)

    answered = [rid for rid, _code, _t in record.answers]
    assert len(answered) == len(set(answered)), "an id was answered twice"
    client_ok = {rid for rid, code, _t in record.answers if code == "OK"}
    assert {code for _rid, code, _t in record.answers} <= {"OK", "UNAVAILABLE"}
    access = [r for r in harness.json_log_records(log) if r.get("logger") == "svertka.access"]
    server_ids = [r["request_id"] for r in access]
    assert len(server_ids) == len(set(server_ids)), "the server handled an id twice"
    assert {r["code"] for r in access} <= {"OK", "UNAVAILABLE"}
    assert {r["request_id"] for r in access if r["code"] == "OK"} == client_ok
    # Requests were queued or computing at the signal, and completed after it.
    finished_after_signal = sum(1 for _rid, code, t in record.answers if code == "OK" and t > signalled)
    assert finished_after_signal > 0
    harness.record_figures(
        "graceful_shutdown",
        clients=len(KINDS),
        streams=sum(1 for k in KINDS if k.endswith("stream")),
        answered_ok=len(client_ok),
        ok_after_sigterm=finished_after_signal,
        exit_code=exit_code,
        exit_seconds_after_sigterm=round(exited_after_s, 2),
        grace_period_s=GRACE_S,
    )
