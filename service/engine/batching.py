"""Dynamic batching: many callers' rows in, one model run per batch, each caller's rows out.

Knows nothing of gRPC, onnxruntime or metrics: it takes blocking ``run``
callables (one per model instance) and reports what happened through plain
callbacks. Batches that may start at once are formed by one callback per
turn of the event loop, after everything that arrived in that turn is
queued; a background task forms those that must wait (``max_queue_delay``).
Each batch runs in its instance's own thread and is answered from a callback
on the loop; everything else (futures, timers, the queue) lives on the loop,
so there are no locks. This module is the queue and its scheduling; the
instance thread that runs a formed batch, and the plain types handed out
(:class:`BatchInfo`, :class:`Result`, :class:`Hooks`, :class:`Reservation`,
all importable from here), are in :mod:`service.engine.batch_run`.

Policy (measured with ``python -m bench.research.engine_batching``, numbers in docs/engine.md):

* The queue is bounded in **rows**. A request that does not fit is refused at
  once with :class:`errors.Overloaded`; nothing waits for room.
* A batch closes when it holds ``max_batch_size`` rows (or reaches the
  largest preferred size), or ``max_queue_delay`` after its first request
  arrived, or -- with ``dispatch_when_idle`` (the default) -- as soon as an
  instance is idle and no batch is running. While the instances are busy,
  arrivals pile up and the next batch is naturally larger; waiting while
  idle only adds latency at low load and adds no throughput at high load.
* Requests whose future was cancelled (the caller went away) or whose
  deadline passed are dropped before they cost compute. A deadline also has
  a timer, so the caller gets DEADLINE_EXCEEDED when it passes rather than
  when its request reaches the head of the queue.
* Inputs are concatenated once on axis 0 and the outputs split by each
  request's row count; rows out != rows in fails the batch loudly.
* A failing run fails only that batch's requests (:class:`errors.InferenceFailed`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from service import errors
from service.engine.batch_run import (
    BatchInfo,
    Hooks,
    Reservation,
    Result,
    RowMismatch,
    RunFn,
    Runner,
    Worker,
    as_runner,
)

__all__ = ["BatchInfo", "Batcher", "Hooks", "Reservation", "Result", "RunFn", "Runner"]

log = logging.getLogger(__name__)


class _State(enum.Enum):
    QUEUED = 1
    TAKEN = 2
    DROPPED = 3


class _Request:
    __slots__ = ("rows", "n", "deadline", "future", "enqueued", "started", "state", "timer")

    def __init__(self, rows: np.ndarray, deadline: float | None, future: asyncio.Future) -> None:
        self.rows = rows
        self.n = int(rows.shape[0])
        self.deadline = deadline
        self.future = future
        self.enqueued = time.monotonic()
        self.started = self.enqueued
        self.state = _State.QUEUED
        self.timer: asyncio.TimerHandle | None = None


class Batcher:
    """A bounded queue of row blocks in front of one or more blocking run functions.

    ``runners``: one per model instance, a :class:`Runner` (which stages a batch
    itself) or a bare run function; each gets its own thread and at most one
    batch at a time. ``label`` prefixes client-facing messages
    (e.g. ``"model 'digits' version 1"``).
    """

    def __init__(
        self,
        runners: Sequence[RunFn | Runner],
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_rows: int,
        preferred_batch_sizes: Sequence[int] = (),
        dispatch_when_idle: bool = True,
        hooks: Hooks | None = None,
        label: str = "model",
    ) -> None:
        if not runners:
            raise ValueError("runners: need at least one run function")
        if max_batch_size < 1 or max_queue_rows < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size, max_queue_rows >= 1 and max_queue_delay_s >= 0 required")
        self._runners = list(runners)
        self.max_batch_size = int(max_batch_size)
        self.max_queue_delay_s = float(max_queue_delay_s)
        self.max_queue_rows = int(max_queue_rows)
        self.preferred_batch_sizes = tuple(
            sorted(int(b) for b in preferred_batch_sizes if b <= max_batch_size)
        )
        self.dispatch_when_idle = dispatch_when_idle
        self.hooks = hooks or Hooks()
        self.label = label
        self._workers = [Worker(as_runner(run), f"svertka-run{i}") for i, run in enumerate(self._runners)]
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0  # rows in live (QUEUED) requests
        self._reserved_rows = 0
        self._idle = list(range(len(self._runners)))[::-1]
        self._running: set[asyncio.Future] = set()  # one future per batch being computed
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()  # set whenever nothing is queued, reserved or running
        self._settled.set()
        self._task: asyncio.Task | None = None
        self._dispatch_scheduled = False
        self._draining = False
        self._closed = False

    # -- introspection ----------------------------------------------------------
    @property
    def queued_rows(self) -> int:
        """Rows waiting: queued plus reserved for requests still being prepared."""
        return self._queued_rows + self._reserved_rows

    @property
    def busy(self) -> bool:
        """True while anything is queued, reserved or running."""
        return not self._settled.is_set()

    # -- admission --------------------------------------------------------------
    def reserve(self, rows: int) -> Reservation:
        """Hold room for ``rows`` rows now; raises Overloaded/Draining at once if impossible."""
        self._admit(rows)
        self._reserved_rows += rows
        self._settled.clear()
        self._changed(rows)
        return Reservation(self._unreserve, rows)

    def reserve_each(self, count: int) -> list[Reservation]:
        """Hold one row each for ``count`` requests, all or nothing (e.g. the images of one request)."""
        self._admit(count)
        self._reserved_rows += count
        self._settled.clear()
        self._changed(count)
        return [Reservation(self._unreserve, 1) for _ in range(count)]

    def _unreserve(self, rows: int) -> None:
        self._reserved_rows -= rows
        self._changed(-rows)
        self._maybe_settled()

    def _admit(self, rows: int) -> None:
        if self._draining or self._closed:
            raise errors.Draining(f"{self.label} is shutting down and accepts no new requests")
        if rows > self.max_queue_rows:
            self._hook(self.hooks.rejected, "queue_full")
            raise errors.Overloaded(
                f"{self.label}: a request of {rows} rows can never fit the queue of {self.max_queue_rows} rows"
            )
        waiting = self.queued_rows
        if waiting + rows > self.max_queue_rows:
            self._hook(self.hooks.rejected, "queue_full")
            raise errors.Overloaded(
                f"{self.label}: queue is full ({waiting} of {self.max_queue_rows} rows waiting, "
                f"this request needs {rows}); retry with backoff"
            )

    async def submit(
        self, rows: np.ndarray, *, deadline: float | None = None, reservation: Reservation | None = None
    ) -> Result:
        """Queue ``rows`` (shape (n, ...)) and wait for exactly those rows of output.

        ``deadline`` is an absolute ``time.monotonic()`` value. Cancelling the
        awaiting task drops the rows if they have not started computing.
        """
        n = int(rows.shape[0])
        if n < 1:
            raise ValueError("rows: need at least one row")
        held = reservation._consume() if reservation is not None else 0
        if held:
            # Room was taken earlier (before draining, possibly): convert it, release any excess.
            self._reserved_rows -= held
            self._changed(-held)
            if n > held:
                try:
                    self._admit(n - held)
                except errors.SvertkaError:
                    self._maybe_settled()
                    raise
        else:
            self._admit(n)
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            self._hook(self.hooks.rejected, "deadline")
            self._maybe_settled()
            raise errors.DeadlineExceeded(f"{self.label}: the deadline passed before the request was queued")
        loop = asyncio.get_running_loop()
        self._ensure_task(loop)
        req = _Request(rows, deadline, loop.create_future())
        req.future.add_done_callback(lambda _f, r=req: self._on_done(r))
        if deadline is not None:
            req.timer = loop.call_at(loop.time() + (deadline - now), self._expire, req)
        self._queue.append(req)
        self._queued_rows += n
        self._changed(n)
        self._settled.clear()
        self._dispatch_soon(loop)
        return await req.future

    # -- lifecycle ------------------------------------------------------------------
    async def drain(self) -> None:
        """Refuse new requests; return when everything queued, reserved and running is finished."""
        self._draining = True
        self._wake.set()
        await self._settled.wait()

    async def close(self) -> None:
        """Stop: fail whatever is still queued with Draining, wait for running batches, free threads."""
        self._draining = True
        self._closed = True
        self._fail_queued(lambda: errors.Draining(f"{self.label} was unloaded before this request ran"))
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for worker in self._workers:
            worker.stop()

    # -- internals ----------------------------------------------------------------
    def _ensure_task(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None:
            self._task = loop.create_task(self._loop(), name=f"batcher[{self.label}]")

    def _hook(self, fn: Callable, *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("%s: accounting hook %r failed", self.label, getattr(fn, "__name__", fn))

    def _changed(self, delta: int) -> None:
        if delta:
            self._hook(self.hooks.queue_rows, delta)

    def _maybe_settled(self) -> None:
        if not self._queued_rows and not self._reserved_rows and not self._running:
            self._settled.set()

    def _drop(self, req: _Request) -> None:
        """Take a live request out of the accounting (it stays in the deque until popped)."""
        req.state = _State.DROPPED
        self._queued_rows -= req.n
        self._changed(-req.n)
        if req.timer is not None:
            req.timer.cancel()
        self._maybe_settled()

    def _on_done(self, req: _Request) -> None:
        if req.state is _State.QUEUED and req.future.cancelled():
            self._drop(req)
            expired = req.deadline is not None and time.monotonic() >= req.deadline
            self._hook(self.hooks.rejected, "deadline" if expired else "cancelled")

    def _expire(self, req: _Request) -> None:
        if req.state is _State.QUEUED and not req.future.done():
            self._drop(req)
            self._hook(self.hooks.rejected, "deadline")
            waited = time.monotonic() - req.enqueued
            req.future.set_exception(
                errors.DeadlineExceeded(
                    f"{self.label}: the deadline passed after {waited * 1000:.1f} ms in the queue; not computed"
                )
            )

    def _purge_head(self) -> None:
        """Pop dropped requests; drop cancelled or expired ones found at the head."""
        now = time.monotonic()
        while self._queue:
            req = self._queue[0]
            if req.state is _State.QUEUED:
                if req.future.cancelled():
                    self._on_done(req)  # its callback may not have run yet
                elif req.deadline is not None and req.deadline <= now:
                    self._expire(req)
                else:
                    return
            self._queue.popleft()

    def _close_time(self) -> float | None:
        """When the forming batch should close (monotonic time), or None for now."""
        if self._queued_rows >= self.max_batch_size or self._draining:
            return None
        if self.preferred_batch_sizes and self._queued_rows >= self.preferred_batch_sizes[-1]:
            return None
        if self.dispatch_when_idle and not self._running:
            return None
        return self._queue[0].enqueued + self.max_queue_delay_s

    def _target(self) -> int:
        if self.preferred_batch_sizes:
            fitting = [b for b in self.preferred_batch_sizes if b <= self._queued_rows]
            if fitting:
                return fitting[-1]
        return self.max_batch_size

    def _take(self) -> list[_Request]:
        target = self._target()
        batch: list[_Request] = []
        rows = 0
        now = time.monotonic()
        while self._queue:
            self._purge_head()
            if not self._queue:
                break
            req = self._queue[0]
            # Whole requests in arrival order; a request larger than the batch runs alone.
            if batch and rows + req.n > target:
                break
            self._queue.popleft()
            req.state = _State.TAKEN
            if req.timer is not None:
                req.timer.cancel()
            self._queued_rows -= req.n
            self._changed(-req.n)
            req.started = now
            self._hook(self.hooks.queued, now - req.enqueued)
            batch.append(req)
            rows += req.n
        return batch

    async def _loop(self) -> None:
        try:
            await self._form_batches()
        except Exception:
            # A bug here must not leave callers waiting forever: fail what is queued, restart on next submit.
            log.exception("%s: batching loop failed; failing the queued requests", self.label)
            self._task = None
            self._fail_queued(lambda: errors.InferenceFailed(f"{self.label}: internal batching error"))

    def _fail_queued(self, error: Callable[[], errors.SvertkaError]) -> None:
        """Take every request out of the queue; those still waiting fail with a new ``error()`` each."""
        while self._queue:
            req = self._queue.popleft()
            if req.state is _State.QUEUED:
                self._drop(req)
                if not req.future.done():
                    req.future.set_exception(error())

    async def _form_batches(self) -> None:
        while True:
            self._purge_head()
            if not self._queue or not self._idle:
                self._wake.clear()
                await self._wake.wait()
                continue
            close_at = self._close_time()
            now = time.monotonic()
            if close_at is not None and close_at > now:
                self._wake.clear()
                try:
                    async with asyncio.timeout(close_at - now):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            self._dispatch(asyncio.get_running_loop())

    def _dispatch_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """Look at the queue once the current loop iteration is done (once, however many ask).

        Every request that arrives in the same iteration (one read of the
        sockets) or is resubmitted by callers whose batch just finished is
        queued by then and joins the batch. A plain callback costs less than
        waking the batching task, which is left the batches that must wait.
        """
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            loop.call_soon(self._dispatch_ready, loop)

    def _dispatch_ready(self, loop: asyncio.AbstractEventLoop) -> None:
        self._dispatch_scheduled = False
        if self._closed:
            return
        self._purge_head()
        while self._queue and self._idle:
            if self._close_time() is not None:
                self._wake.set()  # the batching task waits until this batch should close
                return
            self._dispatch(loop)
            self._purge_head()

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take a batch from the head of the queue and start it on an idle instance."""
        batch = self._take()
        if not batch:
            return
        runner = self._idle.pop()
        future = self._workers[runner].submit(loop, [r.rows for r in batch])
        self._running.add(future)
        future.add_done_callback(lambda f: self._finish(runner, batch, f))

    def _finish(self, runner: int, batch: list[_Request], future: asyncio.Future) -> None:
        """A batch came back from its instance (a done callback on the loop): answer its requests."""
        total = sum(r.n for r in batch)
        try:
            outputs, info = future.result()
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, RowMismatch):
                log.error("%s: %s", self.label, exc)
                message = f"{self.label}: {exc}"
            else:
                log.error("%s: inference failed on a batch of %d rows", self.label, total, exc_info=exc)
                message = (
                    f"{self.label}: inference failed on a batch of {total} rows: {type(exc).__name__}: {exc}"
                )
            for req in batch:
                if not req.future.done():
                    req.future.set_exception(errors.InferenceFailed(message))
        else:
            self._hook(self.hooks.batch, info)
            for req, rows in zip(batch, outputs, strict=True):
                if not req.future.done():
                    req.future.set_result(Result(rows, queue_s=req.started - req.enqueued, batch=info))
        finally:
            self._idle.append(runner)
            self._running.discard(future)
            self._maybe_settled()
            if self._queue:
                self._dispatch_soon(future.get_loop())
