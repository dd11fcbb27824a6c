"""svertka's own asyncio load generator: closed loop and open-loop Poisson arrivals over gRPC.

Two request kinds over one ``grpc.aio`` channel:

* ``image``: ``svertka.v1.ImageClassifier/Classify`` with real encoded JPEGs
  (the API applications use; decoding happens on the server);
* ``tensor``: ``inference.GRPCInferenceService/ModelInfer`` with one raw FP32
  image tensor, the same call perf_analyzer makes. svertka's stubs are
  wire-compatible with Triton, so the same client loads the peer too.

Open-loop latency is measured from each request's *scheduled* arrival time,
not from when the client got round to sending it: a client that falls behind
must not hide the server's queueing (coordinated omission).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

import grpc
import numpy as np

from bench.stats import percentiles
from service.gen.inference import grpc_service_pb2 as infer_pb
from service.gen.inference import grpc_service_pb2_grpc as infer_grpc
from service.gen.svertka.v1 import classifier_pb2 as cls_pb
from service.gen.svertka.v1 import classifier_pb2_grpc as cls_grpc

#: Per-call deadline: far above any latency of interest, low enough that a stuck run ends.
CALL_TIMEOUT_S = 30.0
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]

Call = Callable[[int], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """One load run. ``load`` is the concurrency (closed) or the offered rate in requests/s (poisson)."""

    kind: str
    mode: str
    load: float
    window_s: float
    completed: int
    errors: dict[str, int]
    images_per_s: float
    latency_ms: dict[str, float]
    dropped: int = 0  # poisson only: arrivals not sent because max_in_flight requests were pending

    @property
    def ok(self) -> bool:
        return not self.errors and not self.dropped and self.completed > 0


def image_caller(channel: grpc.aio.Channel, model: str, images: Sequence[bytes]) -> Call:
    """Classify one of ``images`` (round robin) per call; top-1 only, as a throughput client would ask."""
    stub = cls_grpc.ImageClassifierStub(channel)
    requests = [cls_pb.ClassifyRequest(model=model, image=data, top_k=1) for data in images]

    async def call(i: int) -> None:
        await stub.Classify(requests[i % len(requests)], timeout=CALL_TIMEOUT_S)

    return call


async def tensor_caller(channel: grpc.aio.Channel, model: str, *, seed: int = 0) -> Call:
    """ModelInfer with one random FP32 image as raw contents; shape and names from ModelMetadata."""
    stub = infer_grpc.GRPCInferenceServiceStub(channel)
    meta = await stub.ModelMetadata(infer_pb.ModelMetadataRequest(name=model), timeout=CALL_TIMEOUT_S)
    (inp,) = meta.inputs
    shape = [1, *(int(d) for d in inp.shape[1:])]
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(4):
        x = rng.standard_normal(shape, dtype=np.float32)
        requests.append(
            infer_pb.ModelInferRequest(
                model_name=model,
                inputs=[
                    infer_pb.ModelInferRequest.InferInputTensor(name=inp.name, datatype="FP32", shape=shape)
                ],
                raw_input_contents=[x.tobytes()],
            )
        )

    async def call(i: int) -> None:
        await stub.ModelInfer(requests[i % len(requests)], timeout=CALL_TIMEOUT_S)

    return call


def channel(url: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(url, options=CHANNEL_OPTIONS)


async def closed_loop(
    call: Call, *, concurrency: int, duration_s: float, warmup_s: float, kind: str = ""
) -> LoadResult:
    """``concurrency`` workers, each sending its next request as soon as the previous one answered."""
    counter = itertools.count()
    t_start = time.perf_counter() + warmup_s
    t_end = t_start + duration_s
    done: list[tuple[float, float]] = []
    errors: Counter[str] = Counter()

    async def worker() -> None:
        while (t0 := time.perf_counter()) < t_end:
            try:
                await call(next(counter))
            except grpc.aio.AioRpcError as exc:
                if t0 >= t_start:
                    errors[exc.code().name] += 1
                continue
            done.append((t0, time.perf_counter()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    in_window = [t1 - t0 for t0, t1 in done if t0 >= t_start and t1 <= t_end]
    finished = sum(1 for _, t1 in done if t_start <= t1 <= t_end)
    return LoadResult(
        kind=kind,
        mode="closed",
        load=concurrency,
        window_s=duration_s,
        completed=len(in_window),
        errors=dict(errors),
        images_per_s=finished / duration_s,
        latency_ms=percentiles(np.asarray(in_window) * 1e3),
    )


async def image_closed_loop(
    url: str, model: str, images: Sequence[bytes], *, concurrency: int, duration_s: float, warmup_s: float
) -> LoadResult:
    """:func:`closed_loop` of image requests (:func:`image_caller`) on a channel of its own."""
    ch = channel(url)
    try:
        call = image_caller(ch, model, images)
        return await closed_loop(call, concurrency=concurrency, duration_s=duration_s, warmup_s=warmup_s)
    finally:
        await ch.close()


async def poisson(
    call: Call,
    *,
    rate: float,
    duration_s: float,
    warmup_s: float,
    seed: int = 0,
    max_in_flight: int = 1024,
    kind: str = "",
) -> LoadResult:
    """Requests arrive as a Poisson process at ``rate``/s, whether or not earlier ones have answered."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    t_start, t_end = t0 + warmup_s, t0 + warmup_s + duration_s
    latencies: list[float] = []
    finished_in_window = 0
    errors: Counter[str] = Counter()
    dropped = 0
    pending: set[asyncio.Task] = set()

    async def one(i: int, scheduled: float) -> None:
        nonlocal finished_in_window
        try:
            await call(i)
        except grpc.aio.AioRpcError as exc:
            if scheduled >= t_start:
                errors[exc.code().name] += 1
            return
        t1 = time.perf_counter()
        if t_start <= t1 <= t_end:
            finished_in_window += 1
        if scheduled >= t_start:
            latencies.append(t1 - scheduled)

    arrival = t0
    for i in itertools.count():
        arrival += rng.exponential(1.0 / rate)
        if arrival >= t_end:
            break
        delay = arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(pending) >= max_in_flight:
            dropped += arrival >= t_start
            continue
        task = asyncio.create_task(one(i, arrival))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=CALL_TIMEOUT_S + 5)
    return LoadResult(
        kind=kind,
        mode="poisson",
        load=rate,
        window_s=duration_s,
        completed=len(latencies),
        errors=dict(errors),
        images_per_s=finished_in_window / duration_s,
        latency_ms=percentiles(np.asarray(latencies) * 1e3),
        dropped=dropped,
    )


