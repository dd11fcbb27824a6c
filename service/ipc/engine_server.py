"""The engine process's side of the socket: one connection per frontend, requests into the batcher.

Messages from a frontend (``op``):

* ``hello {frontend, slab, size}``: first; the engine maps the frontend's slab.
* ``infer {id, model, version, offset, shape, deadline}``: the rows at
  ``offset`` of the slab go to that model's ``infer_tensor``; the answer is
  ``result {id, shape, timings}`` with the logits as payload, or
  ``result {id, error: {type, message}}`` (a ``service.errors`` class name).
* ``cancel {id}``: the caller went away; queued rows are dropped before
  compute. The ``result`` still comes (the frontend frees the rows on it).
* ``outcome {...}``: a finished request, for the Triton-style statistics,
  which the engine owns for every process.
* ``stats {id}``, ``load {id, name}``, ``unload {id, name}``: answered with
  ``reply {id, ...}``.
* ``shm_register``, ``shm_unregister``, ``shm_status``: the system shared
  memory extension, whose registrations the engine keeps for every frontend
  (service/ipc/shared_memory.py); answered with ``reply {id, ...}``, a change
  once every frontend has acknowledged it (``shm_ack {generation}``).

The engine pushes ``models {started, models}`` on connect and after every
change of a model's state: what a frontend needs to resolve names and
versions, preprocess images and report metadata on its own; and, with
``--allow-shared-memory``, ``shm {generation, ...}`` on connect and after
every registration or unregistration.

A frontend that stops reading its answers cannot stall the engine: when more
than ``MAX_UNREAD_BYTES`` of answers wait to be written to it, its connection
is dropped (its requests are cancelled; the supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

from service import errors, shm
from service.engine.interface import ModelStatus, Timings
from service.engine.repository import ModelRepository
from service.engine.served_model import ServedModel
from service.ipc import framing
from service.ipc.shared_memory import OPS as SHM_OPS
from service.ipc.shared_memory import EngineRegistrations
from service.ipc.slab import Slab

log = logging.getLogger(__name__)

#: Answers queued for one frontend before it is taken for stuck and disconnected.
MAX_UNREAD_BYTES = 64 << 20
#: How long a change waits for the frontends to acknowledge it.
SYNC_TIMEOUT_S = 5.0


def describe_models(engine: ModelRepository, started: bool, generation: int) -> dict[str, Any]:
    """The ``models`` message: every model's state, versions and (when serving) what it serves."""
    models = []
    for name, entry in sorted(engine.entries().items()):
        served = entry.serving
        models.append(
            {
                "name": name,
                "status": dataclasses.asdict(entry.status),
                "versions": list(entry.versions),
                "serving": None if served is None else describe_served(served),
            }
        )
    return {"op": "models", "started": started, "generation": generation, "models": models}


def describe_served(served: ServedModel) -> dict[str, Any]:
    settings = dataclasses.asdict(served.settings)
    return {
        "version": served.version,
        "meta": dataclasses.asdict(served.meta),  # every field (a file's props lack some)
        "settings": settings,
        "provider": served.provider,
        "instances": served.instances,
        "sha256": served.sha256,
        "max_decoded_pixels": served.max_decoded_pixels,
        "path": str(served.path) if served.path is not None else None,
    }


def stats_message(name: str, version: int, snap: Any) -> dict[str, Any]:
    def pair(d) -> list[int]:
        return [d.count, d.ns]

    return {
        "name": name,
        "version": version,
        "last_inference_ms": snap.last_inference_ms,
        "inference_count": snap.inference_count,
        "execution_count": snap.execution_count,
        **{k: pair(getattr(snap, k)) for k in STAT_DURATIONS},
        "batch_stats": {str(size): [pair(d) for d in ds] for size, ds in snap.batch_stats.items()},
    }


STAT_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


