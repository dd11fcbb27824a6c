"""The hardware limit: onnxruntime alone, as the server configures it, at every batch size.

No server, no gRPC, no copies: the server's own onnxruntime session
(``service.engine.runtime.Session``: the same execution providers, intra-op threads
and session options as ``svertka serve``), fed a ready float32 batch in a loop. The best images/s over batch sizes 1, 2, 4, ...,
``max_batch_size`` is the ceiling a server on this machine can at most reach;
the batch-1 latency is the floor of its latency at concurrency 1.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from bench.stats import percentiles


@dataclasses.dataclass(frozen=True)
class BatchPoint:
    batch_size: int
    iterations: int
    images_per_s: float
    latency_ms: dict[str, float]  # p50/p90/p99/mean of one run() call
    #: CPU time of this process (all threads: onnxruntime's and the caller's) per image.
    cpu_ms_per_image: float | None = None


@dataclasses.dataclass(frozen=True)
class Ceiling:
    model: str
    provider: str
    intra_op_threads: int
    points: list[BatchPoint]

    @property
    def best(self) -> BatchPoint:
        return max(self.points, key=lambda p: p.images_per_s)

    @property
    def images_per_s(self) -> float:
        return self.best.images_per_s

    @property
    def batch1_latency_ms(self) -> float:
        return next(p for p in self.points if p.batch_size == 1).latency_ms["p50"]


def best_of(passes: list[Ceiling]) -> Ceiling:
    """Per batch size, the faster of several passes: the ceiling is what onnxruntime *can* do here.

    Keeping the best pass is the conservative choice for a served/ceiling
    ratio (and for the batch-1 latency floor) on a machine others share.
    """
    points = []
    for group in zip(*(c.points for c in passes), strict=True):
        points.append(max(group, key=lambda p: p.images_per_s))
    first = passes[0]
    return Ceiling(
        model=first.model, provider=first.provider, intra_op_threads=first.intra_op_threads, points=points
    )


def batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to and including ``max_batch_size`` (even when it is no power of two)."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch_size)
    return sizes


def ready_batches(meta, sizes: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(size, a ready batch of the model's input: ``meta``'s shape and dtype) for each size, made as
    they are asked for (seeded)."""
    from service.engine.runtime import example_batch

    rng = np.random.default_rng(0)
    for b in sizes:
        yield b, example_batch(meta, b, rng)


def time_batch(
    run: Callable[[], object], batch_size: int, seconds: float, min_iterations: int = 5, warmup: int = 2
) -> BatchPoint:
    """``run()`` (one batch of ``batch_size``) back to back for about ``seconds`` after ``warmup`` calls
    (first runs at a new shape allocate)."""
    for _ in range(warmup):
        run()
    times = []
    cpu0 = time.process_time()
    start = time.perf_counter()
    while len(times) < min_iterations or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    cpu_s = time.process_time() - cpu0
    lat = np.asarray(times) * 1e3
    return BatchPoint(
        batch_size=batch_size,
        iterations=len(times),
        images_per_s=batch_size * len(times) / elapsed,
        latency_ms={**percentiles(lat), "mean": float(lat.mean())},
        cpu_ms_per_image=1e3 * cpu_s / (batch_size * len(times)),
    )


def measure(
    path: Path,
    *,
    model: str,
    seconds_per_batch: float,
    settings=None,
    min_iterations: int = 5,
) -> Ceiling:
    """Time the server's own session at each batch size for about ``seconds_per_batch`` after a warm-up.

    The session is ``service.engine.runtime.Session``, built from the model's
    ``ModelSettings`` exactly as ``svertka serve`` builds it (providers,
    intra-op threads, spinning, graph optimizations): only the server around
    it is missing.
    """
    from service import config
    from service.engine import runtime

    settings = settings or config.ModelSettings.load(Path(path).parent.parent)
    session = runtime.Session(path, settings)
    points = []
    for b, x in ready_batches(session.meta, batch_sizes(settings.max_batch_size)):
        points.append(time_batch(lambda x=x: session.run(x), b, seconds_per_batch, min_iterations))
    session.close()
    return Ceiling(model=model, provider=session.provider, intra_op_threads=session.threads, points=points)
