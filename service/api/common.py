"""What both public APIs share: server state, deadlines, per-request bookkeeping, streams.

Kept apart from the servicers so that each servicer method stays a few lines
of proto -> domain -> proto (STYLE.md §5).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from service import errors, layout, logs
from service.api import status

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Requests of one stream that the server holds at once: read and not yet answered, or
#: answered and not yet written to the client. At the bound the stream stops reading (HTTP/2
#: flow control pushes back on the client), so a client that never reads its answers cannot
#: make the server keep them: a stream's footprint is at most this many requests, each at most
#: the message-size limit, plus their answers.
STREAM_MAX_IN_FLIGHT = 128

#: The longest request id accepted (the ``id`` field, or an ``x-request-id`` header). The id is
#: echoed in the response and written to the access log; UUIDs (36) and W3C trace ids (55) fit.
MAX_REQUEST_ID_CHARS = 256
#: What an in-band stream error echoes of other request fields (a model name is at most 128).
MAX_ECHOED_CHARS = 128


class ServerState:
    """Whether the server accepts inference work: after models load, until draining starts."""

    def __init__(self) -> None:
        self.started = False
        self.draining = False
        #: Set when draining starts: open streams stop reading new requests.
        self.drain_event = asyncio.Event()

    def check_accepting(self) -> None:
        if self.draining:
            raise errors.Draining(
                "server is shutting down and accepts no new requests; retry on another replica"
            )
        if not self.started:
            raise errors.ModelNotReady("server is starting: models are still loading; retry shortly")


def validate_model_name(name: str) -> str:
    """Reject names that could not be a repository directory (and could escape one): service.layout's rule."""
    if not layout.is_valid_name(name):
        raise errors.InvalidInput(f"model name {errors.shown(name)} is invalid: expected {layout.NAME_RULE}")
    return name


def parse_version(text: str) -> int | None:
    """A KServe version string: "" means the newest ready version; else service.layout's version rule."""
    if text == "":
        return None
    version = layout.parse_version(text)
    if version is None:
        raise errors.InvalidInput(
            f"model version: expected a positive integer or empty, got {errors.shown(text)} "
            f"(a version is {layout.VERSION_RULE})"
        )
    return version


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's gRPC deadline as an absolute ``time.monotonic()`` value (None: no deadline)."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + remaining


def check_request_id(explicit: str) -> str:
    """The request's own ``id`` field, refused when longer than MAX_REQUEST_ID_CHARS."""
    if len(explicit) > MAX_REQUEST_ID_CHARS:
        raise errors.InvalidInput(f"id: {len(explicit)} characters; expected at most {MAX_REQUEST_ID_CHARS}")
    return explicit


def request_id(explicit: str, context: grpc.aio.ServicerContext | None) -> str:
    """The request's id: its own ``id`` field, else an ``x-request-id`` header, else a fresh one.

    An ``id`` field over the limit is refused (the client chose it and gets it back); a header
    over the limit is ignored for a fresh id (a proxy may have set it).
    """
    if explicit:
        return check_request_id(explicit)
    if context is not None:
        for key, value in context.invocation_metadata() or ():
            if key == "x-request-id" and value and len(value) <= MAX_REQUEST_ID_CHARS:
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
            sha256=getattr(self.model, "sha256", None),
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
    per-request errors in-band). At most ``max_in_flight`` requests are held at
    once, counting each from when it is read until its answer has been written
    (the caller's ``yield`` returns once gRPC has taken it): a client that stops
    reading answers stops the reading of its requests. When ``stop`` is set (the server drains), no
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
        # The slot is released by the writer below once the answer is written, not here.
        try:
            results.put_nowait(await handle(item))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handle() answers failures in-band; anything else ends the stream
            results.put_nowait(exc)

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
        failure: Exception | None = None
        try:
            iterator = aiter(requests)
            while True:
                await slots.acquire()
                try:
                    item = await next_or_stop(iterator, stop_waiter)
                except Exception as exc:  # the stream itself failed (e.g. a message that does not parse)
                    failure = exc
                    item = None
                if item is None:
                    slots.release()
                    break
                task = asyncio.create_task(one(item))
                pending.add(task)
                task.add_done_callback(pending.discard)
            # Requests read before the end (or before a failure) were accepted: answer them first.
            while pending:
                await asyncio.gather(*list(pending), return_exceptions=True)
        finally:
            if stop_waiter is not None:
                stop_waiter.cancel()
            results.put_nowait(done_reading)
        if failure is not None:
            raise failure

    reader_task = asyncio.create_task(reader())
    try:
        while True:
            item = await results.get()
            if item is done_reading:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
            slots.release()
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
