"""System shared memory with several frontends: registrations server-wide, descriptors per process.

Triton's extension keeps registrations server-wide: a region registered on one
connection is usable, listed and unregistered on every other. With
``svertka serve --frontends N`` a client's connections land on different
frontend processes (SO_REUSEPORT), so the registrations (``shm.Registrations``:
names, keys, ranges, the cap, the checks) live in the engine process, and
every frontend serves tensor data from descriptors it opened itself
(``shm.OpenRegions``), since the frontend reads inputs from and writes outputs
to the client's regions.

On the engine socket (service/ipc/engine_server.py):

* ``shm_register {id, name, key, offset, byte_size}``,
  ``shm_unregister {id, name}``: answered ``reply {id}`` (or
  ``reply {id, error}``) once every frontend has acknowledged the change, so
  whichever frontend a client's next call lands on knows it;
* ``shm_status {id, name}``: answered ``reply {id, regions: [...]}``;
* ``shm {generation, reset, add: [...], remove: [...]}``, pushed by the engine
  to every frontend on connect (``reset``: the whole list) and after every
  change; a frontend opens the objects it is told about before it answers
  ``shm_ack {generation}``. Its own counter: a change of models waits for the
  frontends' requests on a replaced version, a registration does not.

Each region carries the device and inode of the object the engine checked, and
a frontend opens that object or none (an object deleted and made again under
the same name after registration is refused where a request names it).

A frontend runs the checks that need no state (name, key, byte_size) itself
before forwarding, with the same messages, so that nothing over a region
name's length ever goes to the engine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from service import errors, shm

log = logging.getLogger(__name__)

DISABLED = "system shared memory is disabled on this server (--allow-shared-memory)"
OPS = ("shm_register", "shm_unregister", "shm_status")


def _describe(region: shm.Region) -> dict[str, Any]:
    return {
        "name": region.name,
        "key": region.key,
        "offset": region.offset,
        "byte_size": region.byte_size,
        "device": region.device,
        "inode": region.inode,
    }


def _region(described: dict[str, Any]) -> shm.Region:
    return shm.Region(
        name=str(described["name"]),
        key=str(described["key"]),
        offset=int(described["offset"]),
        byte_size=int(described["byte_size"]),
        device=int(described.get("device", 0)),
        inode=int(described.get("inode", 0)),
    )


class EngineRegistrations:
    """The engine process's side: the server's registrations, and the changes every frontend gets."""

    def __init__(self, registrations: shm.Registrations | None) -> None:
        #: None: the server does not allow shared memory.
        self.registrations = registrations
        #: Counts ``shm`` changes; each frontend acknowledges the ones it has applied.
        self.generation = 0

    @property
    def enabled(self) -> bool:
        return self.registrations is not None

    def snapshot(self) -> dict[str, Any]:
        """The ``shm`` message a frontend gets when it connects: every registration."""
        regions = [] if self.registrations is None else self.registrations.status()
        return self._message(reset=True, add=regions)

    def handle(self, header: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Apply a frontend's ``shm_*`` request: (the fields of its reply, the ``shm`` message to
        push to every frontend or None). Raises ``service.errors`` for the client."""
        if self.registrations is None:
            raise errors.PermissionDenied(DISABLED)
        op, name = header["op"], str(header["name"])
        if op == "shm_register":
            region, fd = self.registrations.register(
                name, str(header["key"]), int(header["offset"]), int(header["byte_size"])
            )
            os.close(fd)  # the object is checked; the frontends open it for themselves
            return {}, self._change(add=[region])
        if op == "shm_unregister":
            gone = self.registrations.unregister(name)
            if not name:
                return {}, self._change(reset=True) if gone else None
            return {}, self._change(remove=[r.name for r in gone]) if gone else None
        if op == "shm_status":
            return {"regions": [_describe(r) for r in self.registrations.status(name)]}, None
        raise ValueError(f"not a shared memory op: {op!r}")

    def _change(
        self, *, reset: bool = False, add: Sequence[shm.Region] = (), remove: Sequence[str] = ()
    ) -> dict[str, Any]:
        self.generation += 1
        return self._message(reset=reset, add=add, remove=remove)

    def _message(
        self, *, reset: bool = False, add: Sequence[shm.Region] = (), remove: Sequence[str] = ()
    ) -> dict[str, Any]:
        return {
            "op": "shm",
            "generation": self.generation,
            "reset": reset,
            "add": [_describe(r) for r in add],
            "remove": list(remove),
        }


class FrontendRegistry:
    """A frontend's system shared memory (``shm.SharedMemory``) when the engine is another process:
    registrations through the engine, tensor data through this process's own descriptors."""

    def __init__(self, call: Callable[[dict[str, Any]], Awaitable[Any]], shm_dir: str = shm.SHM_DIR) -> None:
        self._call = call
        self.opened = shm.OpenRegions(shm_dir)

    def apply(self, header: dict[str, Any]) -> int:
        """Apply an ``shm`` message from the engine (opening what it adds); its generation."""
        if header.get("reset"):
            self.opened.close()
        self.opened.remove(str(name) for name in header.get("remove", ()))
        for described in header.get("add", ()):
            self.opened.add(_region(described))
        return int(header["generation"])

    # -- the extension's calls ------------------------------------------------------
    async def register_region(self, name: str, key: str, offset: int, byte_size: int) -> None:
        shm.check_registration(name, key, byte_size)
        await self._call(
            {"op": "shm_register", "name": name, "key": key, "offset": offset, "byte_size": byte_size}
        )

    async def unregister_region(self, name: str) -> None:
        if name and not shm.is_region_name(name):
            return  # never registered: nothing to forget (and nothing that long goes to the engine)
        await self._call({"op": "shm_unregister", "name": name})

    async def region_status(self, name: str) -> list[shm.Region]:
        if name and not shm.is_region_name(name):
            raise shm.not_registered(name)
        reply = await self._call({"op": "shm_status", "name": name})
        return [_region(r) for r in reply["regions"]]

    # -- data ---------------------------------------------------------------------------
    def check(self, where: shm.Slice, what: str) -> None:
        self.opened.check(where, what)

    def read(self, where: shm.Slice, dtype: str, shape: list[int], what: str) -> np.ndarray:
        return self.opened.read(where, dtype, shape, what)

    def write(self, where: shm.Slice, data: bytes, what: str) -> None:
        self.opened.write(where, data, what)

    def close(self) -> None:
        self.opened.close()
