"""A frontend's engine when the engine is another process: the ``Engine`` interface over the socket.

:class:`EngineClient` keeps the engine's last ``models`` message, so
resolving a name and version (``get``) is local and immediate, with the same
rule and messages as in one process (``interface.resolve``). A
:class:`RemoteModel` writes a request's rows into the frontend's slab and
awaits the engine's answer; images are decoded here, in the frontend, straight
into slab rows. A range of the slab is given back only when the engine has
answered for it, also when the caller went away (the engine may be reading
it in a batch).

If the engine goes away, every model turns UNAVAILABLE (health follows),
every request waiting for it fails UNAVAILABLE, and ``lost`` is set so the
frontend process can stop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service import config, errors, layout, modelmeta
from service.engine import interface
from service.engine.interface import UNAVAILABLE, ModelStatus, Timings
from service.ipc import framing
from service.ipc.shared_memory import FrontendRegistry
from service.ipc.slab import Ranges, Slab
from service.model_recorder import Duration, StatsSnapshot
from service.preprocess import Preprocessor

log = logging.getLogger(__name__)

ENGINE_GONE = "the engine process is not running; retry on another replica"
#: How long a frontend waits for the engine process's socket to appear.
CONNECT_TIMEOUT_S = 60.0


@dataclasses.dataclass
class _Entry:
    status: ModelStatus
    versions: list[int]
    serving: RemoteModel | None


class EngineClient:
    """The ``Engine`` a frontend process serves from: the engine process, over one connection."""

    def __init__(
        self,
        socket_path: Path,
        *,
        frontend: str,
        slab_bytes: int,
        decode_threads: int,
        metrics: Any,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.frontend = frontend
        self.slab_bytes = int(slab_bytes)
        self.metrics = metrics
        self.decode_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, decode_threads), thread_name_prefix="svertka-decode"
        )
        self._connect_timeout_s = connect_timeout_s
        self.lost = asyncio.Event()
        self._entries: dict[str, _Entry] = {}
        self._listeners: list[Callable[[ModelStatus], None]] = []
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._started = asyncio.Event()
        self._acks: set[asyncio.Task] = set()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task | None = None
        self.slab: Slab | None = None
        self.ranges = Ranges(self.slab_bytes)
        #: System shared memory: the registrations are the engine's, the descriptors this process's.
        self.shared_memory = FrontendRegistry(self.call)

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, share the slab, and wait until the engine has loaded its models."""
        self.slab = Slab.create("svertka-frontend", self.slab_bytes)
        try:
            self._reader, self._writer = await self._connect()
            self._send(
                {"op": "hello", "frontend": self.frontend, "slab": self.slab.name, "size": self.slab_bytes}
            )
            header, _ = await framing.read(self._reader)
            if header.get("op") != "hello":
                raise framing.FrameError(f"expected hello from the engine, got {header.get('op')!r}")
        finally:
            self.slab.unlink()  # mapped by both now (or by nobody): nothing stays in /dev/shm
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop(), name="engine-client")
        await self._started.wait()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The engine process starts at the same time: wait for its socket (up to the timeout)."""
        deadline = time.monotonic() + self._connect_timeout_s
        while True:
            try:
                return await asyncio.open_unix_connection(str(self.socket_path))
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise ConnectionError(
                        f"no engine process at {self.socket_path} after {self._connect_timeout_s:g} s"
                    ) from None
                await asyncio.sleep(0.05)

    async def drain(self, timeout_s: float) -> None:
        """Wait (up to ``timeout_s``) for this frontend's requests to the engine to be answered."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._pending:
                    await asyncio.gather(*list(self._pending.values()), return_exceptions=True)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._read_task is not None:
            self._read_task.cancel()
            await asyncio.gather(self._read_task, return_exceptions=True)
        self._engine_gone()
        self.decode_executor.shutdown(wait=False)
        if self.slab is not None:
            self.slab.close()

    # -- the Engine interface -----------------------------------------------------------
    def get(self, name: str, version: int | str | None = None) -> RemoteModel:
        if not layout.is_valid_name(name):
            raise errors.ModelNotFound(
                f"invalid model name {errors.shown(name)}: expected {layout.NAME_RULE}"
            )
        wanted = None
        if version is not None and version != "":
            wanted = version if layout.is_version(version) else layout.parse_version(str(version))
            if wanted is None:
                raise errors.ModelNotFound(
                    f"model '{name}' has no version {errors.shown(version)} (a version is {layout.VERSION_RULE})"
                )
        return interface.resolve(self._entries, name, wanted)

    def status(self, name: str) -> ModelStatus:
        entry = self._entries.get(name)
        if entry is None:
            raise errors.ModelNotFound(f"model '{name}' is not in the repository")
        return entry.status

    def statuses(self) -> list[ModelStatus]:
        return [self._entries[name].status for name in sorted(self._entries)]

    def served(self) -> list[RemoteModel]:
        return [e.serving for _, e in sorted(self._entries.items()) if e.serving is not None]

    def add_listener(self, callback: Callable[[ModelStatus], None]) -> None:
        self._listeners.append(callback)

    async def load(self, name: str) -> ModelStatus:
        reply = await self.call({"op": "load", "name": name})
        return ModelStatus(**reply["status"])

    async def unload(self, name: str) -> None:
        await self.call({"op": "unload", "name": name})

    async def statistics(self) -> dict[tuple[str, int], StatsSnapshot]:
        reply = await self.call({"op": "stats"})
        return {(m["name"], int(m["version"])): _snapshot(m) for m in reply["models"]}

    # -- the connection -----------------------------------------------------------------
    def _send(self, header: dict[str, Any]) -> None:
        if self._writer is None or self._writer.is_closing():
            raise errors.Draining(ENGINE_GONE)
        self._writer.write(framing.encode(header))

    def send_outcome(self, outcome: dict[str, Any]) -> None:
        """A finished request, for the engine's Triton-style statistics (no answer)."""
        with contextlib.suppress(errors.Draining):
            self._send({"op": "outcome", **outcome})

    def submit(self, header: dict[str, Any]) -> tuple[int, asyncio.Future]:
        """Send a request; its id and the future of its answer (``result``: (header, payload);
        ``reply``: header; a ``service.errors`` exception for an error)."""
        rid = next(self._ids)
        self._send({**header, "id": rid})
        future = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        return rid, future

    async def call(self, header: dict[str, Any]) -> Any:
        _, future = self.submit(header)
        return await future

    def cancel(self, rid: int) -> None:
        with contextlib.suppress(errors.Draining):
            self._send({"op": "cancel", "id": rid})

    async def _read_loop(self) -> None:
        try:
            while True:
                header, payload = await framing.read(self._reader)
                op = header.get("op")
                if op == "models":
                    replaced = self._update(header)
                    acking = asyncio.get_running_loop().create_task(
                        self._ack(int(header["generation"]), replaced)
                    )
                    self._acks.add(acking)
                    acking.add_done_callback(self._acks.discard)
                elif op == "shm":
                    generation = self.shared_memory.apply(header)
                    with contextlib.suppress(errors.Draining):
                        self._send({"op": "shm_ack", "generation": generation})
                elif op in ("result", "reply"):
                    future = self._pending.pop(int(header["id"]), None)
                    if future is not None and not future.done():
                        error = header.get("error")
                        if error is not None:
                            future.set_exception(_error(error))
                        else:
                            future.set_result((header, payload) if op == "result" else header)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if not isinstance(exc, asyncio.IncompleteReadError):
                log.error("engine connection failed: %s", exc)
        finally:
            self._engine_gone()

    def _engine_gone(self) -> None:
        if self.lost.is_set():
            return
        self.lost.set()
        self._started.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(errors.Draining(ENGINE_GONE))
        self._pending.clear()
        for entry in self._entries.values():
            entry.serving = None
            self._set_status(
                entry, ModelStatus(entry.status.name, entry.status.version, UNAVAILABLE, ENGINE_GONE)
            )

    async def _ack(self, generation: int, replaced: list[RemoteModel]) -> None:
        """Tell the engine this frontend has applied ``generation`` and will not name a version it
        replaced again: once no request that resolved a replaced version is still preparing its
        rows (decoding images) before sending them."""
        for model in replaced:
            await model.prepared()
        with contextlib.suppress(errors.Draining):
            self._send({"op": "ack", "generation": generation})

    def _update(self, header: dict[str, Any]) -> list[RemoteModel]:
        """Apply a ``models`` message; the models it replaced or removed."""
        replaced: list[RemoteModel] = []
        seen = set()
        for m in header["models"]:
            name = m["name"]
            seen.add(name)
            entry = self._entries.get(name)
            status = ModelStatus(**m["status"])
            serving = m["serving"]
            if entry is None:
                entry = self._entries[name] = _Entry(status, [], None)
            entry.versions = [int(v) for v in m["versions"]]
            old = entry.serving
            if serving is None:
                entry.serving = None
            elif old is None or not old.describes(serving):
                entry.serving = RemoteModel(self, name, serving)
            if old is not None and entry.serving is not old:
                replaced.append(old)
            self._set_status(entry, status)
        for name in set(self._entries) - seen:
            gone = self._entries.pop(name)
            if gone.serving is not None:
                replaced.append(gone.serving)
        if header.get("started"):
            self._started.set()
        return replaced

    def _set_status(self, entry: _Entry, status: ModelStatus) -> None:
        changed = entry.status != status
        entry.status = status
        if changed:
            for callback in list(self._listeners):
                try:
                    callback(status)
                except Exception:
                    log.exception("model status listener %r failed", callback)


