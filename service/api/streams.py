"""Bidirectional streams: many requests in flight on one stream, answered as they finish, bounded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from service import errors

T = TypeVar("T")
R = TypeVar("R")

#: Requests of one stream that the server holds at once: read and not yet answered, or
#: answered and not yet written to the client. At the bound the stream stops reading (HTTP/2
#: flow control pushes back on the client), so a client that never reads its answers cannot
#: make the server keep them: a stream's footprint is at most this many requests, each at most
#: the message-size limit, plus their answers.
STREAM_MAX_IN_FLIGHT = 128


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
