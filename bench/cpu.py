"""CPU time a load costs per image: the server's process tree and the client that drives it.

On a machine whose few cores hold the server, its client and nothing else, the
served rate cannot exceed ``cores / (server CPU + client CPU per image)``, and
the ceiling (onnxruntime alone) is ``cores / (model CPU per image)`` at best. CPU
time per image is also moved less than a rate by other work on the machine: a
neighbour that takes a core stretches wall time, not the CPU time the server
spends on each image. It is not unmoved: caches and memory bandwidth that a
neighbour shares still change it by a few per cent between runs.

``Meter`` samples user + system time (all threads) of the server's process and
its descendants (PyTriton's Triton server and its Python backend stubs are
children of the peer's launcher) and of the client: ``"children"`` is
perf_analyzer, a child of this process that has exited (and been waited for)
by the time the meter stops; ``"self"`` is this process, the asyncio load
generator. The images are the server's own count over the same span (the
difference of ModelStatistics), so warm-up requests and retried windows count
on both sides. The client's CPU includes its start-up (perf_analyzer parses its
input file).
"""

from __future__ import annotations

import dataclasses
import resource
import time

from bench import modelstats


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants (all their threads)."""
    import psutil  # dev dependency; the GPU machine's bundle (bench/gpu_bundle.sh) has none and never meters

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:  # exited between the listing and the read
            continue
        total += times.user + times.system
    return total


def client_cpu_s(client: str) -> float:
    """CPU seconds of the client: ``children`` (waited-for subprocesses) or ``self`` (this process)."""
    if client == "children":
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime
    if client == "self":
        return time.process_time()
    raise ValueError(f"client: expected 'children' or 'self', got {client!r}")


@dataclasses.dataclass(frozen=True)
class CpuUse:
    """CPU seconds spent while the server computed ``images`` images in ``wall_s`` seconds."""

    server_s: float
    client_s: float
    images: int
    wall_s: float

    @property
    def server_ms_per_image(self) -> float | None:
        return 1e3 * self.server_s / self.images if self.images else None

    @property
    def client_ms_per_image(self) -> float | None:
        return 1e3 * self.client_s / self.images if self.images else None

    @property
    def cores_busy(self) -> float | None:
        """Server and client together, in cores (CPU seconds per wall second)."""
        return (self.server_s + self.client_s) / self.wall_s if self.wall_s > 0 else None


class Meter:
    """Starts on construction; :meth:`stop` ends the span, :meth:`use` divides it among the images."""

    def __init__(self, server_pid: int, client: str) -> None:
        self.server_pid = server_pid
        self.client = client
        self._server0 = tree_cpu_s(server_pid)
        self._client0 = client_cpu_s(client)
        self._t0 = time.monotonic()
        self._stopped: tuple[float, float, float] | None = None

    def stop(self) -> None:
        self._stopped = (
            tree_cpu_s(self.server_pid) - self._server0,
            client_cpu_s(self.client) - self._client0,
            time.monotonic() - self._t0,
        )

    def use(self, images: int) -> CpuUse:
        """The stopped span, with the ``images`` the server computed during it."""
        if self._stopped is None:
            raise RuntimeError("Meter.use() before stop()")
        server_s, client_s, wall_s = self._stopped
        return CpuUse(server_s=server_s, client_s=client_s, images=int(images), wall_s=wall_s)


class Span:
    """One load run's batches (ModelStatistics before and after) and, with a server pid, its CPU time.

    Construct right before the load starts; :meth:`stop` right after it ends.
    """

    def __init__(self, url: str, model: str, server_pid: int | None, client: str) -> None:
        self._url, self._model = url, model
        self._before = modelstats.batch_counts(url, model)
        self._meter = Meter(server_pid, client) if server_pid else None

    def stop(self) -> tuple[dict[int, int], CpuUse | None]:
        """Batches per size executed during the run, and its CPU use (None without a server pid)."""
        if self._meter:
            self._meter.stop()
        batches = modelstats.difference(modelstats.batch_counts(self._url, self._model), self._before)
        return batches, self._meter.use(modelstats.images(batches)) if self._meter else None
