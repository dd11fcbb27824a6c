"""The pieces under ``svertka serve --frontends N``: frames on the engine socket, slab ranges, slabs."""

from __future__ import annotations

import asyncio
import os
import struct

import numpy as np
import pytest

from service.ipc import framing
from service.ipc.slab import ALIGN, Ranges, Slab, SlabError


def _read(data: bytes):
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await framing.read(reader)

    return asyncio.run(go())


def test_a_frame_carries_a_header_and_a_payload():
    header, payload = _read(framing.encode({"op": "result", "id": 7}, b"\x01\x02"))
    assert header == {"op": "result", "id": 7} and payload == b"\x01\x02"
    assert _read(framing.encode({"op": "hello"})) == ({"op": "hello"}, b"")


@pytest.mark.parametrize(
    "lengths",
    [(framing.MAX_HEADER_BYTES + 1, 0), (2, framing.MAX_PAYLOAD_BYTES + 1), (2**32 - 1, 2**32 - 1)],
)
def test_lengths_over_the_limits_are_refused_before_anything_is_read(lengths):
    # nothing follows the lengths: reading the body would fail differently (IncompleteReadError)
    with pytest.raises(framing.FrameError, match="over the limits"):
        _read(struct.pack("<II", *lengths))


def test_a_header_that_is_not_an_object_is_refused():
    body = b"[1, 2]"
    with pytest.raises(framing.FrameError, match="JSON object"):
        _read(struct.pack("<II", len(body), 0) + body)


def test_a_truncated_frame_is_the_end_of_the_stream():
    frame = framing.encode({"op": "infer"}, b"x" * 100)
    with pytest.raises(asyncio.IncompleteReadError):
        _read(frame[:-1])


def test_ranges_are_aligned_first_fit_and_come_back_whole():
    ranges = Ranges(10 * ALIGN)
    a, b, c = ranges.take(1), ranges.take(ALIGN + 1), ranges.take(3 * ALIGN)
    assert (a, b, c) == (0, ALIGN, 3 * ALIGN)
    assert ranges.in_use == 6 * ALIGN
    assert ranges.take(5 * ALIGN) is None  # 4 * ALIGN left
    ranges.give_back(b)  # a hole of 2 * ALIGN between a and c
    assert ranges.take(2 * ALIGN) == ALIGN  # first fit: the hole
    for offset in (a, ALIGN, c):
        ranges.give_back(offset)
    assert ranges.in_use == 0
    assert ranges.take(10 * ALIGN) == 0  # coalesced back into one range


def test_ranges_survive_any_order_of_give_backs():
    rng = np.random.default_rng(0)
    ranges = Ranges(64 * ALIGN)
    held: list[int] = []
    refused = 0
    for _ in range(2000):
        if held and rng.random() < 0.5:
            ranges.give_back(held.pop(int(rng.integers(len(held)))))
            continue
        offset = ranges.take(int(rng.integers(1, 4 * ALIGN)))
        if offset is None:
            refused += 1
        else:
            assert offset % ALIGN == 0 and all(offset != h for h in held)
            held.append(offset)
    assert refused and held  # the slab did fill up on the way
    for offset in held:
        ranges.give_back(offset)
    assert ranges.in_use == 0 and ranges.take(64 * ALIGN) == 0


def test_a_slab_is_shared_by_name_and_gone_from_the_directory_once_unlinked(tmp_path):
    slab = Slab.create("svertka-test", 1 << 16, shm_dir=str(tmp_path))
    other = Slab.attach(slab.name, 1 << 16, shm_dir=str(tmp_path))
    try:
        slab.rows(ALIGN, (2, 3))[:] = [[1, 2, 3], [4, 5, 6]]
        assert other.rows(ALIGN, (2, 3)).tolist() == [[1, 2, 3], [4, 5, 6]]
        slab.unlink(str(tmp_path))
        assert os.listdir(tmp_path) == []
        other.rows(0, (1,))[0] = 9  # the mappings outlive the name
        assert slab.rows(0, (1,))[0] == 9
    finally:
        slab.close()
        other.close()


@pytest.mark.parametrize("offset, shape", [(-ALIGN, (1,)), (1, (1,)), (0, (1 << 14 + 1,)), (1 << 16, (1,))])
def test_rows_outside_the_slab_or_unaligned_are_refused(tmp_path, offset, shape):
    slab = Slab.create("svertka-test", 1 << 16, shm_dir=str(tmp_path))
    try:
        with pytest.raises(SlabError, match="do not fit"):
            slab.rows(offset, shape)
    finally:
        slab.unlink(str(tmp_path))
        slab.close()


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", ".hidden"])
def test_attach_takes_only_a_plain_name(tmp_path, name):
    with pytest.raises(SlabError, match="not a slab name"):
        Slab.attach(name, 4096, shm_dir=str(tmp_path))


def test_attach_refuses_an_object_smaller_than_announced(tmp_path):
    slab = Slab.create("svertka-test", 4096, shm_dir=str(tmp_path))
    try:
        with pytest.raises(SlabError, match="smaller than"):
            Slab.attach(slab.name, 8192, shm_dir=str(tmp_path))
    finally:
        slab.unlink(str(tmp_path))
        slab.close()


def test_a_frontend_that_stops_reading_is_dropped_not_waited_for(monkeypatch):
    """The engine never waits to write to a frontend; past the cap of unread answers it drops it."""
    import socket
    import types

    from service.ipc import engine_server

    monkeypatch.setattr(engine_server, "MAX_UNREAD_BYTES", 1 << 20)

    async def go() -> tuple[int, bool]:
        engine_end, frontend_end = socket.socketpair(socket.AF_UNIX)  # the frontend end never reads
        reader, writer = await asyncio.open_unix_connection(sock=engine_end)
        connection = engine_server._Connection(types.SimpleNamespace(engine=None), reader, writer)
        sent = 0
        while not writer.is_closing() and sent < 10_000:  # no await: send() must never block
            connection.send({"op": "result", "id": sent}, b"\0" * (64 << 10))
            sent += 1
        closing = writer.is_closing()
        writer.close()
        frontend_end.close()
        return sent, closing

    sent, closing = asyncio.run(go())
    assert closing, "still writing to a frontend that reads nothing"
    # dropped once about the cap (plus what the socket's own buffers took) was waiting
    assert 16 < sent < 1000, sent
