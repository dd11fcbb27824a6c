"""Clients that vanish mid-request or never read their answers: the server stays whole.

Both tests run a real ``svertka serve`` process and read its state the way an
operator would (the Prometheus gauges, ModelStatistics, resident memory).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc
import grpc.aio
import numpy as np
import psutil
import pytest

from service.gen.inference import grpc_service_pb2 as kpb
from service.gen.inference import grpc_service_pb2_grpc as kgrpc
from service.gen.svertka.v1 import classifier_pb2 as cpb
from service.gen.svertka.v1 import classifier_pb2_grpc as cgrpc
from tests.helpers import ROOT
from tests.helpers.tinymodel import make_repository
from tests.reliability import harness, hostile
from tests.reliability.slowmodel import make_slow_model

RSS_GROWTH_LIMIT_MB = 50


def test_a_request_cancelled_before_its_images_start_decoding_gives_its_queue_room_back(tmp_path):
    """Room reserved for images must come back when the caller vanishes at any moment.

    Regression: with the image tasks cancelled before their first step (a client killed right
    after sending), the reserved rows stayed counted forever; every such request shrank the
    queue for good (and a drain could never finish).
    """
    from service.engine.repository import ModelRepository
    from service.metrics import Metrics

    async def scenario() -> tuple[int, int]:
        manager = ModelRepository(make_repository(tmp_path / "repo", {"tiny": [1]}), Metrics())
        await manager.start()
        model = manager.get("tiny")
        try:
            task = asyncio.create_task(model.infer_images([hostile.png()] * 3))
            await asyncio.sleep(0)  # the request reserved its rows and handed the images to their tasks
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return model.batcher.queued_rows, model.in_flight
        finally:
            await manager.close()

    assert asyncio.run(scenario()) == (0, 0)


def _gauges(server, model: str) -> tuple[float, float]:
    m = harness.scrape(server.metrics_port)
    return (
        harness.sample(m, "svertka_in_flight_requests", model=model, version="1"),
        harness.sample(m, "svertka_queue_depth", model=model, version="1"),
    )


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("server_layout", harness.LAYOUTS)
def test_clients_killed_mid_request_leave_nothing_behind(tmp_path, server_layout):
    repo = tmp_path / "repo"
    make_slow_model(repo / "slow" / "1" / "model.onnx", matmuls=4)
    (repo / "slow" / "config.yaml").write_text("max_batch_size: 4\nmax_queue_size: 64\nintra_op_threads: 1\n")
    rss = []
    with harness.running_server(repo, tmp_path / "server.log", *harness.layout_args(server_layout)) as server:
        process = psutil.Process(server.proc.pid)
        for _round in range(3):
            client = subprocess.Popen(
                [sys.executable, "-m", "tests.reliability.noisy_client", server.address, "slow"],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            try:
                assert client.stdout.readline().strip() == "busy"
                # Kill it while the server holds its work: queued rows and requests in flight.
                harness.wait_until(lambda: _gauges(server, "slow")[1] > 0, what="the client's rows queued")
            finally:
                client.kill()
                client.wait(timeout=30)
            harness.wait_until(
                lambda: _gauges(server, "slow") == (0, 0), what="nothing left in flight or queued"
            )
            rss.append(harness.tree_rss(process.pid))
        metrics = harness.scrape(server.metrics_port)
        with grpc.insecure_channel(server.address) as channel:
            reply = kgrpc.GRPCInferenceServiceStub(channel).ModelInfer(
                harness.tensor_request(model="slow"), timeout=30
            )
        assert reply.model_name == "slow"
        assert server.health("slow") == 1  # SERVING
    # The vanished clients' queued rows were dropped, not computed.
    assert (
        harness.sample(metrics, "svertka_rejections_total", model="slow", version="1", reason="cancelled") > 0
    )
    growth_mb = (rss[-1] - rss[0]) / 2**20
    harness.record_figures(
        "killed_clients",
        rounds=3,
        cancelled_before_compute=int(
            harness.sample(metrics, "svertka_rejections_total", model="slow", version="1", reason="cancelled")
        ),
        rss_growth_round1_to_3_mb=round(growth_mb, 1),
    )
    assert growth_mb < RSS_GROWTH_LIMIT_MB


async def _never_read_while_others_are_served(address: str, pid: int, requests: int) -> dict:
    """One stream writes ``requests`` requests and reads nothing; another client meanwhile gets served."""
    process = psutil.Process(pid)
    rss_before = harness.tree_rss(process.pid)
    image = hostile.png(1, 1)
    good_latencies: list[float] = []
    async with (
        grpc.aio.insecure_channel(address) as hostile_channel,
        grpc.aio.insecure_channel(address) as good,
    ):
        call = cgrpc.ImageClassifierStub(hostile_channel).ClassifyStream(timeout=600)
        tensor_api = kgrpc.GRPCInferenceServiceStub(good)
        x = np.full((1, 3, 32, 32), 0.5, np.float32)

        async def writer() -> None:
            for i in range(requests):
                await call.write(cpb.ClassifyRequest(model="tiny", image=image, id=str(i)))

        async def well_behaved() -> None:
            loop = asyncio.get_running_loop()
            while True:
                start = loop.time()
                await tensor_api.ModelInfer(harness.tensor_request(x, model="tiny"), timeout=30)
                good_latencies.append(loop.time() - start)

        writing = asyncio.create_task(writer())
        serving = asyncio.create_task(well_behaved())
        peak = rss_before
        handled = 0
        give_up = time.monotonic() + 300
        while handled < requests // 2 and not serving.done() and time.monotonic() < give_up:
            await asyncio.sleep(0.25)
            peak = max(peak, harness.tree_rss(process.pid))
            stats = await tensor_api.ModelStatistics(kpb.ModelStatisticsRequest(name="tiny"), timeout=10)
            handled = stats.model_stats[0].inference_stats.success.count
        if serving.done():
            serving.result()  # the well-behaved client failed: raise its error
        call.cancel()
        writing.cancel()
        serving.cancel()
        await asyncio.gather(writing, serving, return_exceptions=True)
    assert handled >= requests // 2, f"only {handled} of {requests // 2} requests were answered in 300 s"
    return {
        "rss_growth_peak_mb": round((peak - rss_before) / 2**20, 1),
        "handled_for_the_silent_stream": handled,
        "well_behaved_answers": len(good_latencies),
        "well_behaved_p50_ms": round(harness.percentile(good_latencies, 50) * 1000, 1),
    }


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("server_layout", harness.LAYOUTS)
def test_a_stream_that_never_reads_its_answers_cannot_grow_the_server(tmp_path, server_layout):
    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    with harness.running_server(repo, tmp_path / "server.log", *harness.layout_args(server_layout)) as server:
        figures = asyncio.run(_never_read_while_others_are_served(server.address, server.proc.pid, 20_000))
        harness.wait_until(
            lambda: _gauges(server, "tiny") == (0, 0), what="the silent stream's work released"
        )
        assert server.health() == 1
    assert figures["well_behaved_answers"] > 50
    harness.record_figures("silent_stream", **figures)
    assert figures["rss_growth_peak_mb"] < RSS_GROWTH_LIMIT_MB