class EngineServer:
    """Serves one engine (a ModelRepository) to frontend processes on a Unix socket."""

    def __init__(
        self, engine: ModelRepository, socket_path: Path, shared_memory: shm.Registrations | None = None
    ) -> None:
        self.engine = engine
        self.socket_path = Path(socket_path)
        #: The server's system shared memory registrations (None: not allowed).
        self.shared_memory = EngineRegistrations(shared_memory)
        self.started = False
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        #: Counts ``models`` messages; each frontend acknowledges the ones it has applied.
        self.generation = 0
        self._acked = asyncio.Condition()
        engine.add_listener(self._on_change)
        engine.before_retire = self.synced

    async def start(self) -> None:
        """Listen (before the models load: frontends connect and wait for ``started``)."""
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path))

    def models_loaded(self) -> None:
        self.started = True
        self._on_change(None)

    def _on_change(self, _status: ModelStatus | None) -> None:
        self.generation += 1
        for connection in list(self._connections):
            connection.push_models()

    async def synced(self, timeout_s: float | None = None) -> None:
        """Return once every connected frontend has applied the latest ``models`` message.

        The engine waits for this before a replaced version stops accepting requests, and
        before answering a load or unload: a frontend then never names a version the engine
        no longer serves, and never misses one a client has been told about. A frontend that
        does not answer within ``SYNC_TIMEOUT_S`` is not waited for longer.
        """
        wanted = self.generation
        await self._until_acked(lambda c: c.acked >= wanted, timeout_s)

    async def synced_shared_memory(self, timeout_s: float | None = None) -> None:
        """Return once every connected frontend has applied the latest ``shm`` message: a
        registration is then known wherever the client calls next.

        Applying one takes a frontend no longer than opening a few files without waiting, so a
        frontend that has not acknowledged it within ``SYNC_TIMEOUT_S`` is stuck: it is
        disconnected (and so restarted), never left serving without the change.
        """
        wanted = self.shared_memory.generation
        await self._until_acked(lambda c: c.shm_acked >= wanted, timeout_s)
        for connection in list(self._connections):
            if connection.ready and connection.shm_acked < wanted:
                log.error(
                    "frontend %s did not apply a shared memory registration change; disconnecting it",
                    connection.frontend,
                )
                connection.drop()
                self._connections.discard(connection)

    def push_shared_memory(self, message: dict[str, Any]) -> None:
        for connection in list(self._connections):
            if connection.ready:
                connection.send(message)

    async def _until_acked(self, applied, timeout_s: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SYNC_TIMEOUT_S if timeout_s is None else timeout_s):
                async with self._acked:
                    await self._acked.wait_for(lambda: all(applied(c) for c in self._connections if c.ready))

    async def acknowledged(self) -> None:
        async with self._acked:
            self._acked.notify_all()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.drop()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(self, reader, writer)
        self._connections.add(connection)
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)


