"""What both public APIs share: server state, deadlines, per-request bookkeeping, streams.

Kept apart from the servicers so that each servicer method stays a few lines
of proto -> domain -> proto (STYLE.md §5).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from service import errors, logs
from service.api import status

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Requests of one stream that may be in flight at once; the stream stops reading
#: from the client (HTTP/2 flow control pushes back) until one finishes. Bounded so
#: that one client cannot park unbounded work in the server through one stream.
STREAM_MAX_IN_FLIGHT = 128

#: Model names as they may appear in a request and in the repository: no path
#: separators, no leading dot, nothing a filesystem or a metric label would mind.
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class ServerState:
    """Whether the server accepts inference work: after models load, until draining starts."""

    def __init__(self) -> None:
        self.started = False
        self.draining = False
        #: Set when draining starts: open streams stop reading new requests.
        self.drain_event = asyncio.Event()
        #: time.monotonic() of the latest inference call (accepted or refused).
        self.last_call = 0.0

    def check_accepting(self) -> None:
        self.last_call = time.monotonic()
        if self.draining:
            raise errors.Draining(
                "server is shutting down and accepts no new requests; retry on another replica"
            )
        if not self.started:
            raise errors.ModelNotReady("server is starting: models are still loading; retry shortly")


def validate_model_name(name: str) -> str:
    """Reject names that could not be a repository directory (and could escape one)."""
    if not MODEL_NAME_RE.fullmatch(name) or ".." in name:
        raise errors.InvalidInput(
            f"model name {name!r} is invalid: expected 1-128 characters from [A-Za-z0-9_.-], "
            "starting with a letter or digit, without '..'"
        )
    return name


def parse_version(text: str) -> int | None:
    """A KServe version string: "" means the newest ready version."""
    if text == "":
        return None
    try:
        version = int(text)
    except ValueError:
        raise errors.InvalidInput(
            f"model version: expected a positive integer or empty, got {text!r}"
        ) from None
    if version < 1:
        raise errors.InvalidInput(f"model version: expected a positive integer or empty, got {text!r}")
    return version


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's gRPC deadline as an absolute ``time.monotonic()`` value (None: no deadline)."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + remaining


def request_id(explicit: str, context: grpc.aio.ServicerContext | None) -> str:
    """The request's id: its own ``id`` field, else an ``x-request-id`` header, else a fresh one."""
    if explicit:
        return explicit
    if context is not None:
        for key, value in context.invocation_metadata() or ():
            if key == "x-request-id" and value:
                return str(value)
    return logs.new_request_id()


class RequestRecord:
    """Bookkeeping for one request: the recorder's outcome and timings, the access log, the log request id.

    Created once the model is known; ``finish`` must be called exactly once
    (the ``track`` context manager does it, whatever the outcome). ``timings``
    is handed to the model's infer call, which fills in where the time went.
    """

    def __init__(
        self, model: Any, *, api: str, method: str, rid: str, peer: str | None, start: float
    ) -> None:
        from service.models import Timings  # the engine's; imported late so this module stays light

        self.model = model
        self.api = api
        self.method = method
        self.rid = rid
        self.peer = peer
        self.start = start
        self.images: int | None = None
        self.timings = Timings()
        self.total_s = 0.0
        self._log_token = logs.bind_request_id(rid)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def finish(self, code: str) -> None:
        duration = self.elapsed()
        self.total_s = duration
        t = self.timings
        self.model.recorder.request(
            api=self.api,
            code=code,
            duration_s=duration,
            queue_s=t.queue_s,
            compute_s=t.compute_s,
            compute_input_s=t.compute_input_s,
            compute_output_s=t.compute_output_s,
        )
        logs.access_log(
            request_id=self.rid,
            model=self.model.name,
            version=self.model.version,
            api=self.api,
            method=self.method,
            code=code,
            duration_ms=duration * 1000.0,
            images=self.images,
            peer=self.peer,
        )
        logs.reset_request_id(self._log_token)


@contextlib.contextmanager
def track(record: RequestRecord):
    """Finish ``record`` with the code of whatever ends the block (OK, a mapped error, CANCELLED)."""
    try:
        yield record
    except asyncio.CancelledError:
        record.finish("CANCELLED")
        raise
    except BaseException as exc:
        record.finish(status.code_name(exc))
        raise
    else:
        record.finish("OK")


async def run_stream(
    requests: AsyncIterator[T],
    handle: Callable[[T], Awaitable[R]],
    *,
    stop: asyncio.Event | None = None,
    max_in_flight: int = STREAM_MAX_IN_FLIGHT,
) -> AsyncIterator[R]:
    """Run ``handle`` on each request of a bidi stream concurrently; yield results as they finish.

    ``handle`` must turn its own failures into a response (a stream carries
    per-request errors in-band). When ``stop`` is set (the server drains), no
    further request is read; those already read are finished and answered,
    then :class:`~service.errors.Draining` is raised so the client learns that
    anything it sent after them was not accepted. If the client goes away,
    every pending handler is cancelled, which drops its queued rows before
    they cost compute.
    """
    results: asyncio.Queue[Any] = asyncio.Queue()
    slots = asyncio.Semaphore(max_in_flight)
    pending: set[asyncio.Task] = set()
    done_reading = object()
    stopped = False

    async def one(item: T) -> None:
        try:
            results.put_nowait(await handle(item))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handle() answers failures in-band; anything else ends the stream
            results.put_nowait(exc)
        finally:
            slots.release()

    async def next_or_stop(iterator, stop_waiter):
        """The next request, or None when the stream ended or draining began first."""
        nonlocal stopped
        if stop_waiter is None:
            return await anext(iterator, None)
        next_item = asyncio.ensure_future(anext(iterator, None))
        await asyncio.wait({next_item, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
        if next_item.done():
            return next_item.result()
        next_item.cancel()
        await asyncio.gather(next_item, return_exceptions=True)
        stopped = True
        return None

    async def reader() -> None:
        stop_waiter = asyncio.ensure_future(stop.wait()) if stop is not None else None
        try:
            iterator = aiter(requests)
            while True:
                await slots.acquire()
                item = await next_or_stop(iterator, stop_waiter)
                if item is None:
                    slots.release()
                    break
                task = asyncio.create_task(one(item))
                pending.add(task)
                task.add_done_callback(pending.discard)
            while pending:
                await asyncio.gather(*list(pending), return_exceptions=True)
        finally:
            if stop_waiter is not None:
                stop_waiter.cancel()
            results.put_nowait(done_reading)

    reader_task = asyncio.create_task(reader())
    try:
        while True:
            item = await results.get()
            if item is done_reading:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
        await reader_task  # surfaces a failure of the request iterator itself
    finally:
        reader_task.cancel()
        for task in list(pending):
            task.cancel()
    if stopped:
        raise errors.Draining(
            "server is shutting down: requests answered on this stream were completed; "
            "send the rest to another replica"
        )