@dataclasses.dataclass(frozen=True)
class RateSearch:
    """Highest Poisson rate found with p99 under the bound, and every rate tried on the way."""

    bound_ms: float
    best_rate: float | None
    best: LoadResult | None
    tried: list[LoadResult]


async def latency_bounded_rate(
    call: Call,
    *,
    bound_ms: float,
    start_rate: float,
    duration_s: float,
    warmup_s: float,
    steps: int,
    kind: str = "",
    log: Callable[[str], None] = print,
) -> RateSearch:
    """The MLPerf server-scenario question: how fast may requests arrive with p99 < ``bound_ms``?

    Doubles/halves from ``start_rate`` to bracket the answer, then bisects for
    the remaining steps. A rate passes when every request succeeded and p99 is
    under the bound.
    """
    tried: list[LoadResult] = []

    async def passes(rate: float) -> bool:
        result = await poisson(call, rate=rate, duration_s=duration_s, warmup_s=warmup_s, kind=kind)
        tried.append(result)
        good = result.ok and result.latency_ms["p99"] < bound_ms
        log(
            f"  poisson {rate:7.1f}/s: p99 {result.latency_ms['p99']:7.1f} ms, served {result.images_per_s:6.1f}/s"
            f"{'' if not result.errors else f', errors {result.errors}'} -> {'pass' if good else 'fail'}"
        )
        return good

    lo: float | None = None  # highest passing rate so far
    hi: float | None = None  # lowest failing rate so far
    rate = start_rate
    for _ in range(steps):
        if await passes(rate):
            lo = rate
        else:
            hi = rate
        if hi is None:
            rate = lo * 2
        elif lo is None:
            rate = hi / 2
        else:
            rate = (lo + hi) / 2
    passing = [r for r in tried if r.ok and r.latency_ms["p99"] < bound_ms]
    best = max(passing, key=lambda r: r.load, default=None)
    return RateSearch(bound_ms, best.load if best else None, best, tried)