class _Connection:
    """One frontend: its slab, its requests in flight, its answers."""

    def __init__(self, server: EngineServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.engine = server.engine
        self.reader = reader
        self.writer = writer
        self.slab: Slab | None = None
        self.frontend = "?"
        self.tasks: dict[int, asyncio.Task] = {}
        self.ready = False
        self.acked = 0
        self.shm_acked = 0

    def send(self, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
        if self.writer.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() > MAX_UNREAD_BYTES:
            log.error("frontend %s does not read its answers; disconnecting it", self.frontend)
            self.drop()
            return
        self.writer.write(framing.encode(header, payload))

    def push_models(self) -> None:
        if self.ready:
            self.send(describe_models(self.engine, self.server.started, self.server.generation))

    def drop(self) -> None:
        self.writer.close()

    async def run(self) -> None:
        try:
            header, _ = await framing.read(self.reader)
            if header.get("op") != "hello":
                raise framing.FrameError("the first message must be hello")
            self.frontend = str(header.get("frontend", "?"))
            self.slab = Slab.attach(str(header["slab"]), int(header["size"]))
            self.ready = True
            self.send({"op": "hello"})
            self.push_models()
            if self.server.shared_memory.enabled:
                self.send(self.server.shared_memory.snapshot())
            log.info("frontend %s connected (slab %d MiB)", self.frontend, self.slab.size >> 20)
            while True:
                header, _ = await framing.read(self.reader)
                self._dispatch(header)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if not isinstance(exc, asyncio.IncompleteReadError):
                log.warning("frontend %s: %s", self.frontend, exc)
        finally:
            # The frontend is gone: its queued rows are dropped, running batches finish first, and
            # only then is its slab unmapped (a batch may still be reading it).
            for task in self.tasks.values():
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            if self.slab is not None:
                self.slab.close()
            self.writer.close()
            log.info("frontend %s disconnected", self.frontend)

    def _dispatch(self, header: dict[str, Any]) -> None:
        op = header.get("op")
        if op == "cancel":
            task = self.tasks.get(int(header["id"]))
            if task is not None:
                task.cancel()
            return
        if op == "outcome":
            self._record_outcome(header)
            return
        if op == "ack":
            self.acked = max(self.acked, int(header["generation"]))
            asyncio.get_running_loop().create_task(self.server.acknowledged())
            return
        if op == "shm_ack":
            self.shm_acked = max(self.shm_acked, int(header["generation"]))
            asyncio.get_running_loop().create_task(self.server.acknowledged())
            return
        handler = {
            "infer": self._infer,
            "stats": self._stats,
            "load": self._load,
            "unload": self._unload,
            **dict.fromkeys(SHM_OPS, self._shared_memory),
        }.get(op)
        if handler is None:
            raise framing.FrameError(f"unknown op {op!r}")
        rid = int(header["id"])
        task = asyncio.get_running_loop().create_task(handler(rid, header))
        self.tasks[rid] = task
        task.add_done_callback(lambda _t, rid=rid: self.tasks.pop(rid, None))

    async def _infer(self, rid: int, header: dict[str, Any]) -> None:
        timings = Timings()
        try:
            model = self.engine.live(str(header["model"]), int(header["version"]), str(header["sha256"]))
            rows = self.slab.rows(
                int(header["offset"]), tuple(int(d) for d in header["shape"]), model.meta.input_dtype
            )
            deadline = header.get("deadline")
            logits = await model.infer_tensor(rows, deadline=deadline, timings=timings)
        except asyncio.CancelledError:
            self.send({"op": "result", "id": rid, "error": {"type": "Cancelled", "message": "cancelled"}})
            return
        except Exception as exc:
            self._failed("result", rid, exc, "request")
            return
        self.send(
            {"op": "result", "id": rid, "shape": list(logits.shape), "timings": dataclasses.asdict(timings)},
            memoryview(logits.astype("<f4", copy=False)).cast("B"),
        )

    def _record_outcome(self, header: dict[str, Any]) -> None:
        try:
            recorder = self.engine.metrics.model(str(header["model"]), int(header["version"]))
            recorder.request(
                api=str(header["api"]),
                code=str(header["code"]),
                duration_s=_finite(header["duration_s"]),
                queue_s=_finite(header.get("queue_s", 0.0)),
                compute_s=_finite(header.get("compute_s", 0.0)),
                compute_input_s=_finite(header.get("compute_input_s", 0.0)),
                compute_output_s=_finite(header.get("compute_output_s", 0.0)),
                series=False,
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("frontend %s: bad outcome message (%s)", self.frontend, exc)

    async def _stats(self, rid: int, header: dict[str, Any]) -> None:
        models = []
        for served in self.engine.served():
            models.append(stats_message(served.name, served.version, await served.statistics()))
        self.send({"op": "reply", "id": rid, "models": models})

    async def _load(self, rid: int, header: dict[str, Any]) -> None:
        await self._control(rid, self.engine.load(str(header["name"])))

    async def _unload(self, rid: int, header: dict[str, Any]) -> None:
        await self._control(rid, self.engine.unload(str(header["name"])))

    async def _shared_memory(self, rid: int, header: dict[str, Any]) -> None:
        try:
            answer, change = self.server.shared_memory.handle(header)
        except Exception as exc:
            self._failed("reply", rid, exc, "shared memory request")
            return
        if change is not None:
            self.server.push_shared_memory(change)
            await self.server.synced_shared_memory()
        self.send({"op": "reply", "id": rid, **answer})

    def _failed(self, op: str, rid: int, exc: Exception, what: str) -> None:
        """Answer request ``rid`` with its error: a ``service.errors`` class name and message for
        the client, or (anything else, logged here with its traceback) an internal error."""
        if isinstance(exc, errors.SvertkaError):
            error = {"type": type(exc).__name__, "message": exc.message}
        else:
            log.error("frontend %s: %s %d failed in the engine", self.frontend, what, rid, exc_info=exc)
            error = {"type": "InferenceFailed", "message": "internal error"}
        self.send({"op": op, "id": rid, "error": error})

    async def _control(self, rid: int, work) -> None:
        try:
            status = await work
        except errors.SvertkaError as exc:
            self._failed("reply", rid, exc, "control request")
            return
        await self.server.synced()
        self.send(
            {"op": "reply", "id": rid, "status": None if status is None else dataclasses.asdict(status)}
        )


def _finite(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"expected a finite duration, got {value!r}")
    return number
