"""One batch's run, and the plain types the :class:`~service.engine.batching.Batcher` hands out and takes.

:mod:`service.engine.batching` is the queue and its scheduling (admission, when a
batch closes, which instance runs it, lifecycle); this module is what happens
to a batch once it is formed: an instance's thread stages the requests' rows
(one copy on axis 0, into the instance's own buffer where it has one), runs the
model once and splits the output by each request's row count (rows out != rows
staged fails the batch loudly), then hands the result back to the event loop.
Neither knows gRPC, onnxruntime or metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

RunFn = Callable[[np.ndarray], np.ndarray]


class Runner(Protocol):
    """One instance as the batcher runs it (``service.engine.runtime.Session`` is one)."""

    def stage(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """The batch's input from the requests' rows, in order (padding rows may follow)."""
        ...

    def run_staged(self, batch: np.ndarray) -> np.ndarray:
        """One output row per row of ``batch``."""
        ...


class Concatenating:
    """A bare run function as a :class:`Runner`: rows concatenated once, run as they are."""

    def __init__(self, run: RunFn) -> None:
        self.run_staged = run

    @staticmethod
    def stage(arrays: Sequence[np.ndarray]) -> np.ndarray:
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)


def as_runner(run: RunFn | Runner) -> Runner:
    return run if hasattr(run, "run_staged") else Concatenating(run)  # type: ignore[arg-type,return-value]


@dataclasses.dataclass(frozen=True)
class BatchInfo:
    """One executed batch: its rows and the three compute stages (seconds)."""

    size: int
    input_s: float
    infer_s: float
    output_s: float

    @property
    def compute_s(self) -> float:
        return self.input_s + self.infer_s + self.output_s


@dataclasses.dataclass(frozen=True)
class Result:
    """One request's rows and how it got them."""

    rows: np.ndarray
    queue_s: float
    batch: BatchInfo


def _noop(*_args: object) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Hooks:
    """Callbacks for accounting (all run on the event loop; failures are logged, never raised).

    ``rejected(reason)``: refused or dropped before compute, reason one of
    ``queue_full``, ``deadline``, ``cancelled``. ``queued(seconds)``: a request
    left the queue for a batch. ``batch(info)``: a batch finished without
    error. ``queue_rows(delta)``: rows waiting changed by ``delta`` (rows
    reserved for requests still being prepared count as waiting).
    """

    rejected: Callable[[str], None] = _noop
    queued: Callable[[float], None] = _noop
    batch: Callable[[BatchInfo], None] = _noop
    queue_rows: Callable[[int], None] = _noop


class Reservation:
    """Room in the queue held for a request that is still being prepared (e.g. decoded).

    Taking room before the expensive preparation makes an overloaded server
    refuse at once instead of after decoding; pass it to ``Batcher.submit``
    or :meth:`release` it if the request is abandoned. Made by
    ``Batcher.reserve``, which passes the callback that gives the rows back.
    """

    __slots__ = ("_give_back", "rows")

    def __init__(self, give_back: Callable[[int], None], rows: int) -> None:
        self._give_back = give_back
        self.rows = rows

    def release(self) -> None:
        if self.rows:
            rows, self.rows = self.rows, 0
            self._give_back(rows)

    def _consume(self) -> int:
        rows, self.rows = self.rows, 0
        return rows


class RowMismatch(RuntimeError):
    """The model returned a different number of rows than the batch had."""


class Worker:
    """One instance's thread: runs one batch at a time and hands the result back to the loop.

    A bare queue and one ``call_soon_threadsafe`` per batch instead of
    ``run_in_executor``: the hop to the thread and back is paid on every batch,
    and on small models it is a large part of a request's cost
    (``python -m bench.research.hop`` measures both).
    """

    def __init__(self, run: Runner, name: str) -> None:
        self._run = run
        self._name = name
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, loop: asyncio.AbstractEventLoop, arrays: list[np.ndarray]) -> asyncio.Future:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            self._thread.start()
        future = loop.create_future()
        self._inbox.put((loop, future, arrays))
        return future

    def stop(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            self._thread = None

    def _serve(self) -> None:
        while (item := self._inbox.get()) is not None:
            loop, future, arrays = item
            try:
                result = compute(self._run, arrays)
            except BaseException as exc:  # handed to the waiting task, which reports it
                outcome, value = _set_exception, exc
            else:
                outcome, value = _set_result, result
            del arrays, item
            try:
                loop.call_soon_threadsafe(outcome, future, value)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass


def _set_result(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def compute(run: Runner, arrays: list[np.ndarray]) -> tuple[list[np.ndarray], BatchInfo]:
    """Runs in the instance's thread: stage once, run once, split by row counts.

    The batch's size in :class:`BatchInfo` is the requests' rows; padding rows are not counted.
    """
    t0 = time.perf_counter()
    batch = run.stage(arrays)
    t1 = time.perf_counter()
    out = run.run_staged(batch)
    t2 = time.perf_counter()
    staged = batch.shape[0]
    rows_out = out.shape[0] if isinstance(out, np.ndarray) and out.ndim >= 1 else None
    if rows_out != staged:
        raise RowMismatch(
            f"the model returned {rows_out} rows for a batch of {staged} rows "
            f"({len(arrays)} requests); no request in this batch is answered"
        )
    counts = [a.shape[0] for a in arrays]
    rows_in = sum(counts)
    outputs = np.split(out[:rows_in], np.cumsum(counts)[:-1], axis=0)
    t3 = time.perf_counter()
    return outputs, BatchInfo(size=rows_in, input_s=t1 - t0, infer_s=t2 - t1, output_s=t3 - t2)
