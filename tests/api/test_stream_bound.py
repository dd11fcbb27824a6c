"""run_stream holds at most max_in_flight requests, counting answers not yet written."""

from __future__ import annotations

import asyncio

from service.api import streams


def test_a_stream_whose_answers_are_not_taken_stops_reading_requests():
    read = 0

    async def requests():
        nonlocal read
        for i in range(1000):
            read += 1
            yield i

    async def handle(item: int) -> int:
        return item  # answered at once: only the unwritten answers can hold the slots

    async def scenario() -> tuple[int, list[int]]:
        stream = streams.run_stream(requests(), handle, max_in_flight=8)
        first = await anext(stream)  # the writer takes one answer, then stops taking them
        for _ in range(50):
            await asyncio.sleep(0)
        held = read
        rest = [item async for item in stream]
        return held, [first, *rest]

    held, answers = asyncio.run(scenario())
    # Eight slots: the answer being written holds one, seven more are read and answered, and
    # the ninth request is not read until the writer takes an answer.
    assert held == 8
    assert sorted(answers) == list(range(1000))


def test_requests_read_before_a_broken_request_stream_are_answered():
    async def requests():
        yield 1
        yield 2
        raise ValueError("the third message did not parse")

    async def handle(item: int) -> int:
        await asyncio.sleep(0.01)
        return item * 10

    async def scenario():
        answers = []
        try:
            async for answer in streams.run_stream(requests(), handle):
                answers.append(answer)
        except ValueError as exc:
            return answers, str(exc)
        return answers, None

    assert asyncio.run(scenario()) == ([10, 20], "the third message did not parse")
