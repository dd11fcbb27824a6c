"""The batcher with a fake run function: what each caller gets, and what never reaches compute.

The fake model holds a gate: while it is closed the instance is busy, so
requests pile up in the queue deterministically (no sleeps, no timing).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import numpy as np
import pytest

from service import errors
from service.engine.batching import Batcher, Hooks
from tests.helpers.polling import until


class FakeModel:
    """A blocking run function: rows -> (n, 2) outputs unique per input row, optionally gated."""

    def __init__(self, *, fail_on: float | None = None, drop_last_row: bool = False) -> None:
        self.batches: list[int] = []
        self.rows_seen: list[float] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)
        self.fail_on = fail_on
        self.drop_last_row = drop_last_row

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.entered.release()
        assert self.gate.wait(10), "test forgot to open the gate"
        self.batches.append(x.shape[0])
        self.rows_seen.extend(x[:, 0].tolist())
        if self.fail_on is not None and (x[:, 0] == self.fail_on).any():
            raise RuntimeError("boom: onnxruntime said no")
        out = np.stack([x[:, 0], -x[:, 0]], axis=1)
        return out[:-1] if self.drop_last_row else out

    async def wait_entered(self, count: int = 1) -> None:
        for _ in range(count):
            assert await asyncio.to_thread(self.entered.acquire, True, 10), "run function never entered"


class Recorded:
    def __init__(self) -> None:
        self.rejected: Counter[str] = Counter()
        self.queued: list[float] = []
        self.batches: list[int] = []
        self.depth = 0

    def hooks(self) -> Hooks:
        return Hooks(
            rejected=lambda r: self.rejected.update([r]),
            queued=self.queued.append,
            batch=lambda info: self.batches.append(info.size),
            queue_rows=self._depth,
        )

    def _depth(self, delta: int) -> None:
        self.depth += delta
        assert self.depth >= 0


def rows(*values: float) -> np.ndarray:
    return np.array([[v, 0.0, 0.0] for v in values], np.float32)


def make(model: FakeModel, rec: Recorded | None = None, **kwargs) -> Batcher:
    settings = dict(max_batch_size=8, max_queue_delay_s=0.002, max_queue_rows=64)
    settings.update(kwargs)
    runners = kwargs.pop("runners", None) or [model]
    settings.pop("runners", None)
    return Batcher(runners, hooks=(rec or Recorded()).hooks(), label="model 'fake' version 1", **settings)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def one_running_and_queued(model: FakeModel, b: Batcher, queued: int) -> list[asyncio.Task]:
    """One one-row request held inside the model, then ``queued`` more waiting in the queue behind it."""
    model.gate.clear()
    tasks = [asyncio.create_task(b.submit(rows(0)))]
    await model.wait_entered()
    tasks += [asyncio.create_task(b.submit(rows(i))) for i in range(1, queued + 1)]
    await until(lambda: b.queued_rows == queued, f"{queued} queued rows")
    return tasks


def test_requests_are_batched_and_each_caller_gets_its_own_rows():
    async def main():
        model, rec = FakeModel(), Recorded()
        b = make(model, rec)
        model.gate.clear()
        first = asyncio.create_task(b.submit(rows(100)))
        await model.wait_entered()  # instance busy: the next requests queue up
        sizes = [1, 2, 3, 1]
        inputs = []
        start = 0
        for n in sizes:
            inputs.append(rows(*range(start, start + n)))
            start += n
        tasks = [asyncio.create_task(b.submit(x)) for x in inputs]
        await until(lambda: b.queued_rows == 7, "7 queued rows")
        model.gate.set()
        results = await asyncio.gather(*tasks)
        assert (await first).rows.tolist() == [[100, -100]]
        for x, res in zip(inputs, results, strict=True):
            np.testing.assert_array_equal(res.rows, np.stack([x[:, 0], -x[:, 0]], 1))
            assert res.batch.size == 7
        assert model.batches == [1, 7]
        assert rec.batches == [1, 7] and rec.depth == 0 and len(rec.queued) == 5
        await b.close()

    run(main())


def test_requests_arriving_together_at_an_idle_instance_share_one_batch():
    """Dispatch when idle does not mean "the first arrival runs alone": a batch starts once
    the loop has taken in everything that arrived with it (one read of the sockets), and
    callers that resubmit as soon as their answers come back form the next batch together."""

    async def main():
        model, rec = FakeModel(), Recorded()
        b = make(model, rec)
        results = await asyncio.gather(*(b.submit(rows(i)) for i in range(5)))
        assert [r.batch.size for r in results] == [5] * 5
        assert model.batches == [5]

        async def caller(i: int) -> None:
            for _ in range(4):
                await b.submit(rows(i))

        await asyncio.gather(*(caller(i) for i in range(6)))
        assert model.batches == [5, 6, 6, 6, 6]
        assert rec.depth == 0 and not b.busy
        await b.close()

    run(main())


def test_batch_closes_at_max_batch_size_in_arrival_order():
    async def main():
        model = FakeModel()
        b = make(model, max_batch_size=4)
        tasks = await one_running_and_queued(model, b, 9)
        model.gate.set()
        results = await asyncio.gather(*tasks)
        assert [r.rows[0, 0] for r in results] == list(range(10))
        assert model.batches == [1, 4, 4, 1]
        assert model.rows_seen == list(range(10))
        await b.close()

    run(main())


def test_a_full_batch_does_not_wait_for_the_window():
    async def main():
        model = FakeModel()
        # An hour-long window: only "batch is full" can close it.
        b = make(model, max_batch_size=4, max_queue_delay_s=3600, dispatch_when_idle=False)
        results = await asyncio.gather(*(b.submit(rows(i)) for i in range(4)))
        assert [r.batch.size for r in results] == [4, 4, 4, 4]
        await b.close()

    run(main())


def test_window_closes_after_max_queue_delay_without_idle_dispatch():
    async def main():
        model = FakeModel()
        b = make(model, max_batch_size=32, max_queue_delay_s=0.001, dispatch_when_idle=False)
        res = await b.submit(rows(1, 2))
        assert res.rows.shape == (2, 2) and model.batches == [2]
        await b.close()

    run(main())


def test_preferred_batch_sizes():
    async def main():
        model = FakeModel()
        b = make(model, max_batch_size=8, preferred_batch_sizes=(4,))
        tasks = await one_running_and_queued(model, b, 7)
        model.gate.set()
        await asyncio.gather(*tasks)
        # 7 waiting: the preferred 4 first, then the rest once the instance is idle.
        assert model.batches == [1, 4, 3]
        await b.close()

    run(main())


def test_cancelled_request_is_dropped_before_compute():
    async def main():
        model, rec = FakeModel(), Recorded()
        b = make(model, rec)
        model.gate.clear()
        first = asyncio.create_task(b.submit(rows(0)))
        await model.wait_entered()
        gone = asyncio.create_task(b.submit(rows(666, 667)))
        kept = asyncio.create_task(b.submit(rows(1)))
        await until(lambda: b.queued_rows == 3, "3 queued rows")
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        await until(lambda: b.queued_rows == 1, "the cancelled rows to leave the queue")
        model.gate.set()
        await first
        assert (await kept).rows.tolist() == [[1, -1]]
        assert 666 not in model.rows_seen and 667 not in model.rows_seen
        assert rec.rejected == {"cancelled": 1}
        assert rec.depth == 0
        await b.close()

    run(main())


def test_deadline_passed_while_queued_is_never_computed():
    async def main():
        model, rec = FakeModel(), Recorded()
        b = make(model, rec)
        model.gate.clear()
        first = asyncio.create_task(b.submit(rows(0)))
        await model.wait_entered()
        # The caller hears DEADLINE_EXCEEDED while the instance is still busy (a timer, not a head check).
        with pytest.raises(
            errors.DeadlineExceeded, match="deadline passed after .* ms in the queue; not computed"
        ):
            await b.submit(rows(777), deadline=time.monotonic() + 0.05)
        assert b.queued_rows == 0
        with pytest.raises(errors.DeadlineExceeded, match="before the request was queued"):
            await b.submit(rows(778), deadline=time.monotonic() - 1)
        model.gate.set()
        await first
        assert (await b.submit(rows(5), deadline=time.monotonic() + 60)).rows.tolist() == [[5, -5]]
        assert 777 not in model.rows_seen and 778 not in model.rows_seen
        assert rec.rejected == {"deadline": 2}
        await b.close()

    run(main())


def test_full_queue_is_refused_immediately():
    async def main():
        model, rec = FakeModel(), Recorded()
        b = make(model, rec, max_queue_rows=4)
        model.gate.clear()
        first = asyncio.create_task(b.submit(rows(0)))
        await model.wait_entered()  # running rows no longer count against the queue
        queued = [asyncio.create_task(b.submit(rows(i, i))) for i in (1, 2)]
        await until(lambda: b.queued_rows == 4, "a full queue")
        with pytest.raises(
            errors.Overloaded, match=r"queue is full \(4 of 4 rows waiting, this request needs 1\)"
        ):
            await b.submit(rows(9))
        with pytest.raises(errors.Overloaded, match="can never fit"):
            await b.submit(rows(*range(5)))
        # Refused while the instance is still blocked: the refusal did not wait for room.
        assert model.batches == []
        assert rec.rejected == {"queue_full": 2}
        model.gate.set()
        await asyncio.gather(first, *queued)
        assert 9 not in model.rows_seen
        await b.close()

    run(main())


def test_a_failing_batch_fails_only_its_requests():
    async def main():
        model, rec = FakeModel(fail_on=13.0), Recorded()
        b = make(model, rec)
        model.gate.clear()
        first = asyncio.create_task(b.submit(rows(0)))
        await model.wait_entered()
        doomed = [asyncio.create_task(b.submit(rows(v))) for v in (12, 13, 14)]
        await until(lambda: b.queued_rows == 3, "3 queued rows")
        model.gate.set()
        await first
        outcomes = await asyncio.gather(*doomed, return_exceptions=True)
        for outcome in outcomes:
            assert isinstance(outcome, errors.InferenceFailed)
            assert "inference failed on a batch of 3 rows: RuntimeError: boom" in str(outcome)
        # The next batch runs normally.
        assert (await b.submit(rows(20))).rows.tolist() == [[20, -20]]
        assert rec.batches == [1, 1]
        await b.close()

    run(main())


def test_rows_out_not_equal_rows_in_fails_loudly():
    async def main():
        model = FakeModel(drop_last_row=True)
        b = make(model)
        with pytest.raises(errors.InferenceFailed, match="returned 1 rows for a batch of 2 rows"):
            await b.submit(rows(1, 2))
        await b.close()

    run(main())


def test_drain_finishes_queued_work_and_refuses_new():
    async def main():
        model = FakeModel()
        b = make(model, max_batch_size=2)
        tasks = await one_running_and_queued(model, b, 5)
        draining = asyncio.create_task(b.drain())
        await asyncio.sleep(0)
        with pytest.raises(errors.Draining, match="shutting down"):
            await b.submit(rows(99))
        assert not draining.done()
        model.gate.set()
        await draining
        assert all(t.done() for t in tasks)
        assert [t.result().rows[0, 0] for t in tasks] == list(range(6))
        await b.close()

    run(main())


def test_reservation_holds_room_and_survives_drain():
    async def main():
        model, rec = FakeModel(), Recorded()
        b = make(model, rec, max_queue_rows=2)
        held = b.reserve(2)
        with pytest.raises(errors.Overloaded):
            b.reserve(1)
        assert rec.depth == 2
        draining = asyncio.create_task(b.drain())
        await asyncio.sleep(0)
        assert not draining.done()  # reserved work was accepted: drain waits for it
        res = await b.submit(rows(3, 4), reservation=held)
        assert res.rows.tolist() == [[3, -3], [4, -4]]
        await draining
        other = Batcher([model], max_batch_size=4, max_queue_delay_s=0, max_queue_rows=2)
        r = other.reserve(2)
        r.release()
        other.reserve(2).release()
        assert other.queued_rows == 0
        await b.close()
        await other.close()

    run(main())


def test_instances_run_batches_concurrently():
    async def main():
        a, c = FakeModel(), FakeModel()
        a.gate.clear()
        c.gate.clear()
        b = make(a, runners=[a, c])
        t1 = asyncio.create_task(b.submit(rows(1)))
        await a.wait_entered()
        t2 = asyncio.create_task(b.submit(rows(2)))
        # Both instances are inside their run function at the same time.
        await c.wait_entered()
        a.gate.set()
        c.gate.set()
        assert (await t1).rows[0, 0] == 1 and (await t2).rows[0, 0] == 2
        assert a.batches == [1] and c.batches == [1]
        await b.close()

    run(main())


def test_close_fails_whatever_is_still_queued():
    async def main():
        model = FakeModel()
        b = make(model)
        model.gate.clear()
        first = asyncio.create_task(b.submit(rows(0)))
        await model.wait_entered()
        queued = asyncio.create_task(b.submit(rows(1)))
        await until(lambda: b.queued_rows == 1, "1 queued row")
        closing = asyncio.create_task(b.close())
        with pytest.raises(errors.Draining, match="unloaded before this request ran"):
            await queued
        model.gate.set()
        await closing
        assert (await first).rows.tolist() == [[0, 0]]

    run(main())


@pytest.mark.parametrize("idle_dispatch", [True, False])
def test_randomised_traffic_always_settles(idle_dispatch):
    """Many callers with random sizes, cancellations and deadlines: everyone gets an answer."""

    async def main():
        rng = np.random.default_rng(1)
        model, rec = FakeModel(), Recorded()
        b = make(
            model,
            rec,
            runners=[model, FakeModel()],
            max_batch_size=8,
            max_queue_rows=40,
            max_queue_delay_s=0.0005,
            preferred_batch_sizes=(4,),
            dispatch_when_idle=idle_dispatch,
        )
        outcomes: Counter[str] = Counter()

        async def caller(i: int) -> None:
            for j in range(20):
                n = int(rng.integers(1, 5))
                x = rows(*[i * 1000 + j * 10 + k for k in range(n)])
                deadline = time.monotonic() + float(rng.uniform(0.0, 0.01)) if rng.random() < 0.2 else None
                task = asyncio.ensure_future(b.submit(x, deadline=deadline))
                if rng.random() < 0.1:
                    await asyncio.sleep(0)
                    task.cancel()
                try:
                    res = await task
                except asyncio.CancelledError:
                    outcomes["cancelled"] += 1
                except errors.DeadlineExceeded:
                    outcomes["deadline"] += 1
                except errors.Overloaded:
                    outcomes["overloaded"] += 1
                else:
                    np.testing.assert_array_equal(res.rows[:, 0], x[:, 0])
                    outcomes["ok"] += 1

        await asyncio.gather(*(caller(i) for i in range(16)))
        await b.drain()
        assert b.queued_rows == 0 and not b.busy and rec.depth == 0
        await b.close()
        return outcomes

    outcomes = run(main())
    assert sum(outcomes.values()) == 16 * 20
    assert outcomes["ok"] > 0
