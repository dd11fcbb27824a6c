"""Sustained load over both APIs: nothing fails but the deliberate errors, memory stays flat."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import grpc
import numpy as np
import psutil
import pytest

from tests.api import images
from tests.api.images import preprocess, softmax
from tests.helpers.tinymodel import make_repository
from tests.reliability import harness
from tests.reliability.load import KINDS, Workload, run_load

pytestmark = pytest.mark.integration

WARMUP_REQUESTS = 2_000
#: 20,000 in ``make test``; set SVERTKA_LOAD_REQUESTS for a longer soak (docs/reliability.md).
REQUESTS = int(os.environ.get("SVERTKA_LOAD_REQUESTS", "20000"))
CONCURRENCY = 32
#: Resident memory may grow by less than this after warm-up (issue 6).
RSS_GROWTH_LIMIT_MB = 50


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    """(repository, model name): the bundled digits model when built (``make model``), else the tiny one."""
    if harness.default_model_path().is_file():
        return harness.DEFAULT_REPOSITORY, harness.DEFAULT_MODEL
    return make_repository(tmp_path_factory.mktemp("repo"), {"tiny": [1]}), "tiny"


def _workload(repository, name) -> Workload:
    path = repository / name / "1" / "model.onnx"
    encoded = [images.png(seed) for seed in range(6)] + [images.jpeg(seed) for seed in range(6)]
    batch = np.stack([preprocess(repository, name, 1, data) for data in encoded])
    image_softmax = softmax(harness.offline_logits(path, batch).astype(np.float64))
    c, h, w = batch.shape[1:]
    tensors = np.random.default_rng(0).standard_normal((8, c, h, w), dtype=np.float32)
    return Workload(name, encoded, image_softmax, tensors, harness.offline_logits(path, tensors))


class _RssSampler:
    """Samples the server's resident memory every 200 ms on a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        value = harness.tree_rss(self.process.pid)
        self.peak = max(self.peak, value)
        return value

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.rss()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
@pytest.mark.parametrize("server_layout", harness.LAYOUTS)
def test_sustained_load_over_both_apis_loses_nothing_and_memory_stays_flat(
    default_model, tmp_path, server_layout
):
    repository, name = default_model
    workload = _workload(repository, name)
    with harness.running_server(
        repository, tmp_path / "server.log", *harness.layout_args(server_layout)
    ) as server:
        with _RssSampler(server.proc.pid) as rss:
            rss_start = rss.rss()
            warm = asyncio.run(
                run_load(server.address, workload, total=WARMUP_REQUESTS, concurrency=CONCURRENCY)
            )
            rss_warm = rss.rss()
            started = time.perf_counter()
            tally = asyncio.run(run_load(server.address, workload, total=REQUESTS, concurrency=CONCURRENCY))
            elapsed = time.perf_counter() - started
            rss_end = rss.rss()
        with grpc.insecure_channel(server.address) as channel:
            stats = harness.model_stats(channel, name)
        metrics = harness.scrape(server.metrics_port)

    for t in (warm, tally):
        assert not t.unexpected, t.unexpected[:10]
        assert not t.wrong_answers, t.wrong_answers[:10]
    assert tally.sent == REQUESTS
    ok = sum(n for (kind, code), n in tally.codes.items() if code == "OK")
    deliberate = sum(tally.deliberate.values())
    assert ok + deliberate == REQUESTS and deliberate == len(range(0, REQUESTS, 97))
    # Every kind carried load; the server counted what the clients saw (warm-up included).
    per_kind = {kind: tally.codes[(kind, "OK")] for kind in KINDS}
    assert all(n > REQUESTS // 10 for n in per_kind.values()), per_kind
    assert stats.inference_stats.success.count == ok + sum(n for (_, c), n in warm.codes.items() if c == "OK")
    assert stats.execution_count < stats.inference_count  # concurrent requests were batched
    assert harness.sample(metrics, "svertka_queue_depth", model=name, version="1") == 0
    growth_mb = (rss_end - rss_warm) / 2**20
    harness.record_figures(
        "sustained_load",
        model=name,
        requests=REQUESTS,
        concurrency=CONCURRENCY,
        ok_by_kind=per_kind,
        deliberate_errors=deliberate,
        other_errors=len(tally.unexpected),
        seconds=round(elapsed, 1),
        requests_per_s=round(REQUESTS / elapsed, 1),
        latency_p50_ms=round(harness.percentile(tally.latencies_s, 50) * 1000, 2),
        latency_p99_ms=round(harness.percentile(tally.latencies_s, 99) * 1000, 2),
        rows_per_batch=round(stats.inference_count / stats.execution_count, 2),
        rss_start_mb=round(rss_start / 2**20, 1),
        rss_after_warmup_mb=round(rss_warm / 2**20, 1),
        rss_end_mb=round(rss_end / 2**20, 1),
        rss_peak_mb=round(rss.peak / 2**20, 1),
        rss_growth_after_warmup_mb=round(growth_mb, 1),
    )
    assert growth_mb < RSS_GROWTH_LIMIT_MB
