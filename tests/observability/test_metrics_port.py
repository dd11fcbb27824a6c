"""The metrics port under clients that never finish, and where it listens (issue 15).

prometheus_client's own server spent a thread on every connection and never
timed one out (500 half-sent requests: 516 threads). service/metrics_http.py
reads requests on one thread and answers with a fixed few; these tests hold
that against a real ``svertka serve`` process, whose threads are counted with
psutil, and check that the exposition is still prometheus_client's.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.target import ServerProcess
from service import metrics_http
from service.metrics import Metrics
from tests.helpers.tinymodel import make_repository

UNFINISHED = 500
HALF_A_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: svertka\r\n"  # no blank line: the head never ends


def _get(port: int, path: str = "/metrics", headers: dict[str, str] | None = None, timeout_s: float = 10.0):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout_s) as reply:
        return reply.status, dict(reply.headers), reply.read()


def _closed_by_server(sock: socket.socket, timeout_s: float) -> bool:
    """Poll until the server closes ``sock`` (EOF or reset), up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, min(0.5, deadline - time.monotonic())))
        try:
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionError:
            return True
    return False


@pytest.fixture()
def server(tmp_path):
    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    proc = ServerProcess(repo, tmp_path / "server.log").start()
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.stop()


def test_unfinished_connections_leave_threads_bounded_and_scrapes_working(server):
    process = psutil.Process(server.proc.pid)
    _get(server.metrics_port)  # every thread the metrics port will ever use exists from here on
    threads_before = process.num_threads()
    sockets = []
    try:
        for _ in range(UNFINISHED):
            sock = socket.create_connection(("127.0.0.1", server.metrics_port), timeout=10)
            sock.sendall(HALF_A_REQUEST)
            sockets.append(sock)
        # While they are open, a normal scrape is answered, with the whole exposition.
        status, _headers, body = _get(server.metrics_port)
        assert status == 200
        names = {f.name for f in text_string_to_metric_families(body.decode())}
        assert {"svertka_requests", "process_open_fds"} <= names
        threads_during = process.num_threads()
    finally:
        for sock in sockets:
            sock.close()
    # gRPC's own pools may start a thread or two at any time; a thread per connection would be 500.
    assert threads_during <= threads_before + 4, (threads_before, threads_during)


def test_the_metrics_server_starts_no_thread_per_connection():
    """In-process, where every thread can be counted: none appears for unfinished connections."""
    metrics = Metrics(process_metrics=False, gpu_metrics=False)
    port = metrics.start_http("127.0.0.1", 0)
    sockets = []
    try:
        assert _get(port)[0] == 200
        threads = threading.active_count()
        for _ in range(UNFINISHED):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(HALF_A_REQUEST)
            sockets.append(sock)
        assert _get(port)[0] == 200
        assert threading.active_count() == threads
        # The oldest waiting connections beyond MAX_PENDING were closed to make room.
        assert _closed_by_server(sockets[0], timeout_s=30)
    finally:
        for sock in sockets:
            sock.close()
        metrics.stop_http()


def test_a_client_that_sends_half_a_request_is_disconnected(server):
    with socket.create_connection(("127.0.0.1", server.metrics_port), timeout=10) as sock:
        sock.sendall(HALF_A_REQUEST)
        assert _closed_by_server(sock, timeout_s=metrics_http.REQUEST_TIMEOUT_S * 6)


@pytest.mark.integration
def test_metrics_host_binds_only_there(tmp_path):
    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    # gRPC on every interface, metrics on loopback only.
    server = ServerProcess(repo, tmp_path / "server.log", "--host", "0.0.0.0", "--metrics-host", "127.0.0.1")
    try:
        server.start()
        listening = {
            c.laddr.port: c.laddr.ip
            for c in psutil.Process(server.proc.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert listening[server.metrics_port] == "127.0.0.1"
        assert listening[server.grpc_port] in ("0.0.0.0", "::")
        assert f"metrics 127.0.0.1:{server.metrics_port}" in server.log()
        assert _get(server.metrics_port)[0] == 200
    finally:
        server.stop()


def test_exposition_is_prometheus_clients_openmetrics_and_gzip():
    metrics = Metrics(process_metrics=False, gpu_metrics=False)
    metrics.model("tiny", 1).request(api="image", code="OK", duration_s=0.01)
    port = metrics.start_http("127.0.0.1", 0)
    try:
        _status, headers, body = _get(port, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        assert body.decode().rstrip().endswith("# EOF")
        _status, headers, body = _get(port, headers={"Accept-Encoding": "gzip"})
        assert headers.get("Content-Encoding") == "gzip"
        assert b"svertka_requests_total" in gzip.decompress(body)
        _status, headers, body = _get(port, path="/metrics?name[]=svertka_latency_slo_seconds")
        assert b"svertka_latency_slo_seconds" in body and b"svertka_requests_total" not in body
    finally:
        metrics.stop_http()


def test_busy_workers_answer_503_and_an_oversized_head_431():
    """With every worker taken by a client that does not read its answer, a scrape gets 503 at once."""
    big = "x" * 64

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [big.encode() * 200_000]  # 12.8 MB: more than a socket buffers for a client that never reads

    httpd = metrics_http.MetricsHTTPServer(app, "127.0.0.1", 0, workers=1, response_timeout_s=30)
    port = httpd.start()
    stuck = socket.create_connection(("127.0.0.1", port), timeout=10)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        stuck.sendall(b"GET / HTTP/1.0\r\n\r\n")
        deadline = time.monotonic() + 30
        while True:  # until the only worker is busy writing to the stuck client
            try:
                _get(port, timeout_s=5)
            except urllib.error.HTTPError as exc:
                assert exc.code == 503
                break
            assert time.monotonic() < deadline, "the worker never got stuck"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /" + b"a" * (metrics_http.MAX_REQUEST_BYTES + 10))
            assert sock.recv(4096).startswith(b"HTTP/1.0 431")
    finally:
        stuck.close()
        httpd.stop()
