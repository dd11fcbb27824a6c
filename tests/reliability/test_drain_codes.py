"""What callers see when the server drains, and what its exit status says (issue 15).

Callers here behave like clients with a retry policy and no backoff: each
calls in a closed loop on its own channel and goes on calling after
UNAVAILABLE, until the server process is gone. Each call's code is recorded.
A draining server must end every call OK or UNAVAILABLE (which retry
policies retry elsewhere), never CANCELLED; gRPC answers CANCELLED for a call
that reaches the server after its stop() began, which is what the end of the
drain (service/drain.py) prevents.
"""

from __future__ import annotations

import collections
import re
import signal
import threading
import time

import grpc
import numpy as np
import pytest

from bench.target import ServerProcess
from service.gen.inference import grpc_service_pb2 as kpb
from service.gen.inference import grpc_service_pb2_grpc as kgrpc
from service.gen.svertka.v1 import classifier_pb2 as cpb
from service.gen.svertka.v1 import classifier_pb2_grpc as cgrpc
from service.server import EXIT_ABANDONED
from tests.api import images
from tests.helpers.tinymodel import make_repository
from tests.reliability import rawh2
from tests.reliability.slowmodel import make_slow_model

pytestmark = pytest.mark.integration

CALLERS = 8


class ClosedLoop:
    """CALLERS threads calling until the server process has exited (one call more after that)."""

    def __init__(self, server: ServerProcess, model: str) -> None:
        self.server = server
        self.model = model
        self.lock = threading.Lock()
        self.codes: list[collections.Counter] = [collections.Counter() for _ in range(CALLERS)]
        self.last: list[tuple[str, str]] = [("", "")] * CALLERS
        self.details: collections.Counter = collections.Counter()
        self.ok = threading.Semaphore(0)
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(CALLERS)]

    def start(self) -> ClosedLoop:
        for thread in self.threads:
            thread.start()
        return self

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "a caller is still calling"

    def _run(self, no: int) -> None:
        x = np.full((1, 3, 32, 32), 0.5, np.float32)
        tensor = kpb.ModelInferRequest(model_name=self.model)
        tensor.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32])
        tensor.raw_input_contents.append(x.tobytes())
        image = cpb.ClassifyRequest(model=self.model, image=images.png(no))
        with grpc.insecure_channel(self.server.address) as channel:
            if no % 2:
                method = cgrpc.ImageClassifierStub(channel).Classify
                request = image
            else:
                method = kgrpc.GRPCInferenceServiceStub(channel).ModelInfer
                request = tensor
            while True:
                exited = self.server.proc.poll() is not None
                try:
                    method(request, timeout=60)
                    code, details = "OK", ""
                except grpc.RpcError as exc:
                    code, details = exc.code().name, exc.details() or ""
                with self.lock:
                    self.codes[no][code] += 1
                    self.last[no] = (code, details)
                    if code != "OK":
                        self.details[(code, details[:60])] += 1
                if code == "OK":
                    self.ok.release()
                if exited:
                    return

    def all_codes(self) -> set[str]:
        return {code for counter in self.codes for code in counter}


def _wait_answers(callers: ClosedLoop, count: int) -> None:
    for _ in range(count):
        assert callers.ok.acquire(timeout=60), "callers are not getting answers"


def _sigterm_under_closed_loop(server: ServerProcess, model: str, *, answers_first: int):
    """Start ``server``, load it with closed-loop callers, SIGTERM it: (exit code, callers, log)."""
    try:
        server.start().wait_serving()
        callers = ClosedLoop(server, model).start()
        _wait_answers(callers, answers_first)
        server.signal(signal.SIGTERM)
        exit_code = server.wait(timeout_s=60)
        callers.join(timeout_s=60)
        return exit_code, callers, server.log()
    finally:
        server.kill()


@pytest.mark.slow
@pytest.mark.parametrize("frontends", ["1", "2"])
def test_sigterm_under_closed_loop_load_ends_every_call_ok_or_unavailable(tmp_path, frontends):
    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    server = ServerProcess(
        repo,
        tmp_path / "server.log",
        "--grace-period-s",
        "30",
        "--frontends",
        frontends,
        "--frontend-shm-mib",
        "16",
    )
    exit_code, callers, log = _sigterm_under_closed_loop(server, "tiny", answers_first=200)

    assert exit_code == 0, log
    assert callers.all_codes() <= {"OK", "UNAVAILABLE"}, (callers.details, log)
    # Every caller went on calling past the drain and ended refused, not cut.
    assert [code for code, _ in callers.last] == ["UNAVAILABLE"] * CALLERS
    assert any("shutting down" in details for _code, details in callers.details)
    assert "stopped: every accepted call answered" in log


