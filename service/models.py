"""The model repository and the models it serves: loading, versions, swaps, and the inference entry points.

Layout (Triton/KServe style)::

    <repository>/<model>/config.yaml|yml|json      optional ModelSettings
    <repository>/<model>/<version>/model.onnx       version: 1 .. 2**63-1, ASCII decimal (service.layout)

Each model serves one version: the newest, or ``version`` from its config.
:class:`ModelManager` owns the lifecycle; :class:`ServedModel` is one loaded
(name, version) and the object request handlers call.

Swaps are atomic and lose nothing: a new version is loaded and warmed up
beside the serving one, then a single assignment makes ``get()`` return it;
the old version keeps running what it already accepted and is unloaded when
its queue and in-flight requests are done. A model that fails to load is
UNAVAILABLE with the reason (the others serve); a failed reload keeps the
serving version.

Everything runs on one event loop; blocking work leaves it through three
seams: image decoding (a shared thread pool), onnxruntime runs (one thread per
model instance, inside the batcher) and loading (one loader thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service import config, errors, layout, modelmeta, runtime
from service.batching import Batcher, BatchInfo, Hooks, Reservation, Result
from service.preprocess import Preprocessor

if TYPE_CHECKING:  # metrics imports prometheus_client and grpc; the engine only needs its interface
    from service.metrics import Metrics, ModelRecorder

log = logging.getLogger(__name__)

READY = "READY"
LOADING = "LOADING"
UNAVAILABLE = "UNAVAILABLE"
UNLOADING = "UNLOADING"

MODEL_FILE = layout.MODEL_FILE
#: Hex digits of the model file's sha256 that identify the weights being served.
FINGERPRINT_CHARS = 12
#: Tensors up to this many elements are checked for NaN/Inf on the event loop: 2**20 floats take
#: about 0.4 ms (np.isfinite(x).all(): 65 us for one 3x224x224 image, 3.9 ms for 32 of them).
INLINE_CHECK_ELEMENTS = 1 << 20


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid model name (service.layout), else raise ModelNotFound (it can't exist)."""
    if not layout.is_valid_name(name):
        raise errors.ModelNotFound(f"invalid model name {errors.shown(name)}: expected {layout.NAME_RULE}")
    return name


def repository_versions(model_dir: Path) -> list[int]:
    """Versions present on disk: version directories (service.layout) holding a model.onnx."""
    return layout.versions(model_dir)