class RemoteModel:
    """One model version served by the engine process (the ``Model`` interface)."""

    def __init__(self, client: EngineClient, name: str, described: dict[str, Any]) -> None:
        self._client = client
        self._described = described
        self.name = name
        self.version = int(described["version"])
        self.meta = modelmeta.ModelMeta(**described["meta"])
        self.settings = config.ModelSettings.from_mapping(described["settings"])
        self.provider = str(described["provider"])
        self.instances = int(described["instances"])
        self.sha256 = str(described["sha256"])
        self.max_decoded_pixels = int(described["max_decoded_pixels"])
        self.path = None if described.get("path") is None else Path(described["path"])
        self.label = f"model '{name}' version {self.version}"
        self._preprocessor: Preprocessor | None = None
        #: Requests that resolved this version and are preparing their rows (decoding), not sent yet.
        self._preparing = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def describes(self, described: dict[str, Any]) -> bool:
        return described == self._described

    async def prepared(self) -> None:
        """Return once no request that resolved this version is still preparing its rows."""
        await self._idle.wait()

    @contextlib.contextmanager
    def _preparing_rows(self):
        self._preparing += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._preparing -= 1
            if not self._preparing:
                self._idle.set()

    @property
    def preprocessor(self) -> Preprocessor:
        if self._preprocessor is None:
            self._preprocessor = Preprocessor(
                self.meta,
                max_pixels=self.settings.max_image_pixels,
                max_decoded_pixels=self.max_decoded_pixels,
            )
        return self._preprocessor

    def top_k(self, logits_row: np.ndarray, k: int) -> list[tuple[int, str, float]]:
        return interface.top_k(self.meta, logits_row, k)

    async def statistics(self) -> StatsSnapshot:
        snapshots = await self._client.statistics()
        try:
            return snapshots[(self.name, self.version)]
        except KeyError:
            raise errors.ModelNotReady(
                f"{self.label} has been replaced or unloaded; retry the request"
            ) from None

    # -- inference ---------------------------------------------------------------------
    def _take(self, rows: int) -> int:
        row_bytes = int(np.prod(self.meta.input_shape)) * self.meta.input_itemsize
        nbytes = rows * row_bytes
        if nbytes > self._client.slab_bytes:  # would never fit: retrying cannot help
            raise errors.InvalidInput(
                f"{self.label}: {rows} rows are {nbytes >> 10} KiB, more than this server's shared "
                f"memory per frontend ({self._client.slab_bytes >> 10} KiB, --frontend-shm-mib); "
                f"send at most {self._client.slab_bytes // row_bytes} rows per request"
            )
        offset = self._client.ranges.take(nbytes)
        if offset is None:
            raise errors.Overloaded(
                f"{self.label}: this frontend's shared memory is full "
                f"({self._client.slab_bytes >> 20} MiB of requests in flight); retry with backoff"
            )
        return offset

    def _submit(self, offset: int, rows: int, deadline: float | None) -> tuple[int, asyncio.Future]:
        """Send the ``rows`` at ``offset`` to the engine; the range is given back once it answered."""
        client = self._client
        header = {
            "op": "infer",
            "model": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "offset": offset,
            "shape": [rows, *self.meta.input_shape],
            "deadline": deadline,
        }
        rid, future = client.submit(header)  # if this raises, the caller still holds the range
        future.add_done_callback(lambda done: _answered(client.ranges, offset, done))
        return rid, future

    async def _answer(self, submitted: tuple[int, asyncio.Future], timings: Timings) -> np.ndarray:
        """The logits the engine answers with; cancelling tells the engine to drop the request."""
        rid, future = submitted
        try:
            answer, payload = await asyncio.shield(future)
        except asyncio.CancelledError:
            if not future.done():
                self._client.cancel(rid)  # the range comes back with the engine's answer
            raise
        got = answer["timings"]
        timings.queue_s = max(timings.queue_s, float(got["queue_s"]))
        timings.compute_input_s += float(got["compute_input_s"])
        timings.compute_infer_s += float(got["compute_infer_s"])
        timings.compute_output_s += float(got["compute_output_s"])
        return np.frombuffer(payload, "<f4").reshape(answer["shape"])

    async def infer_tensor(
        self, batch: np.ndarray, *, deadline: float | None = None, timings: Timings | None = None
    ) -> np.ndarray:
        timings = timings if timings is not None else Timings()
        name = self.meta.input_name
        if not isinstance(batch, np.ndarray) or batch.dtype != np.dtype(self.meta.input_dtype):
            raise errors.InvalidInput(f"input '{name}': expected {self.meta.input_datatype} data")
        shown = "[" + ",".join(str(d) for d in batch.shape) + "]"
        interface.check_input_shape(self.meta, batch.shape, shown)
        interface.check_rows(name, batch.shape[0], self.settings.max_rows_per_request, shown)
        offset = self._take(batch.shape[0])
        try:
            self._client.slab.rows(offset, batch.shape, self.meta.input_dtype)[...] = batch
            # No await between resolving this version and sending: the engine still takes it.
            submitted = self._submit(offset, batch.shape[0], deadline)
        except BaseException:
            self._client.ranges.give_back(offset)
            raise
        return await self._answer(submitted, timings)

    async def infer_images(
        self, images: Sequence[bytes], *, deadline: float | None = None, timings: Timings | None = None
    ) -> list[np.ndarray | errors.SvertkaError]:
        timings = timings if timings is not None else Timings()
        interface.check_images_allowed(self.meta, self.label)
        n = len(images)
        interface.check_rows(self.meta.input_name, n, self.settings.max_rows_per_request)
        recorder = self._client.metrics.model(self.name, self.version)
        if deadline is not None and deadline <= time.monotonic():
            recorder.rejected("deadline")
            raise errors.DeadlineExceeded(f"{self.label}: the deadline passed before decoding started")
        offset = self._take(n)  # all or nothing, before any decoding: an overloaded frontend refuses at once
        try:
            # While the images decode, this version is what the request resolved: the engine keeps
            # taking it until this frontend acknowledges a change (see EngineClient._ack).
            with self._preparing_rows():
                out, good = await self._decode_into(offset, images, recorder, timings)
                submitted = self._submit(offset, good, deadline) if good else None
        except BaseException:
            self._client.ranges.give_back(offset)
            raise
        if submitted is None:
            self._client.ranges.give_back(offset)
            return out  # type: ignore[return-value]
        logits = iter(await self._answer(submitted, timings))
        return [next(logits) if item is None else item for item in out]

    async def _decode_into(
        self, offset: int, images: Sequence[bytes], recorder: Any, timings: Timings
    ) -> tuple[list[errors.SvertkaError | None], int]:
        """Decode every image, the good ones into consecutive slab rows at ``offset``: (one
        InvalidInput or None per image, how many rows were written)."""
        loop = asyncio.get_running_loop()
        slab_rows = self._client.slab.rows(
            offset, (len(images), *self.meta.input_shape), self.meta.input_dtype
        )
        decoded = await asyncio.gather(
            *(loop.run_in_executor(self._client.decode_executor, self._decode, data) for data in images),
            return_exceptions=True,
        )
        out: list[errors.SvertkaError | None] = []
        good = 0
        for result in decoded:
            if isinstance(result, errors.InvalidInput):
                recorder.rejected("invalid_input")
                out.append(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                x, seconds = result
                recorder.preprocess(seconds)
                timings.preprocess_s += seconds
                slab_rows[good] = x
                good += 1
                out.append(None)
        return out, good

    def _decode(self, data: bytes) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        x = self.preprocessor(data)
        return x, time.perf_counter() - start


def _answered(ranges: Ranges, offset: int, future: asyncio.Future) -> None:
    """The engine answered (or is gone): the rows' range is free; a failure nobody awaits is read."""
    ranges.give_back(offset)
    if not future.cancelled():
        future.exception()


def _error(error: dict[str, Any]) -> errors.SvertkaError:
    cls = getattr(errors, str(error.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.SvertkaError)):
        cls = errors.InferenceFailed
    return cls(str(error.get("message", "")))


def _snapshot(m: dict[str, Any]) -> StatsSnapshot:
    def duration(pair: list[int]) -> Duration:
        return Duration(int(pair[0]), int(pair[1]))

    return StatsSnapshot(
        last_inference_ms=int(m["last_inference_ms"]),
        inference_count=int(m["inference_count"]),
        execution_count=int(m["execution_count"]),
        success=duration(m["success"]),
        fail=duration(m["fail"]),
        queue=duration(m["queue"]),
        compute_input=duration(m["compute_input"]),
        compute_infer=duration(m["compute_infer"]),
        compute_output=duration(m["compute_output"]),
        batch_stats={int(k): tuple(duration(p) for p in v) for k, v in m["batch_stats"].items()},
    )
