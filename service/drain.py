"""What the server is in the middle of, and holding new calls back at the very end of a drain.

What grpc.aio (1.85) does once ``server.stop(grace)`` is called, measured with
real clients (docs/api.md, "Health and lifecycle"):

* it sends GOAWAY and stops listening; a call the client opens afterwards
  never reaches this server (the client sees UNAVAILABLE, "failed to connect");
* a call whose headers arrive after ``stop()`` began, because the client sent
  it before the GOAWAY reached it, is dropped by gRPC without a handler: the
  client sees **CANCELLED**, which retry policies do not retry. A closed-loop
  caller that was just answered UNAVAILABLE has its next call on the wire
  almost all the time, so this happened to most callers of a draining server;
* a call still running when the grace period ends is cut, and the client sees
  UNAVAILABLE "Cancelling all calls"; so does a call whose request message
  never arrived completely (headers sent, not its whole message): grpc.aio
  waits for that message before it calls the handler, and ``stop()`` waits for
  such a call for the whole grace period.

So a drain (service.server.Server.shutdown) ends like this: once everything
accepted is answered, new calls are *held* (:meth:`CallGate.hold`): not
answered, so their callers send nothing more; when no call has arrived for a
moment, ``stop()`` starts with a short grace, sending GOAWAY, and only then
are the held calls answered UNAVAILABLE. A caller reads the GOAWAY before
that answer, and its next call goes to a new connection, which is refused
(UNAVAILABLE). A half-open call holds the short grace, not the whole grace
period, and then ends UNAVAILABLE.

:class:`CallGate` is a server interceptor that also keeps the bookkeeping the
drain needs: the inference calls inside their handler (accepted work) and the
calls whose handler has not started yet (waiting for their request message).
Each call is tracked by its asyncio task: grpc.aio runs a call's interceptors
and its handler in one task.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import grpc.aio

from service import errors
from service.api.interception import MAX_KEPT_HANDLERS, PerMethodInterceptor, around_each_call, refusing

#: Methods whose calls are inference work: accepted calls of these are what a drain finishes.
WORK_PREFIXES = ("/svertka.v1.ImageClassifier/", "/inference.GRPCInferenceService/")

HELD_MESSAGE = "server is shutting down and accepts no new requests; retry on another replica"

#: Calls waiting for their request message before finished ones are dropped from the count.
_PRUNE_AT = 1024


class CallGate(PerMethodInterceptor):
    """Tracks calls by stage and, once :meth:`hold` is called, holds every new call until :meth:`release`.

    Place it after the metrics interceptor (so held calls are counted) and
    before authentication (a held call is answered UNAVAILABLE whoever sent it).
    """

    def __init__(self) -> None:
        super().__init__()
        #: Calls whose handler has not started: grpc.aio is still receiving their request message.
        #: A call that ends without starting its handler stays here until the next pruning.
        self._waiting: set[asyncio.Task] = set()
        self._prune_at = _PRUNE_AT
        #: Inference calls inside their handler.
        self._work: set[asyncio.Task] = set()
        self._holding = False
        self._released: asyncio.Event | None = None
        #: time.monotonic() of the latest call to arrive (any method).
        self.last_arrival = 0.0
        #: Calls held by :meth:`hold` so far.
        self.held = 0
        self._held_handlers: dict[tuple[bool, bool, Any], grpc.RpcMethodHandler] = {}

    def work_in_progress(self) -> frozenset[asyncio.Task]:
        """The inference calls inside their handler now (pass it to :meth:`unanswered` later)."""
        return frozenset(self._work)

    def unanswered(self, calls: frozenset[asyncio.Task]) -> int:
        """How many of ``calls`` are still inside their handler."""
        return sum(1 for task in calls if task in self._work)

    @property
    def waiting_for_request(self) -> int:
        """Calls that arrived but whose request message has not (completely) arrived."""
        self._prune()
        return len(self._waiting)

    def _prune(self) -> None:
        self._waiting = {task for task in self._waiting if not task.done()}
        self._prune_at = max(_PRUNE_AT, 2 * len(self._waiting))

    def hold(self) -> None:
        """From now on, new calls wait for :meth:`release`, then end UNAVAILABLE."""
        if self._released is None:
            self._released = asyncio.Event()
        self._holding = True

    def release(self) -> None:
        """Answer every held call (and any later one) UNAVAILABLE."""
        if self._released is not None:
            self._released.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        self.last_arrival = time.monotonic()
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if self._holding:
            self.held += 1
            wrapped = self._held_handler(handler)
        else:
            wrapped = self.wrapped(handler_call_details.method or "", handler)
        if wrapped is not handler:  # an async behaviour: it will tell when it starts
            task = asyncio.current_task()
            if task is not None:
                self._waiting.add(task)
                if len(self._waiting) > self._prune_at:
                    self._prune()
        return wrapped

    def _entered(self) -> asyncio.Task | None:
        task = asyncio.current_task()
        self._waiting.discard(task)
        return task

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        work = self._work if method.startswith(WORK_PREFIXES) else None
        entered = self._entered

        @contextlib.contextmanager
        def tracked(context: Any) -> Iterator[None]:
            task = entered()
            if work is not None:
                work.add(task)
            try:
                yield
            finally:
                if work is not None:
                    work.discard(task)

        # A synchronous behaviour runs in grpc's thread pool, outside the call's task: left as it is.
        return around_each_call(handler, tracked, synchronous=False)

    def _held_handler(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        key = (bool(handler.request_streaming), bool(handler.response_streaming), handler.response_serializer)
        held = self._held_handlers.get(key)
        if held is not None:
            return held
        released = self._released
        entered = self._entered

        async def wait_for_release() -> None:
            entered()
            await released.wait()

        held = refusing(handler, errors.Draining(HELD_MESSAGE), before=wait_for_release)
        if len(self._held_handlers) < MAX_KEPT_HANDLERS:
            self._held_handlers[key] = held
        return held