def file_fingerprint(path: Path) -> str:
    """The first FINGERPRINT_CHARS hex digits of the file's sha256 (blocking: run it off the loop)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def _load_sessions(
    path: Path, settings: config.ModelSettings, cpu_budget: int
) -> tuple[list[runtime.Session], str]:
    """The loader thread's work: the file's fingerprint, then the warmed-up sessions."""
    try:
        sha256 = file_fingerprint(path)
    except OSError as exc:
        raise runtime.ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    return runtime.load_instances(path, settings, cpu_budget), sha256


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    """The state of one model as health checks and RepositoryIndex see it."""

    name: str
    version: int | None
    state: str  # READY | LOADING | UNAVAILABLE | UNLOADING
    reason: str  # "" when READY, else a human-readable cause


@dataclasses.dataclass
class Timings:
    """Where one request's time went, filled in by :class:`ServedModel` when a caller passes one.

    For a request with several images, ``preprocess_s`` is the sum of the
    decodes, ``queue_s`` the longest wait, and the compute times are summed
    over the distinct batches its images rode in.
    """

    preprocess_s: float = 0.0
    queue_s: float = 0.0
    compute_input_s: float = 0.0
    compute_infer_s: float = 0.0
    compute_output_s: float = 0.0

    @property
    def compute_s(self) -> float:
        return self.compute_input_s + self.compute_infer_s + self.compute_output_s

    def add_results(self, results: list[Result]) -> None:
        seen: dict[int, BatchInfo] = {}
        for res in results:
            self.queue_s = max(self.queue_s, res.queue_s)
            seen[id(res.batch)] = res.batch
        for info in seen.values():
            self.compute_input_s += info.input_s
            self.compute_infer_s += info.infer_s
            self.compute_output_s += info.output_s


_REQUEST_TIMINGS: contextvars.ContextVar[Timings | None] = contextvars.ContextVar(
    "svertka_timings", default=None
)


def _start_timings(timings: Timings | None) -> Timings:
    timings = timings if timings is not None else Timings()
    _REQUEST_TIMINGS.set(timings)
    return timings


def request_timings() -> Timings | None:
    """The Timings of the last ``infer_*`` call made by the current task (None if none).

    For handlers that prefer not to pass ``timings=``: the infer methods run
    in the caller's task, so what they record is visible here afterwards.
    """
    return _REQUEST_TIMINGS.get()


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
        self.recorder = recorder
        #: The first hex digits of model.onnx's sha256 at load: which weights answer under this version.
        self.sha256 = sha256
        # Exported so the queue-saturation alert and dashboard can compare depth with capacity.
        recorder.set_queue_capacity(settings.max_queue_size)
        self.path = path
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
            [s.run for s in sessions],
            max_batch_size=settings.max_batch_size,
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
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._retired = False
        self._draining = False
        self._closed = False

    # -- accounting -------------------------------------------------------------
    def _record_batch(self, info: BatchInfo) -> None:
        self.recorder.batch(info.size, input_s=info.input_s, infer_s=info.infer_s, output_s=info.output_s)

    def _record_depth(self, delta: int) -> None:
        self.recorder.queue_depth.inc(delta)

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        if self._retired or self._closed:
            raise errors.ModelNotReady(f"{self.label} has been replaced or unloaded; retry the request")
        if self._draining:
            raise errors.Draining(f"{self.label}: the server is shutting down and accepts no new requests")
        # The engine owns svertka_in_flight_requests: accepted by infer_*, not yet answered by it.
        self._in_flight += 1
        self._idle.clear()
        self.recorder.in_flight.inc()
        try:
            yield
        finally:
            self._in_flight -= 1
            self.recorder.in_flight.dec()
            if not self._in_flight:
                self._idle.set()

    def _invalid(self, message: str) -> errors.InvalidInput:
        self.recorder.rejected("invalid_input")
        return errors.InvalidInput(message)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # -- requests ------------------------------------------------------------------
    def check_tensor(self, batch: object) -> np.ndarray:
        """The checks a float32 (n, 3, H, W) request must pass; returns it C-contiguous."""
        x = self._check_layout(batch)
        if self.settings.reject_non_finite_inputs:
            self._check_finite(x)
        return x

    def _check_layout(self, batch: object) -> np.ndarray:
        name = self.meta.input_name
        c, h, w = self.meta.input_shape
        limit = self.settings.max_rows_per_request
        if not isinstance(batch, np.ndarray):
            raise self._invalid(f"input '{name}': expected an FP32 array, got {type(batch).__name__}")
        if batch.dtype != np.float32:
            raise self._invalid(f"input '{name}': expected FP32 data, got {batch.dtype}")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (c, h, w):
            raise self._invalid(f"input '{name}': expected shape [n,{c},{h},{w}], got {list(batch.shape)}")
        n = batch.shape[0]
        if not 1 <= n <= limit:
            raise self._invalid(
                f"input '{name}': batch of {n} rows; expected 1 to {limit} rows per request (max_rows_per_request)"
            )
        return np.ascontiguousarray(batch)

    def _check_finite(self, x: np.ndarray) -> None:
        finite = np.isfinite(x)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise self._invalid(
                f"input '{self.meta.input_name}': {bad} values are NaN or infinite; expected finite FP32 values"
            )

    def warm_up_decode(self) -> None:
        """Decode one small JPEG and PNG so the first real image does not pay for first use.

        Measured on a fresh server: the first image took 75.9 ms to decode, the next 0.4 ms
        (codec plugin imports and initialisation). Blocking: run it in the decode executor.
        """
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
        timings = _start_timings(timings)
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
        timings = _start_timings(timings)
        with self._tracked():
            n = len(images)
            limit = self.settings.max_rows_per_request
            if n == 0:
                raise self._invalid("the request has no images")
            if n > limit:
                raise self._invalid(f"{n} images in one request; the limit is {limit} (max_rows_per_request)")
            if deadline is not None and deadline <= time.monotonic():
                self.recorder.rejected("deadline")
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
            self.recorder.rejected("invalid_input")
            return exc
        except BaseException:
            held.release()
            raise
        self.recorder.preprocess(seconds)
        res = await self.batcher.submit(x[None], deadline=deadline, reservation=held)
        return res, seconds

    def top_k(self, logits_row: np.ndarray, k: int) -> list[tuple[int, str, float]]:
        """(index, label, softmax probability), best first; ties keep class order. k > classes: all."""
        if not isinstance(k, int | np.integer) or k < 1:
            raise errors.InvalidInput(f"top_k must be >= 1, got {k}")
        k = min(int(k), self.meta.num_classes)
        z = np.asarray(logits_row, np.float64).reshape(-1)
        z = z - z.max()
        p = np.exp(z)
        p /= p.sum()
        order = np.argsort(-p, kind="stable")[:k]
        return [(int(i), self.meta.labels[i], float(p[i])) for i in order]

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


@dataclasses.dataclass
class _Entry:
    """Everything the manager knows about one model name."""

    name: str
    directory: Path
    status: ModelStatus
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    serving: ServedModel | None = None
    versions: list[int] = dataclasses.field(default_factory=list)
    serving_fingerprint: tuple | None = None
    attempted_fingerprint: tuple | None = None
    misnamed: list[str] = dataclasses.field(default_factory=list)  # skipped version-like directories
    unready_version: int | None = None  # version whose svertka_model_ready is 0 after a failed load


class ModelManager:
    """Loads every model in a repository, hands out ServedModels, swaps versions, drains.

    ``executor`` decodes images (default: a pool with one thread per usable
    CPU). ``poll_interval_s`` > 0 rescans the repository that often: new
    models and versions are loaded (swapped in), removed ones unloaded.
    ``cpu_budget`` (0: the CPUs this process may use) sizes the decode pool and
    is shared among a model's instances for onnxruntime's intra-op threads.
    """

    def __init__(
        self,
        repository: Path,
        metrics: Metrics,
        *,
        executor: concurrent.futures.Executor | None = None,
        poll_interval_s: float = 0.0,
        cpu_budget: int = 0,
    ) -> None:
        self.repository = Path(repository)
        self.metrics = metrics
        self.poll_interval_s = float(poll_interval_s)
        self.cpu_budget = int(cpu_budget) or config.default_intra_op_threads()
        self._own_executor = executor is None
        self._decode_executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=self.cpu_budget, thread_name_prefix="svertka-decode"
        )
        self._loader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="svertka-load")
        self._entries: dict[str, _Entry] = {}
        self._listeners: list[Callable[[ModelStatus], None]] = []
        self._retiring: set[asyncio.Task] = set()
        self._poll_task: asyncio.Task | None = None
        self._draining = False
        self._closed = False

    # -- queries ------------------------------------------------------------------
    def get(self, name: str, version: str | int | None = None) -> ServedModel:
        """The ServedModel for a request. ``None``/``""`` means the serving (newest) version."""
        check_name(name)
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self._entries)) or "none"
            raise errors.ModelNotFound(f"model '{name}' is not in the repository (models: {known})")
        served = entry.serving
        if version is None or version == "":
            if served is None:
                raise errors.ModelNotReady(self._not_ready_message(entry))
            return served
        wanted = _parse_version(name, version)
        if served is not None and served.version == wanted:
            return served
        if wanted in entry.versions:
            now = (
                f"version {served.version} is serving"
                if served is not None
                else self._not_ready_message(entry)
            )
            raise errors.ModelNotReady(f"model '{name}' version {wanted} is not loaded ({now})")
        listed = ", ".join(map(str, entry.versions)) or "none"
        raise errors.ModelNotFound(
            f"model '{name}' has no version {wanted} (versions in the repository: {listed})"
        )

    @staticmethod
    def _not_ready_message(entry: _Entry) -> str:
        status = entry.status
        reason = f": {status.reason}" if status.reason else ""
        return f"model '{entry.name}' is {status.state.lower()}{reason}"

    def statuses(self) -> list[ModelStatus]:
        return [self._entries[name].status for name in sorted(self._entries)]

    def status(self, name: str) -> ModelStatus:
        check_name(name)
        entry = self._entries.get(name)
        if entry is None:
            raise errors.ModelNotFound(f"model '{name}' is not in the repository")
        return entry.status

    def served(self) -> list[ServedModel]:
        """The serving version of every ready model."""
        return [e.serving for _, e in sorted(self._entries.items()) if e.serving is not None]

    def add_listener(self, callback: Callable[[ModelStatus], None]) -> None:
        """``callback(status)`` on every state change, on the event loop."""
        self._listeners.append(callback)

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Load and warm up every model in the repository; a bad one is UNAVAILABLE, the rest serve."""
        if not self.repository.is_dir():
            raise FileNotFoundError(f"model repository {self.repository} is not a directory")
        for name in self._scan():
            if self._draining or self._closed:
                break  # shutdown during start-up: load nothing more
            await self.load(name)
        if self.poll_interval_s > 0 and self._poll_task is None:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll(), name="repository-poll")
        ready = sum(1 for s in self.statuses() if s.state == READY)
        log.info("model repository %s: %d of %d models ready", self.repository, ready, len(self._entries))

    async def load(self, name: str) -> ModelStatus:
        """(Re)load ``name`` from the repository and return the outcome for the version tried.

        The serving version (if any) keeps serving until the new one is warm;
        if the new one fails, it keeps serving and the returned status is
        UNAVAILABLE with the reason.
        """
        check_name(name)
        if self._closed or self._draining:
            raise errors.Draining("the server is shutting down; models are not loaded any more")
        directory = self.repository / name
        entry = self._entries.get(name)
        if entry is None:
            if not directory.is_dir():
                raise errors.ModelNotFound(f"no model '{name}' in the repository")
            entry = _Entry(name, directory, ModelStatus(name, None, LOADING, "waiting to load"))
            self._entries[name] = entry
        async with entry.lock:
            return await self._load_locked(entry)

    async def _load_locked(self, entry: _Entry) -> ModelStatus:
        name = entry.name
        if not entry.directory.is_dir():
            if entry.serving is not None:
                await self._unload_locked(entry, "removed from the repository")
            self._forget_unready(entry)
            return self._set_status(
                entry, ModelStatus(name, None, UNAVAILABLE, "removed from the repository")
            )
        entry.versions = repository_versions(entry.directory)
        misnamed = layout.misnamed_versions(entry.directory)
        if misnamed and misnamed != entry.misnamed:
            log.warning(
                "model '%s': skipping directories %s: not a version (a version is %s)",
                name,
                ", ".join(errors.shown(m) for m in misnamed[:5]),
                layout.VERSION_RULE,
            )
        entry.misnamed = misnamed
        entry.attempted_fingerprint = _desired_fingerprint(entry.directory)
        try:
            settings = config.ModelSettings.load(entry.directory)
        except config.ConfigError as exc:
            return self._failed(entry, None, f"bad config: {exc}")
        except Exception as exc:  # whatever a config file holds, it must not stop the other models
            log.exception("model '%s': unexpected error while reading its config", name)
            return self._failed(entry, None, f"bad config: {exc!r}")
        version = settings.version or (entry.versions[-1] if entry.versions else None)
        if (
            entry.serving is not None
            and entry.serving.version not in entry.versions
            and version not in entry.versions
        ):
            # The serving version left the repository and nothing can replace it: stop serving it
            # (after its accepted requests), rather than serve a model that is no longer deployed.
            await self._unload_locked(
                entry, f"version {entry.serving.version} was removed from the repository"
            )
        if not entry.versions:
            skipped = f"; skipped {', '.join(errors.shown(m) for m in misnamed[:5])}" if misnamed else ""
            return self._failed(
                entry,
                None,
                f"no versions: expected {entry.directory}/<version>/{MODEL_FILE}, "
                f"<version> {layout.VERSION_RULE}{skipped}",
            )
        if version not in entry.versions:
            return self._failed(
                entry,
                version,
                f"the config asks for version {version} but the repository has {', '.join(map(str, entry.versions))}",
            )
        path = entry.directory / str(version) / MODEL_FILE
        if entry.serving is None:
            self._set_status(entry, ModelStatus(name, version, LOADING, f"loading version {version}"))
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        loading = self._loader.submit(_load_sessions, path, settings, self.cpu_budget)
        try:
            sessions, sha256 = await asyncio.wrap_future(loading)
        except asyncio.CancelledError:
            # The caller went away (e.g. a cancelled RepositoryModelLoad); the loader thread goes on:
            # close what it loads rather than leave the sessions to the garbage collector.
            loading.add_done_callback(_close_loaded)
            if entry.serving is None:
                self._set_status(entry, ModelStatus(name, version, UNAVAILABLE, "loading was cancelled"))
            raise
        except runtime.ModelLoadError as exc:
            return self._failed(entry, version, f"version {version}: {exc}")
        except Exception as exc:
            log.exception("model '%s' version %d: unexpected error while loading", name, version)
            return self._failed(entry, version, f"version {version}: unexpected error while loading: {exc!r}")
        if self._closed or self._draining:
            # Shutdown began while this model was loading: it must not start taking requests now.
            for session in sessions:
                session.close()
            return self._failed(entry, version, "not started: the server is shutting down")
        meta = sessions[0].meta
        try:
            served = ServedModel(
                name,
                version,
                meta,
                settings,
                sessions,
                self.metrics.model(name, version),
                decode_executor=self._decode_executor,
                path=path,
                sha256=sha256,
            )
        except Exception as exc:
            # Nothing may outlive a failed load: the sessions (and their onnxruntime threads) go now.
            for session in sessions:
                session.close()
            log.exception("model '%s' version %d: unexpected error while starting it", name, version)
            return self._failed(
                entry, version, f"version {version}: unexpected error while starting: {exc!r}"
            )
        try:
            await loop.run_in_executor(self._decode_executor, served.warm_up_decode)
        except asyncio.CancelledError:
            await served.close()
            raise
        except Exception:  # a decode warm-up failure must not make a good model unavailable
            log.warning("model '%s' version %d: decode warm-up failed", name, version, exc_info=True)
        if self._closed or self._draining:
            # Shutdown began during the warm-up (drain() did not see this model): same as above.
            await served.close()
            return self._failed(entry, version, "not started: the server is shutting down")
        old = entry.serving
        entry.serving = served  # the swap: get() returns the new version from here on
        entry.serving_fingerprint = entry.attempted_fingerprint
        self._forget_unready(entry, keep=version)
        self.metrics.set_model_info(
            name, version, provider=served.provider, precision=meta.precision, arch=meta.arch, sha256=sha256
        )
        self.metrics.set_model_ready(name, version, True)
        log.info(
            "model '%s' version %d ready on %s: %d instance(s) x %d threads, max batch %d, "
            "sha256 %s, loaded in %.2f s%s",
            name,
            version,
            served.provider,
            served.instances,
            served.threads_per_instance,
            settings.max_batch_size,
            sha256,
            time.perf_counter() - started,
            f" (replacing version {old.version})" if old is not None else "",
        )
        status = self._set_status(entry, ModelStatus(name, version, READY, ""))
        if old is not None:
            task = loop.create_task(self._retire(old, keep_series=old.version == version))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return status

    async def _retire(self, old: ServedModel, *, keep_series: bool) -> None:
        try:
            await old.retire()
        finally:
            await old.close()  # also when cancelled by close(): free the sessions and threads
        if not keep_series:
            self.metrics.remove_model(old.name, old.version)
        log.info("model '%s' version %d unloaded (its accepted requests finished)", old.name, old.version)

    def _relative(self, text: str) -> str:
        """``text`` with the repository's own path taken out: clients see paths inside it only."""
        for root in {str(self.repository), str(self.repository.resolve())}:
            text = text.replace(root + "/", "").replace(root, "<repository>")
        return text

    def _failed(self, entry: _Entry, version: int | None, reason: str) -> ModelStatus:
        # The status (RepositoryIndex, the UNAVAILABLE message a client gets) and its log line show
        # paths relative to the repository, whose own path is logged once at start-up.
        reason = self._relative(reason)
        if entry.serving is not None:
            log.error("model '%s': %s; still serving version %d", entry.name, reason, entry.serving.version)
            return ModelStatus(
                entry.name, version, UNAVAILABLE, f"{reason} (still serving version {entry.serving.version})"
            )
        log.error("model '%s' unavailable: %s", entry.name, reason)
        # Operators see it as svertka_model_ready == 0 (and its alert), under the version it tried.
        shown = version if version is not None else (entry.versions[-1] if entry.versions else None)
        if shown is not None:
            self._forget_unready(entry, keep=shown)
            self.metrics.set_model_ready(entry.name, shown, False)
            entry.unready_version = shown
        return self._set_status(entry, ModelStatus(entry.name, version, UNAVAILABLE, reason))

    def _forget_unready(self, entry: _Entry, keep: int | None = None) -> None:
        """Drop the readiness-0 series of an earlier failed attempt (another version now stands)."""
        if entry.unready_version is not None and entry.unready_version != keep:
            self.metrics.remove_model(entry.name, entry.unready_version)
        entry.unready_version = None

    def _set_status(self, entry: _Entry, status: ModelStatus) -> ModelStatus:
        if status != entry.status:
            entry.status = status
            for callback in list(self._listeners):
                try:
                    callback(status)
                except Exception:
                    log.exception("model status listener %r failed", callback)
        return status

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: refuse new requests, finish accepted ones, free the sessions."""
        check_name(name)
        entry = self._entries.get(name)
        if entry is None:
            raise errors.ModelNotFound(f"model '{name}' is not in the repository")
        async with entry.lock:
            await self._unload_locked(entry, "unloaded")

    async def _unload_locked(self, entry: _Entry, reason: str) -> None:
        self._forget_unready(entry)
        old = entry.serving
        entry.serving = None
        entry.serving_fingerprint = None
        if old is None:
            self._set_status(entry, ModelStatus(entry.name, entry.status.version, UNAVAILABLE, reason))
            return
        self._set_status(entry, ModelStatus(entry.name, old.version, UNLOADING, reason))
        self.metrics.set_model_ready(entry.name, old.version, False)
        await old.retire()
        self.metrics.remove_model(entry.name, old.version)
        self._set_status(entry, ModelStatus(entry.name, old.version, UNAVAILABLE, reason))
        log.info("model '%s' version %d %s", entry.name, old.version, reason)

    async def refresh(self) -> None:
        """Bring the served set in line with the repository (what polling runs)."""
        on_disk = set(self._scan())
        for name in sorted(on_disk | set(self._entries)):
            entry = self._entries.get(name)
            if entry is None:
                await self.load(name)
                continue
            if name not in on_disk:
                if entry.serving is not None or entry.status.state != UNAVAILABLE:
                    async with entry.lock:
                        await self._unload_locked(entry, "removed from the repository")
                continue
            current = _desired_fingerprint(entry.directory)
            if current != entry.serving_fingerprint and current != entry.attempted_fingerprint:
                await self.load(name)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("repository poll of %s failed", self.repository)

    def _scan(self) -> list[str]:
        names = []
        for child in sorted(self.repository.iterdir()):
            if not child.is_dir() or child.name.startswith("."):
                continue
            if not layout.is_valid_name(child.name):
                log.warning("ignoring %s: not a valid model name (%s)", child, layout.NAME_RULE)
                continue
            names.append(child.name)
        return names

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests with Draining; wait (up to ``timeout_s``) for everything accepted."""
        self._draining = True
        self._stop_polling()
        models = [e.serving for e in self._entries.values() if e.serving is not None]
        waits = [m.drain() for m in models] + list(self._retiring)
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*waits)
        except TimeoutError:
            left = sum(m.in_flight for m in models)
            log.warning("drain: %d requests still in flight after %.1f s", left, timeout_s)

    async def close(self) -> None:
        """Free everything; requests still queued get Draining."""
        if self._closed:
            return
        self._closed = True
        self._stop_polling()
        for entry in self._entries.values():
            if entry.serving is not None:
                await entry.serving.close()
        if self._retiring:
            for task in list(self._retiring):
                task.cancel()
            await asyncio.gather(*self._retiring, return_exceptions=True)
        self._loader.shutdown(wait=False)
        if self._own_executor:
            self._decode_executor.shutdown(wait=False)

    def _stop_polling(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            self._poll_task = None


def _close_loaded(future: concurrent.futures.Future) -> None:
    """Close the sessions of a load nobody waits for any more (runs in the loader thread)."""
    if future.cancelled() or future.exception() is not None:
        return
    sessions, _ = future.result()
    for session in sessions:
        session.close()


def _parse_version(name: str, version: str | int) -> int:
    if isinstance(version, np.integer):
        version = int(version)
    parsed = version if layout.is_version(version) else layout.parse_version(version)
    if parsed is None:
        raise errors.ModelNotFound(
            f"model '{name}' has no version {errors.shown(version)} (a version is {layout.VERSION_RULE})"
        )
    return parsed


def _config_stamp(directory: Path) -> tuple:
    stamps = []
    for fname in layout.CONFIG_FILES:
        try:
            st = (directory / fname).stat()
        except OSError:
            continue
        stamps.append((fname, st.st_mtime_ns, st.st_size))
    return tuple(stamps)


def _desired_fingerprint(directory: Path) -> tuple:
    """What the repository currently asks to serve: (version, model file stamp, config stamp).

    Polling reloads a model when this changes, and does not retry a failed
    load until it changes (a half-copied file is retried once it is complete).
    """
    versions = repository_versions(directory)
    try:
        settings = config.ModelSettings.load(directory)
        wanted: int | str | None = settings.version or (versions[-1] if versions else None)
    except Exception:  # config.ConfigError, or anything else a broken file raises: same outcome
        wanted = "bad config"
    stamp = None
    if isinstance(wanted, int):
        try:
            st = (directory / str(wanted) / MODEL_FILE).stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
    return (wanted, stamp, _config_stamp(directory))
