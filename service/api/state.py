"""Whether the server takes inference calls: set by the server's lifecycle, read by the servicers."""

from __future__ import annotations

import asyncio

from service import errors


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
