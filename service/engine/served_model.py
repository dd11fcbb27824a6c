"""One loaded (name, version) of a model: the inference entry points a frontend calls, and its lifecycle.

Everything runs on one event loop; blocking work leaves it through two
seams: image decoding (the repository's decode pool) and onnxruntime runs (one
thread per model instance, inside the batcher).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service import config, errors, modelmeta
from service.engine import interface, runtime
from service.engine.batching import Batcher, BatchInfo, Hooks, Reservation, Result
from service.engine.interface import Timings
from service.preprocess import Preprocessor

if TYPE_CHECKING:  # metrics imports prometheus_client; the engine only needs its interface
    from service.model_recorder import ModelRecorder, StatsSnapshot

log = logging.getLogger(__name__)

#: Tensors up to this many elements are checked for NaN/Inf on the event loop: 2**20 floats take
#: about 0.4 ms (np.isfinite(x).all(): 65 us for one 3x224x224 image, 3.9 ms for 32 of them).
INLINE_CHECK_ELEMENTS = 1 << 20


class ServedModel:
    """One loaded (name, version): validation, decoding, batching and top-k for request handlers."""

    def __init__(
        self,
        name: str,
        version: int,
        meta: modelmeta.ModelMeta,
        settings: config.ModelSettings,
        sessions: list[runtime.Session],
        recorder: ModelRecorder,
        *,
        decode_executor: concurrent.futures.Executor,
        path: Path | None = None,
        sha256: str = "",
    ) -> None:
        self.name = name
        self.version = int(version)
        self.meta = meta
        self.settings = settings
        #: The engine's own recording point (batches, queue, rejections); not for frontends.
        self._recorder = recorder
        #: The first hex digits of model.onnx's sha256 at load: which weights answer under this version.
        self.sha256 = sha256
        # Exported so the queue-saturation alert and dashboard can compare depth with capacity.
        recorder.set_queue_capacity(settings.max_queue_size)
        self.path = path
        try:
            self.provider = sessions[0].provider
            self.instances = len(sessions)
            self.threads_per_instance = sessions[0].threads
            self._sessions = sessions
            self._decode_executor = decode_executor
            self.preprocessor = Preprocessor(
                meta,
                max_pixels=settings.max_image_pixels,
                max_decoded_pixels=settings.decoded_pixels(meta.resize),
            )
            self.label = f"model '{name}' version {self.version}"
            self.batcher = Batcher(
                sessions,
                # A graph whose batch is fixed at 1: nothing is batched; an image request's rows run
                # alone, one at a time (runtime.Session pads nothing and chunks by one).
                max_batch_size=1 if meta.fixed_batch else settings.max_batch_size,
                max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
                max_queue_rows=settings.max_queue_size,
                preferred_batch_sizes=settings.preferred_batch_sizes,
                hooks=Hooks(
                    rejected=recorder.rejected,
                    queued=recorder.queued,
                    batch=self._record_batch,
                    queue_rows=self._record_depth,
                ),
                label=self.label,
            )
        except BaseException:
            # Nothing may outlive a failed load: the sessions (and their onnxruntime threads) go now.
            for session in sessions:
                session.close()
            raise
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._retired = False
        self._draining = False
        self._closed = False

    @classmethod
    async def start(cls, *args: Any, **kwargs: Any) -> ServedModel:
        """A served model over freshly loaded sessions (the constructor's arguments), decoder warmed up.

        If it cannot be made, the sessions (and their onnxruntime threads) are closed before the
        error leaves: nothing outlives a failed load.
        """
        served = cls(*args, **kwargs)  # a constructor that fails has closed the sessions
        try:
            await asyncio.get_running_loop().run_in_executor(served._decode_executor, served.warm_up_decode)
        except asyncio.CancelledError:
            await served.close()
            raise
        except Exception:  # a decode warm-up failure must not make a good model unavailable
            log.warning("%s: decode warm-up failed", served.label, exc_info=True)
        return served

    # -- accounting -------------------------------------------------------------
    def _record_batch(self, info: BatchInfo) -> None:
        self._recorder.batch(info.size, input_s=info.input_s, infer_s=info.infer_s, output_s=info.output_s)

    def _record_depth(self, delta: int) -> None:
        self._recorder.queue_depth.inc(delta)

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        if self._retired or self._closed:
            raise errors.ModelNotReady(f"{self.label} has been replaced or unloaded; retry the request")
        if self._draining:
            raise errors.Draining(f"{self.label}: the server is shutting down and accepts no new requests")
        # The engine owns svertka_in_flight_requests: accepted by infer_*, not yet answered by it.
        self._in_flight += 1
        self._idle.clear()
        self._recorder.in_flight.inc()
        try:
            yield
        finally:
            self._in_flight -= 1
            self._recorder.in_flight.dec()
            if not self._in_flight:
                self._idle.set()

    def _invalid(self, message: str) -> errors.InvalidInput:
        self._recorder.rejected("invalid_input")
        return errors.InvalidInput(message)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # -- requests ------------------------------------------------------------------
    def check_tensor(self, batch: object) -> np.ndarray:
        """The checks a tensor request (the model's input dtype and shape) must pass; returns it
        C-contiguous."""
        x = self._check_layout(batch)
        if self.settings.reject_non_finite_inputs and x.dtype.kind == "f":
            self._check_finite(x)
        return x

    def _check_layout(self, batch: object) -> np.ndarray:
        name = self.meta.input_name
        limit = self.settings.max_rows_per_request
        datatype = self.meta.input_datatype
        if not isinstance(batch, np.ndarray):
            raise self._invalid(f"input '{name}': expected an {datatype} array, got {type(batch).__name__}")
        if batch.dtype != np.dtype(self.meta.input_dtype):
            raise self._invalid(f"input '{name}': expected {datatype} data, got {batch.dtype}")
        try:
            shown = "[" + ",".join(str(d) for d in batch.shape) + "]"
            interface.check_input_shape(self.meta, batch.shape, shown)
            interface.check_rows(name, batch.shape[0], limit, shown)
        except errors.InvalidInput as exc:
            raise self._invalid(exc.message) from None
        return np.ascontiguousarray(batch)

    def _check_finite(self, x: np.ndarray) -> None:
        finite = np.isfinite(x)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise self._invalid(
                f"input '{self.meta.input_name}': {bad} values are NaN or infinite; expected finite "
                f"{self.meta.input_datatype} values"
            )

    def warm_up_decode(self) -> None:
        """Decode one small JPEG and PNG so the first real image does not pay for first use.

        Measured on a fresh server: the first image took 75.9 ms to decode, the next 0.4 ms
        (codec plugin imports and initialisation). Blocking: run it in the decode executor.
        """
        if not self.meta.preprocessing_known:
            return  # tensors only: nothing is ever decoded for it
        import io

        from PIL import Image

        image = Image.new("RGB", (self.meta.crop[1] * 2, self.meta.crop[0] * 2), (120, 60, 30))
        for fmt in ("JPEG", "PNG"):
            buffer = io.BytesIO()
            image.save(buffer, format=fmt)
            self.preprocessor(buffer.getvalue())

    async def infer_tensor(
        self, batch: np.ndarray, *, deadline: float | None = None, timings: Timings | None = None
    ) -> np.ndarray:
        """Logits (n, classes) for exactly these n rows, batched with other callers' rows.

        Raises InvalidInput, Overloaded (queue full: at once), DeadlineExceeded
        (never computed), InferenceFailed, Draining, ModelNotReady (this version
        was swapped out). Cancelling the caller drops its rows before compute.
        """
        timings = timings if timings is not None else Timings()
        with self._tracked():
            x = self._check_layout(batch)
            if not self.settings.reject_non_finite_inputs:
                # As Triton does: NaN/Inf rows are computed like any others (no scan at all).
                res = await self.batcher.submit(x, deadline=deadline)
            elif x.size <= INLINE_CHECK_ELEMENTS:
                self._check_finite(x)
                res = await self.batcher.submit(x, deadline=deadline)
            else:
                # Scanning a large tensor for NaN/Inf takes milliseconds: do it off the loop, holding
                # its queue room (refused at once if full; a swap or drain meanwhile still lets it in).
                held = self.batcher.reserve(x.shape[0])
                try:
                    await asyncio.get_running_loop().run_in_executor(
                        self._decode_executor, self._check_finite, x
                    )
                except BaseException:
                    held.release()
                    raise
                res = await self.batcher.submit(x, deadline=deadline, reservation=held)
        timings.add_results([res])
        return res.rows

    async def infer_images(
        self, images: list[bytes], *, deadline: float | None = None, timings: Timings | None = None
    ) -> list[np.ndarray | errors.SvertkaError]:
        """One logits row (classes,) or the InvalidInput per image, in order.

        Queue room is reserved for every image before any decoding, so an
        overloaded model refuses at once; each image enters the batcher as
        soon as it is decoded, so decoding overlaps inference.
        """
        timings = timings if timings is not None else Timings()
        interface.check_images_allowed(self.meta, self.label)
        with self._tracked():
            n = len(images)
            limit = self.settings.max_rows_per_request
            try:
                interface.check_rows(self.meta.input_name, n, limit)
            except errors.InvalidInput as exc:
                raise self._invalid(exc.message) from None
            if deadline is not None and deadline <= time.monotonic():
                self._recorder.rejected("deadline")
                raise errors.DeadlineExceeded(f"{self.label}: the deadline passed before decoding started")
            reservations = self.batcher.reserve_each(n)
            try:
                outcomes = await asyncio.gather(
                    *(
                        self._one_image(data, held, deadline)
                        for data, held in zip(images, reservations, strict=True)
                    ),
                    return_exceptions=True,
                )
            except BaseException:
                # Cancelled (the client went away): an image task cancelled before its first step
                # never runs its own release, so give back whatever room is still held (idempotent).
                for held in reservations:
                    held.release()
                raise
        out: list[np.ndarray | errors.SvertkaError] = []
        results: list[Result] = []
        decode_s = 0.0
        failure: BaseException | None = None
        for outcome in outcomes:
            if isinstance(outcome, errors.InvalidInput):
                out.append(outcome)
            elif isinstance(outcome, BaseException):
                failure = failure or outcome
            else:
                res, seconds = outcome
                out.append(res.rows[0])
                results.append(res)
                decode_s += seconds
        if failure is not None:
            # Overloaded/Deadline/InferenceFailed for one image fails the request (they share a deadline).
            raise failure
        timings.preprocess_s += decode_s
        timings.add_results(results)
        return out

    def _decode(self, data: bytes) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        x = self.preprocessor(data)
        return x, time.perf_counter() - start

    async def _one_image(
        self, data: bytes, held: Reservation, deadline: float | None
    ) -> tuple[Result, float] | errors.InvalidInput:
        loop = asyncio.get_running_loop()
        try:
            x, seconds = await loop.run_in_executor(self._decode_executor, self._decode, data)
        except errors.InvalidInput as exc:
            held.release()
            self._recorder.rejected("invalid_input")
            return exc
        except BaseException:
            held.release()
            raise
        self._recorder.preprocess(seconds)
        res = await self.batcher.submit(x[None], deadline=deadline, reservation=held)
        return res, seconds

    @property
    def max_decoded_pixels(self) -> int:
        """The pixel limit in force for images decoded at full size (``auto`` resolved)."""
        return self.preprocessor.max_decoded_pixels

    async def statistics(self) -> StatsSnapshot:
        """Triton-style statistics of this (name, version) so far."""
        return self._recorder.snapshot()

    def top_k(self, logits_row: np.ndarray, k: int) -> list[tuple[int, str, float]]:
        """(index, label, softmax probability), best first (``interface.top_k``)."""
        return interface.top_k(self.meta, logits_row, k)

    # -- lifecycle ------------------------------------------------------------------
    async def drain(self) -> None:
        """Refuse new requests (Draining); return when everything accepted has been answered."""
        self._draining = True
        await self.batcher.drain()
        await self._idle.wait()

    async def retire(self) -> None:
        """Swapped out or unloaded: finish accepted work, then free the sessions."""
        self._retired = True
        await self.batcher.drain()
        await self._idle.wait()
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.batcher.close()
        for session in self._sessions:
            session.close()
