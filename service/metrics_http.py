"""The metrics port: prometheus_client's exposition behind a server that one client cannot exhaust.

prometheus_client's ``start_http_server`` starts a thread for every
connection and never times one out: 500 connections that each send half a
request hold 500 threads until their clients go away. Here one thread
(``svertka-metrics-http``) accepts connections and reads their requests,
non-blocking, for any number of them at once; only a complete request is
handed to one of ``WORKERS`` fixed threads, which runs prometheus_client's
WSGI app (``make_wsgi_app``: the OpenMetrics ``Accept`` header, gzip and
``name[]`` filters behave exactly as before) and writes the answer. So:

* threads: ``WORKERS`` + 1, whatever clients do;
* a request must arrive whole within ``REQUEST_TIMEOUT_S`` of connecting,
  else the connection is closed; an answer must be taken by the client
  within ``RESPONSE_TIMEOUT_S``;
* at most ``MAX_PENDING`` connections may be waiting for their request: a new
  one beyond that closes the oldest waiting one (the one most likely to be
  stalling), so a scrape that sends its request at once always gets in;
* a complete request while every worker is busy is answered ``503`` at once;
* a request head larger than ``MAX_REQUEST_BYTES`` is answered ``431``.

One request per connection (HTTP/1.0, as before), any path. ``serve`` puts a
registry behind it: the single process's (``Metrics.start_http``) or, with
several processes, the supervisor's (``SupervisorMetrics.start_http``).
"""

from __future__ import annotations

import collections
import errno
import io
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler

log = logging.getLogger(__name__)

#: Threads that answer complete requests (scrapes are seconds apart; two Prometheus replicas and a person fit).
WORKERS = 4
#: Connections that may be waiting for their request at once; beyond it the oldest is closed.
MAX_PENDING = 64
#: Seconds from connecting to a complete request head.
REQUEST_TIMEOUT_S = 5.0
#: Seconds a client gets to take its answer.
RESPONSE_TIMEOUT_S = 10.0
#: The largest request head (request line and headers) read.
MAX_REQUEST_BYTES = 8192
#: New connections taken per turn of the accept loop (the rest wait in the listen backlog).
_ACCEPT_BATCH = 64


