"""Messages on the frontend <-> engine socket: a JSON header and an optional binary payload.

A frame is ``<u32 header length><u32 payload length><header JSON><payload>``,
little-endian. Both lengths are checked against fixed limits before anything
is read or allocated, so a broken peer cannot make the other side allocate
more than ``MAX_PAYLOAD_BYTES``.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

_LENGTHS = struct.Struct("<II")
#: A control message is small (a model name, a slot, a shape, timings, a status list).
MAX_HEADER_BYTES = 4 << 20
#: The largest payload: logits of a request (rows x classes x 4 bytes), far below this.
MAX_PAYLOAD_BYTES = 256 << 20


class FrameError(ConnectionError):
    """The peer sent something that is not a frame (the connection is unusable)."""


def encode(header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
    body = json.dumps(header, separators=(",", ":")).encode()
    return _LENGTHS.pack(len(body), len(payload)) + body + bytes(payload)


async def read(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    """The next frame; IncompleteReadError at a clean end of stream."""
    head = await reader.readexactly(_LENGTHS.size)
    header_len, payload_len = _LENGTHS.unpack(head)
    if header_len > MAX_HEADER_BYTES or payload_len > MAX_PAYLOAD_BYTES:
        raise FrameError(f"frame of {header_len} + {payload_len} bytes is over the limits")
    header = json.loads(await reader.readexactly(header_len))
    payload = await reader.readexactly(payload_len) if payload_len else b""
    if not isinstance(header, dict):
        raise FrameError("a frame's header must be a JSON object")
    return header, payload
