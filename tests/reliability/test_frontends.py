"""``svertka serve --frontends 2``: processes killed with real signals, the port, the metrics, /dev/shm.

A real server (a supervisor, one engine process, two frontend processes) on
loopback, real clients on channels of their own, processes found with psutil
and killed with SIGKILL.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import threading
import time

import grpc
import numpy as np
import psutil
import pytest

from bench.target import PYTHON_M_SERVICE, ServerProcess
from service.gen.inference import grpc_service_pb2_grpc as kgrpc
from tests.helpers.tinymodel import make_repository
from tests.reliability import harness

pytestmark = pytest.mark.integration

FRONTENDS = ("--frontends", "2", "--frontend-shm-mib", "16")
CALLERS = 6
PROMTOOL = shutil.which("promtool")


def _workers(server: ServerProcess) -> dict[str, list[psutil.Process]]:
    """The supervisor's children by role (``python -m service.ipc.worker engine|frontend N``)."""
    out: dict[str, list[psutil.Process]] = collections.defaultdict(list)
    for child in psutil.Process(server.proc.pid).children():
        try:
            cmd = child.cmdline()
        except psutil.Error:  # exited (a zombie until the supervisor reaps it)
            continue
        if "service.ipc.worker" in cmd:
            out[cmd[cmd.index("service.ipc.worker") + 1]].append(child)
    return out