def _canned(status: str, text: str) -> bytes:
    body = text.encode() + b"\n"
    return (
        f"HTTP/1.0 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


_BUSY = _canned("503 Service Unavailable", "metrics server busy; retry")
_TOO_LARGE = _canned("431 Request Header Fields Too Large", "request head too large")


class _SocketWriter(io.BufferedIOBase):
    """``wfile`` for the handler: every write goes straight to the socket (under its timeout)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.sendall(data)
        with memoryview(data) as view:
            return view.nbytes


class _Handler(WSGIRequestHandler):
    """wsgiref's request handler over a request head that was already read."""

    def __init__(self, sock: socket.socket, address: Any, server: MetricsHTTPServer, head: bytes) -> None:
        self._head = head
        super().__init__(sock, address, server)

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = io.BytesIO(self._head)
        self.wfile = _SocketWriter(self.request)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class _Pending:
    __slots__ = ("address", "data", "deadline")

    def __init__(self, address: Any, deadline: float) -> None:
        self.address = address
        self.data = bytearray()
        self.deadline = deadline


def _send_and_close(sock: socket.socket, reply: bytes) -> None:
    """Best effort, never blocking: a short canned reply always fits an empty send buffer."""
    try:
        sock.send(reply)
    except OSError:
        pass
    _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:  # pragma: no cover
        pass


class MetricsHTTPServer:
    """Serve ``app`` (a WSGI app) on ``host:port``; ``start()`` returns the bound port."""

    def __init__(
        self,
        app: Callable[..., Any],
        host: str,
        port: int,
        *,
        workers: int = WORKERS,
        max_pending: int = MAX_PENDING,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        response_timeout_s: float = RESPONSE_TIMEOUT_S,
    ) -> None:
        if workers < 1 or max_pending < 1:
            raise ValueError("workers and max_pending must be >= 1")
        self._app = app
        self._host = host
        self._port = port
        self._workers = workers
        self._max_pending = max_pending
        self._request_timeout_s = float(request_timeout_s)
        self._response_timeout_s = float(response_timeout_s)
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._pending: collections.OrderedDict[socket.socket, _Pending] = collections.OrderedDict()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Semaphore(workers)
        self._answering: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self.port = 0
        #: What the WSGI environ of every request starts from (wsgiref's handler reads it).
        self.base_environ: dict[str, str] = {}

    def get_app(self) -> Callable[..., Any]:
        return self._app

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> int:
        family, _, _, _, address = socket.getaddrinfo(
            self._host or None, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(128)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self.base_environ = {
            "SERVER_NAME": self._host,
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PORT": str(self.port),
            "REMOTE_HOST": "",
            "CONTENT_LENGTH": "",
            "SCRIPT_NAME": "",
        }
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._threads = [threading.Thread(target=self._serve, name="svertka-metrics-http", daemon=True)]
        self._threads += [
            threading.Thread(target=self._work, name=f"svertka-metrics-{i}", daemon=True)
            for i in range(self._workers)
        ]
        for thread in self._threads:
            thread.start()
        return self.port

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close the port and every connection; wait (up to ``timeout_s``) for the threads."""
        if self._listener is None or self._stopping:
            return
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:  # pragma: no cover
            pass
        for _ in range(self._workers):
            self._jobs.put(None)
        with self._lock:
            for sock in self._answering:  # unblocks a worker stuck writing to a client
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._wake_w.close()

    # -- the accepting and reading thread --------------------------------------
    def _serve(self) -> None:
        selector = selectors.DefaultSelector()  # epoll: no FD_SETSIZE limit once RLIMIT_NOFILE is raised
        selector.register(self._listener, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping:
                timeout = None
                if self._pending:
                    first = next(iter(self._pending.values()))
                    timeout = max(0.0, first.deadline - time.monotonic())
                for key, _ in selector.select(timeout):
                    sock = key.fileobj
                    if sock is self._listener:
                        self._accept(selector)
                    elif sock is self._wake_r:
                        try:
                            self._wake_r.recv(64)
                        except OSError:  # pragma: no cover
                            pass
                    elif sock in self._pending:
                        self._read(selector, sock)
                self._expire(selector)
        except Exception:  # pragma: no cover - a bug here must not pass silently
            log.exception("metrics HTTP server failed")
        finally:
            for sock in list(self._pending):
                _close(sock)
            self._pending.clear()
            selector.close()
            self._listener.close()
            self._wake_r.close()

    def _accept(self, selector: selectors.BaseSelector) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: free the oldest waiting connection, or pause briefly.
                    if self._pending:
                        self._drop(selector, next(iter(self._pending)))
                    else:
                        time.sleep(0.05)
                return
            sock.setblocking(False)
            if len(self._pending) >= self._max_pending:
                self._drop(selector, next(iter(self._pending)))
            self._pending[sock] = _Pending(address, time.monotonic() + self._request_timeout_s)
            selector.register(sock, selectors.EVENT_READ)

    def _drop(self, selector: selectors.BaseSelector, sock: socket.socket) -> None:
        self._pending.pop(sock, None)
        selector.unregister(sock)
        _close(sock)

    def _expire(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        # Deadlines are in arrival order (one timeout for all), so the expired ones come first.
        while self._pending:
            sock, pending = next(iter(self._pending.items()))
            if pending.deadline > now:
                break
            self._drop(selector, sock)

    def _read(self, selector: selectors.BaseSelector, sock: socket.socket) -> None:
        pending = self._pending[sock]
        try:
            chunk = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(selector, sock)
            return
        data = pending.data
        searched_from = max(0, len(data) - 3)
        data += chunk
        if data.find(b"\r\n\r\n", searched_from) >= 0 or data.find(b"\n\n", searched_from) >= 0:
            self._pending.pop(sock)
            selector.unregister(sock)
            if self._idle.acquire(blocking=False):
                self._jobs.put((sock, pending.address, bytes(data)))
            else:
                _send_and_close(sock, _BUSY)
        elif len(data) > MAX_REQUEST_BYTES:
            self._pending.pop(sock)
            selector.unregister(sock)
            _send_and_close(sock, _TOO_LARGE)

    # -- the answering threads ---------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            sock, address, head = job
            with self._lock:
                self._answering.add(sock)
            try:
                sock.setblocking(True)
                sock.settimeout(self._response_timeout_s)  # sendall: the total time to send everything
                _Handler(sock, address, self, head)
            except OSError:
                pass  # the client went away or did not take its answer in time
            except Exception:
                log.exception("metrics HTTP request failed")
            finally:
                with self._lock:
                    self._answering.discard(sock)
                _close(sock)
                self._idle.release()


def serve(registry: Any, host: str, port: int) -> MetricsHTTPServer:
    """A started server for ``registry`` (a prometheus_client ``CollectorRegistry``); ``.port`` is bound."""
    from prometheus_client import make_wsgi_app

    httpd = MetricsHTTPServer(make_wsgi_app(registry), host, port)
    httpd.start()
    return httpd
