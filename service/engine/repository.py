"""The model repository: what it holds, which version of each model serves, loading, swaps, drain.

Layout (Triton/KServe style; the rules live in service.layout)::

    <repository>/<model>/config.yaml|yml|json      optional ModelSettings
    <repository>/<model>/<version>/model.onnx       version: 1 .. 2**63-1, ASCII decimal

Each model serves one version: the newest, or ``version`` from its config.
:class:`ModelRepository` owns the lifecycle and hands out a ``ServedModel`` per loaded version.

Swaps are atomic and lose nothing: a new version is loaded and warmed up
beside the serving one, then a single assignment makes ``get()`` return it;
the old version keeps running what it already accepted and is unloaded when
its queue and in-flight requests are done. A model that fails to load is
UNAVAILABLE with the reason (the others serve); a failed reload keeps the
serving version. Loading runs in one loader thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from service import config, errors, layout
from service.engine import interface, runtime
from service.engine.interface import LOADING, READY, UNAVAILABLE, UNLOADING, ModelStatus, resolve
from service.engine.loading import (
    MODEL_FILE,
    check_name,
    close_loaded,
    desired_fingerprint,
    load_sessions,
    model_names,
    parse_version,
    relative_to,
    repository_versions,
)
from service.engine.served_model import ServedModel

if TYPE_CHECKING:  # metrics imports prometheus_client; the engine only needs its interface
    from service.metrics import Metrics

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Entry:
    """Everything the repository knows about one model name."""

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


class ModelRepository:
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
        trt_cache_dir: Path | None = None,
    ) -> None:
        self.repository = Path(repository)
        self.metrics = metrics
        self.poll_interval_s = float(poll_interval_s)
        self.cpu_budget = int(cpu_budget) or config.default_intra_op_threads()
        self.trt_cache_dir = trt_cache_dir  # None: runtime.TRT_CACHE_DIR
        self._own_executor = executor is None
        self._decode_executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=self.cpu_budget, thread_name_prefix="svertka-decode"
        )
        self._loader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="svertka-load")
        self._entries: dict[str, _Entry] = {}
        self._listeners: list[Callable[[ModelStatus], None]] = []
        self._retiring: set[asyncio.Task] = set()
        #: Versions replaced or unloaded but still accepting requests until they retire.
        self._retiring_models: list[ServedModel] = []
        #: Awaited before a replaced or unloaded version stops accepting requests (see live()).
        self.before_retire: Callable[[], Awaitable[None]] | None = None
        self._poll_task: asyncio.Task | None = None
        self._draining = False
        self._closed = False

    # -- queries ------------------------------------------------------------------
    def get(self, name: str, version: str | int | None = None) -> ServedModel:
        """The ServedModel for a request. ``None``/``""`` means the serving (newest) version."""
        check_name(name)
        wanted = None if version is None or version == "" else parse_version(name, version)
        return resolve(self._entries, name, wanted)

    async def _before_retiring(self) -> None:
        """Let whoever must hear of a change first (frontends in other processes) hear of it."""
        if self.before_retire is not None:
            await self.before_retire()  # it gives up after a timeout of its own

    def live(self, name: str, version: int, sha256: str) -> ServedModel:
        """That exact model (version and file) while it still accepts requests: serving, or
        replaced and not yet retired; else the error ``get`` gives. A frontend in another
        process names what it resolved, which may have been replaced since."""
        for served in self._retiring_models:
            if (served.name, served.version, served.sha256) == (name, version, sha256):
                return served
        return self.get(name, version)

    def entries(self) -> dict[str, _Entry]:
        """Every model name's state (for describing the repository to frontends in other processes)."""
        return dict(self._entries)

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
        for name in model_names(self.repository):
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
        entry.attempted_fingerprint = desired_fingerprint(entry.directory)
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
        loading = self._loader.submit(load_sessions, path, settings, self.cpu_budget, self.trt_cache_dir)
        try:
            sessions, sha256 = await asyncio.wrap_future(loading)
        except asyncio.CancelledError:
            # The caller went away (e.g. a cancelled RepositoryModelLoad); the loader thread goes on:
            # close what it loads rather than leave the sessions to the garbage collector.
            loading.add_done_callback(close_loaded)
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
        recorder = self.metrics.model(name, version)
        try:
            served = await ServedModel.start(
                name, version, meta, settings, sessions, recorder,
                decode_executor=self._decode_executor, path=path, sha256=sha256,
            )  # fmt: skip
        except Exception as exc:  # the sessions are closed: nothing outlives a failed load
            log.exception("model '%s' version %d: unexpected error while starting it", name, version)
            return self._failed(
                entry, version, f"version {version}: unexpected error while starting: {exc!r}"
            )
        if self._closed or self._draining:
            # Shutdown began during the warm-up (drain() did not see this model): same as above.
            await served.close()
            return self._failed(entry, version, "not started: the server is shutting down")
        old = entry.serving
        entry.serving = served  # the swap: get() returns the new version from here on
        entry.serving_fingerprint = entry.attempted_fingerprint
        self._forget_unready(entry, keep=version)
        loaded_s = time.perf_counter() - started
        self.metrics.set_model_info(
            name, version, provider=served.provider, precision=meta.precision, arch=meta.arch, sha256=sha256,
            load_seconds=loaded_s,
        )  # fmt: skip
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
            loaded_s,
            f" (replacing version {old.version})" if old is not None else "",
        )
        self.metrics.set_reload_failed(name, False)
        status = self._set_status(entry, ModelStatus(name, version, READY, ""), swapped=True)
        if old is not None:
            self._retiring_models.append(old)  # at once: live() finds it from the swap on
            task = loop.create_task(self._retire(old, keep_series=old.version == version))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return status

    async def _retire(self, old: ServedModel, *, keep_series: bool) -> None:
        try:
            await self._before_retiring()
            await old.retire()
        finally:
            self._retiring_models.remove(old)
            await old.close()  # also when cancelled by close(): free the sessions and threads
        if not keep_series:
            self.metrics.remove_model(old.name, old.version)
        log.info("model '%s' version %d unloaded (its accepted requests finished)", old.name, old.version)

    def _failed(self, entry: _Entry, version: int | None, reason: str) -> ModelStatus:
        # The status (RepositoryIndex, the UNAVAILABLE message a client gets) and its log line show
        # paths relative to the repository, whose own path is logged once at start-up.
        reason = relative_to(self.repository, reason)
        if entry.serving is not None:
            log.error("model '%s': %s; still serving version %d", entry.name, reason, entry.serving.version)
            text = f"{reason} (still serving version {entry.serving.version})"
            # Monitoring sees it too: svertka_model_reload_failed, and the served status's reason
            # (RepositoryIndex, ModelReady's trailing metadata), until a reload succeeds.
            self.metrics.set_reload_failed(entry.name, True)
            served = ModelStatus(entry.name, entry.serving.version, READY, f"{interface.RELOAD_FAILED}{text}")
            self._set_status(entry, served)
            return ModelStatus(entry.name, version, UNAVAILABLE, text)
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

    def _set_status(self, entry: _Entry, status: ModelStatus, *, swapped: bool = False) -> ModelStatus:
        """Record ``status``; listeners hear of a change, and of every swap (the same version
        number can be other weights: a frontend in another process must learn of them)."""
        if swapped or status != entry.status:
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
        self.metrics.set_reload_failed(entry.name, False)
        old = entry.serving
        entry.serving = None
        entry.serving_fingerprint = None
        if old is None:
            self._set_status(entry, ModelStatus(entry.name, entry.status.version, UNAVAILABLE, reason))
            return
        self._retiring_models.append(old)
        self._set_status(entry, ModelStatus(entry.name, old.version, UNLOADING, reason))
        self.metrics.set_model_ready(entry.name, old.version, False)
        try:
            await self._before_retiring()
            await old.retire()
        finally:
            self._retiring_models.remove(old)
        self.metrics.remove_model(entry.name, old.version)
        self._set_status(entry, ModelStatus(entry.name, old.version, UNAVAILABLE, reason))
        log.info("model '%s' version %d %s", entry.name, old.version, reason)

    async def refresh(self) -> None:
        """Bring the served set in line with the repository (what polling runs)."""
        on_disk = set(model_names(self.repository))
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
            current = desired_fingerprint(entry.directory)
            if current != entry.serving_fingerprint and current != entry.attempted_fingerprint:
                await self.load(name)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("repository poll of %s failed", self.repository)

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