class Load:
    """``CALLERS`` threads, each on a channel of its own, calling ModelInfer until stopped."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.codes: collections.Counter = collections.Counter()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CALLERS)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def ok(self) -> int:
        with self.lock:
            return self.codes["OK"]

    def _run(self) -> None:
        request = harness.tensor_request(np.full((1, 3, 32, 32), 0.5, np.float32))
        with grpc.insecure_channel(self.address) as channel:
            infer = kgrpc.GRPCInferenceServiceStub(channel).ModelInfer
            while not self.stop.is_set():
                try:
                    infer(request, timeout=30)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with self.lock:
                    self.codes[code] += 1
                if code != "OK":
                    self.stop.wait(0.01)  # back off, as a client's retry policy would


def _requests_total(server: ServerProcess) -> float:
    samples = harness.scrape(server.metrics_port)
    return sum(v for (name, _), v in samples.items() if name == "svertka_requests_total")


@pytest.mark.slow
def test_killing_frontends_under_load_loses_only_retryable_calls_and_leaks_nothing(tmp_path):
    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    with harness.running_server(repo, tmp_path / "server.log", *FRONTENDS) as server:
        engine = _workers(server)["engine"][0]
        before = {"engine_fds": engine.num_fds(), "shm": len(os.listdir("/dev/shm"))}
        totals = [_requests_total(server)]
        restart_s = []
        with Load(server.address) as load:
            harness.wait_until(lambda: load.ok() > 50, what="answers before the first kill")
            for kill in range(20):
                victim = _workers(server)["frontend"][kill % 2]
                victim.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                harness.wait_until(
                    lambda v=victim: len([f for f in _workers(server)["frontend"] if f.pid != v.pid]) == 2,
                    timeout_s=10,
                    what="the killed frontend to be started again",
                )
                restart_s.append(time.monotonic() - killed_at)
                answered = load.ok()
                harness.wait_until(lambda a=answered: load.ok() > a + 10, what="answers after a restart")
                totals.append(_requests_total(server))
            codes = dict(load.codes)
        harness.wait_until(
            lambda: engine.num_fds() <= before["engine_fds"], timeout_s=30, what="the engine's fds"
        )
        after = {"engine_fds": engine.num_fds(), "shm": len(os.listdir("/dev/shm"))}
        restarts = harness.sample(
            harness.scrape(server.metrics_port), "svertka_frontend_restarts_total", frontend="0"
        )
    harness.record_figures(
        "frontend_kills",
        kills=20,
        codes=codes,
        restart_s_max=round(max(restart_s), 2),
        before=before,
        after=after,
    )
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes["OK"] > 200
    # The supervisor started each one again at once (it waits at most 1 s between restarts of one slot).
    assert max(restart_s) < 10
    assert after["shm"] <= before["shm"], "a killed frontend left its slab in /dev/shm"
    assert all(a <= b for a, b in zip(totals, totals[1:], strict=False)), totals  # counters never went back
    assert restarts == 10


@pytest.mark.slow
def test_killing_the_engine_turns_readiness_off_and_ends_the_server_non_zero(tmp_path):
    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    server = ServerProcess(repo, tmp_path / "server.log", *FRONTENDS, "--grace-period-s", "5")
    try:
        server.start().wait_serving()
        _workers(server)["engine"][0].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        # Readiness: NOT_SERVING (or no answer at all once the frontends are gone), never SERVING again.
        harness.wait_until(lambda: _health_or_none(server) != 1, timeout_s=5, what="readiness to go")
        not_serving_s = time.monotonic() - killed_at
        code = server.wait(timeout_s=30)
        took = time.monotonic() - killed_at
    finally:
        server.kill()
    log = server.log()
    harness.record_figures(
        "engine_kill", exit_status=code, not_serving_s=round(not_serving_s, 3), exit_s=round(took, 2)
    )
    assert code != 0, log
    assert "the engine process exited" in log
    assert took < 5 + 10  # within the grace period (5 s) and the supervisor's margin


def _health_or_none(server: ServerProcess) -> int | None:
    try:
        return server.health()
    except grpc.RpcError:
        return None


@pytest.mark.slow
def test_counters_summed_over_frontends_equal_the_requests_sent(tmp_path):
    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    sent = 60
    with harness.running_server(repo, tmp_path / "server.log", *FRONTENDS) as server:
        # A channel per request: connections, not calls, are spread over the frontends.
        for i in range(sent):
            with grpc.insecure_channel(server.address) as channel:
                kgrpc.GRPCInferenceServiceStub(channel).ModelInfer(
                    harness.tensor_request(rid=str(i)), timeout=30
                )
        text = server.scrape()
        samples = harness.samples_of(text)
        with grpc.insecure_channel(server.address) as channel:
            stats = harness.model_stats(channel, "tiny")
        per_frontend = harness.wait_until(
            lambda: (
                [
                    harness.sample(
                        harness.scrape(server.metrics_port), "svertka_frontend_in_flight_requests", frontend=i
                    )
                    for i in ("0", "1")
                ]
                or None
            ),
            what="per-frontend series",
        )
    ok = harness.sample(samples, "svertka_requests_total", model="tiny", version="1", api="tensor", code="OK")
    assert ok == sent
    assert stats.inference_count == sent and stats.inference_stats.success.count == sent
    assert per_frontend == [0.0, 0.0]
    assert "pid=" not in text
    if PROMTOOL is not None:
        checked = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
        )
        assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr


def test_a_second_server_on_the_same_port_fails_to_start(tmp_path):
    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    with harness.running_server(repo, tmp_path / "first.log", *FRONTENDS) as first:
        for frontends in ("2", "1"):
            second = subprocess.run(
                [*PYTHON_M_SERVICE, "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
                 "--grpc-port", str(first.grpc_port), "--metrics-port", "0", "--frontends", frontends],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert second.returncode != 0, second.stderr
            assert f"cannot listen on 127.0.0.1:{first.grpc_port}" in second.stderr


def test_too_little_shared_memory_is_a_start_up_error_that_names_the_fix(tmp_path):
    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    huge = str(os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize // (1 << 20) + 1024)
    result = subprocess.run(
        [*PYTHON_M_SERVICE, "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
         "--grpc-port", "0", "--metrics-port", "0", "--frontends", "2", "--frontend-shm-mib", huge],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert (
        "needs" in result.stderr
        and "medium: Memory" in result.stderr
        and "--frontend-shm-mib" in result.stderr
    )
