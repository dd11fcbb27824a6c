"""A gRPC call that never sends its whole request, written as raw HTTP/2 frames.

grpc's own clients always finish a unary request message, so a client that
sends a call's headers and only the first bytes of its message (a stalled or
hostile client, or one cut off mid-upload) is made here by hand: the
connection preface, SETTINGS, one HEADERS frame (HPACK literals, no Huffman
coding, no dynamic table) and one DATA frame without END_STREAM. A reader
thread acknowledges the server's SETTINGS and PINGs so the connection stays
healthy, and records every frame it receives.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: str, value: str) -> bytes:
    """HPACK "literal header field without indexing, new name", lengths < 127, no Huffman."""
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


class HalfOpenCall:
    """Stream 1: ``path``'s headers and ``sent`` bytes of a message announced as ``declared`` bytes."""

    def __init__(self, port: int, path: str, *, declared: int = 1000, sent: int = 10) -> None:
        self.frames: list[tuple[int, int, int, bytes]] = []  # (type, flags, stream, payload)
        self.closed = threading.Event()
        self._changed = threading.Condition()
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        headers = b"".join(
            _literal(k, v)
            for k, v in (
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", f"127.0.0.1:{port}"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            )
        )
        message = b"\x00" + struct.pack(">I", declared) + b"\x00" * sent
        self._sock.sendall(
            PREFACE
            + frame(SETTINGS, 0, 0)
            + frame(HEADERS, END_HEADERS, 1, headers)
            + frame(DATA, 0, 1, message)
            # The server answers PINGs in order, after the frames above have been read.
            + frame(PING, 0, 0, b"halfopen")
        )
        self._reader = threading.Thread(target=self._read, name="rawh2-reader", daemon=True)
        self._reader.start()

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _read(self) -> None:
        try:
            while True:
                head = self._recv(9)
                length = int.from_bytes(head[:3], "big")
                kind, flags = head[3], head[4]
                stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = self._recv(length)
                if kind == SETTINGS and not flags & ACK:
                    self._sock.sendall(frame(SETTINGS, ACK, 0))
                elif kind == PING and not flags & ACK:
                    self._sock.sendall(frame(PING, ACK, 0, payload))
                with self._changed:
                    self.frames.append((kind, flags, stream, payload))
                    self._changed.notify_all()
        except (EOFError, OSError):
            pass
        finally:
            self.closed.set()
            with self._changed:
                self._changed.notify_all()

    def wait_for(self, predicate, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(self.frames):
                left = deadline - time.monotonic()
                if left <= 0 or self.closed.is_set():
                    return predicate(self.frames)
                self._changed.wait(left)
            return True

    def wait_received(self, timeout_s: float = 30.0) -> bool:
        """The server has read the call's frames (it acknowledged the PING sent after them)."""
        return self.wait_for(
            lambda fs: any(k == PING and f & ACK and p == b"halfopen" for k, f, _s, p in fs), timeout_s
        )

    def grpc_status(self) -> int | None:
        """The grpc-status the server ended stream 1 with (None: none seen).

        Read from the trailers' HPACK block as a plain literal, which is how grpc
        core writes it; a Huffman-coded or indexed form would read as None.
        """
        for kind, _flags, stream, payload in self.frames:
            if kind == HEADERS and stream == 1:
                at = payload.find(b"grpc-status")
                if at >= 0:
                    size = payload[at + 11]
                    value = payload[at + 12 : at + 12 + size]
                    if not size & 0x80 and value.isdigit():
                        return int(value)
        return None

    def reset_codes(self) -> list[int]:
        return [int.from_bytes(p[:4], "big") for k, _f, s, p in self.frames if k == RST_STREAM and s == 1]

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