def _slow_repository(repo):
    """Half a second or more of compute per batch, one row per batch: eight callers queue seconds of work."""
    make_slow_model(repo / "slow" / "1" / "model.onnx", matmuls=120)
    (repo / "slow" / "config.yaml").write_text(
        "max_batch_size: 1\nintra_op_threads: 1\npadded_batch_sizes: []\n"
    )
    return repo


@pytest.mark.slow
def test_a_call_that_cannot_finish_in_the_grace_period_makes_the_exit_status_non_zero(tmp_path):
    repo = _slow_repository(tmp_path / "repo")
    server = ServerProcess(repo, tmp_path / "server.log", "--grace-period-s", "0.2")
    exit_code, callers, log = _sigterm_under_closed_loop(server, "slow", answers_first=1)

    assert exit_code == EXIT_ABANDONED, log
    abandoned = re.search(r"stopped: (\d+) accepted calls abandoned", log)
    assert abandoned and int(abandoned.group(1)) >= 1, log
    assert "grace period of 0.2 s over" in log
    # The abandoned calls, too, end UNAVAILABLE for their callers: they are retried elsewhere.
    assert callers.all_codes() <= {"OK", "UNAVAILABLE"}, (callers.details, log)
    assert sum(n for (code, _d), n in callers.details.items() if code == "UNAVAILABLE") >= int(
        abandoned.group(1)
    )


@pytest.mark.slow
def test_a_second_signal_abandons_what_is_left_and_says_so(tmp_path):
    grace_s = 60.0
    repo = _slow_repository(tmp_path / "repo")
    server = ServerProcess(repo, tmp_path / "server.log", "--grace-period-s", str(grace_s))
    try:
        server.start().wait_serving()
        callers = ClosedLoop(server, "slow").start()
        _wait_answers(callers, 1)
        server.signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "draining: finishing accepted requests" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        server.signal(signal.SIGTERM)
        exit_code = server.wait(timeout_s=grace_s / 3)  # not the grace period: at once
        callers.join(timeout_s=60)
        log = server.log()
    finally:
        server.kill()

    assert exit_code == EXIT_ABANDONED, log
    assert re.search(r"drain: second signal with \d+ accepted calls unanswered", log), log
    assert re.search(r"stopped: \d+ accepted calls abandoned", log), log
    assert callers.all_codes() <= {"OK", "UNAVAILABLE"}, (callers.details, log)


def test_a_half_open_call_does_not_hold_shutdown_for_the_grace_period(tmp_path):
    """A unary call whose message never completes, and a stream that never sends: exit long before 60 s."""
    grace_s = 60.0
    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    server = ServerProcess(repo, tmp_path / "server.log", "--grace-period-s", str(grace_s))
    half_open = None
    stream_ended = threading.Event()
    stream_code: list[str] = []

    def silent_requests():
        stream_ended.wait(60)  # sends nothing and never half-closes while the server drains
        return
        yield  # pragma: no cover - makes this a generator

    def stream() -> None:
        with grpc.insecure_channel(server.address) as channel:
            call = cgrpc.ImageClassifierStub(channel).ClassifyStream(silent_requests(), timeout=120)
            try:
                for _ in call:
                    pass
                stream_code.append("OK")
            except grpc.RpcError as exc:
                stream_code.append(exc.code().name)

    try:
        server.start().wait_serving()
        half_open = rawh2.HalfOpenCall(server.grpc_port, "/inference.GRPCInferenceService/ModelInfer")
        assert half_open.wait_received(), "the server never read the half-open call"
        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        deadline = time.monotonic() + 30
        while "ClassifyStream" not in _started_methods(server):  # the stream's handler is running
            assert time.monotonic() < deadline, "the stream never started"
            time.sleep(0.05)
        server.signal(signal.SIGTERM)
        # Well under the grace period: the half-open call must not be waited for until it ends.
        exit_code = server.wait(timeout_s=grace_s / 3)
        stream_ended.set()
        streamer.join(timeout=30)
        assert half_open.wait_for(lambda _frames: half_open.grpc_status() is not None, 30)
        log = server.log()
    finally:
        stream_ended.set()
        if half_open is not None:
            half_open.close()
        server.kill()

    assert exit_code == 0, log  # a half-open call was never accepted: nothing was abandoned
    assert half_open.grpc_status() == grpc.StatusCode.UNAVAILABLE.value[0], half_open.frames
    assert stream_code == ["UNAVAILABLE"]
    assert "ended 1 calls whose request message had not arrived" in log
    assert "stopped: every accepted call answered" in log


def _started_methods(server: ServerProcess) -> str:
    """The grpc_server_started_total lines of the server's metrics (empty if unreachable)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return ""
    return "\n".join(
        line
        for line in text.splitlines()
        if line.startswith("grpc_server_started_total") and not line.endswith(" 0.0")
    )
