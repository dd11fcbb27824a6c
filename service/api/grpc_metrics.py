"""grpc-ecosystem server metrics for grpc.aio: started, handled (by code) and handling time, per method.

The names and labels are those of go-grpc-prometheus / py-grpc-prometheus
(``grpc_server_started_total``, ``grpc_server_handled_total{grpc_code}``,
``grpc_server_handling_seconds``), so existing dashboards work. The series
live on :class:`service.metrics.Metrics`; this interceptor records into them.

The status is read where it is decided: a normal return is OK unless the
servicer set another code on the context (``set_code``, or
``context.abort``, which leaves its code there too); a cancelled call is
CANCELLED, or DEADLINE_EXCEEDED when its deadline is what ran out; any other
exception is UNKNOWN, which is what grpc sends for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import grpc

from service.api.interception import PerMethodInterceptor, around_each_call

_GRPC_TYPES = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}


def _code_name(code: Any) -> str | None:
    if code is None:
        return None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    return str(code)


def outcome(context: Any, exc: BaseException | None) -> str:
    """The status code name a call ended with, from its context and the exception it raised."""
    try:
        set_code = _code_name(context.code())
    except Exception:  # pragma: no cover - contexts without code()
        set_code = None
    if exc is None:
        return set_code or "OK"
    if isinstance(exc, asyncio.CancelledError):
        try:
            remaining = context.time_remaining()
        except Exception:  # pragma: no cover
            remaining = None
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    if set_code and set_code != "OK":
        return set_code
    return "UNKNOWN"


class GrpcMetricsInterceptor(PerMethodInterceptor):
    """Records every call of every method, all four RPC types, into ``metrics``' grpc series."""

    def __init__(self, metrics: Any) -> None:
        super().__init__()
        self._m = metrics

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, _, name = method.lstrip("/").partition("/")
        labels = (
            service,
            name,
            _GRPC_TYPES[(bool(handler.request_streaming), bool(handler.response_streaming))],
        )
        started = self._m.grpc_started.labels(*labels)
        handling = self._m.grpc_handling.labels(*labels)
        handled: dict[str, Any] = {}  # the labelled counter per code, looked up once

        @contextlib.contextmanager
        def observed(context: Any) -> Iterator[None]:
            started.inc()
            start = time.perf_counter()
            try:
                yield
            except BaseException as exc:
                code = outcome(context, exc)
                raise
            else:
                code = outcome(context, None)
            finally:
                counter = handled.get(code)
                if counter is None:
                    counter = handled[code] = self._m.grpc_handled.labels(*labels, code)
                counter.inc()
                handling.observe(time.perf_counter() - start)

        return around_each_call(handler, observed)
