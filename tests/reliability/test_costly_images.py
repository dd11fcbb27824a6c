"""Images that are cheap to send and costly to decode do not stall other clients (issue 15, item 4).

A real ``svertka serve`` process with the default models (the tiny test model
when ``models/digits`` is not built). Well-behaved clients, one on each API
(a 1 KB PNG through ``Classify``, a tensor through ``ModelInfer``), run
alone for a while, then alongside four hostile clients (another process,
``tests/reliability/costly_client.py``) that keep sending every construction
from ``tests/helpers/costly_images.py``: before the
pre-scan (``service/imagescan.py``) one of them cost Pillow up to 4.9 s of
Python holding the GIL, or 160 MB and more of decoded pixels. Every good
request must succeed and every hostile one must be refused with
INVALID_ARGUMENT naming what was wrong. The latencies are printed and
recorded (``build/reliability/costly_images.json``), never asserted.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys

import grpc
import grpc.aio
import numpy as np
import psutil
import pytest
from PIL import Image

from service.gen.inference import grpc_service_pb2_grpc as kgrpc
from service.gen.svertka.v1 import classifier_pb2 as cpb
from service.gen.svertka.v1 import classifier_pb2_grpc as cgrpc
from tests.helpers import ROOT
from tests.helpers import costly_images as costly
from tests.helpers.tinymodel import make_repository
from tests.reliability import costly_client, harness

pytestmark = pytest.mark.integration

BASELINE_S = 2.0
HOSTILE_CLIENTS = 4
ROUNDS = 5  # each hostile client sends every construction this many times
#: The server's resident memory may not grow by more than this while refusing them: 8 decoded
#: 6300x6300 WebPs added 1.05 GB before the fix. What it does grow by is mostly the hostile messages
#: themselves (21 MB a round, 4 clients at once), received and copied by gRPC and Python.
RSS_GROWTH_LIMIT_MB = 400


def _good_png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(costly.noise(8, 8).resize((size, size)))).save(buf, "PNG")
    return buf.getvalue()


def _latencies(values) -> dict:
    return {"n": len(values), "p50_ms": _ms(values, 50), "p99_ms": _ms(values, 99)}


def _ms(values: list[float], q: float) -> float:
    return round(harness.percentile(values, q) * 1000, 1)


async def _scenario(address: str, pid: int, model: str, size: int) -> dict:
    process = psutil.Process(pid)
    good_image = _good_png(size)
    tensor = harness.tensor_request(model=model, size=size)
    attack = asyncio.Event()
    stop = asyncio.Event()
    phase: dict[str, dict[str, list[float]]] = {
        "alone": {"image": [], "tensor": []},
        "attacked": {"image": [], "tensor": []},
    }
    rss = [harness.tree_rss(process.pid)]

    async with grpc.aio.insecure_channel(address) as channel:
        images = cgrpc.ImageClassifierStub(channel)
        tensors = kgrpc.GRPCInferenceServiceStub(channel)
        loop = asyncio.get_running_loop()

        async def good(kind: str) -> None:
            while not stop.is_set():
                start = loop.time()
                if kind == "image":
                    reply = await images.Classify(
                        cpb.ClassifyRequest(model=model, image=good_image, top_k=1), timeout=60
                    )
                    assert reply.predictions
                else:
                    await tensors.ModelInfer(tensor, timeout=60)
                took = loop.time() - start
                phase["attacked" if attack.is_set() else "alone"][kind].append(took)

        async def watch_rss() -> None:
            while not stop.is_set():
                rss.append(harness.tree_rss(process.pid))
                await asyncio.sleep(0.05)

        attacker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.reliability.costly_client",
            address,
            model,
            str(HOSTILE_CLIENTS),
            str(ROUNDS),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert (await attacker.stdout.readline()).strip() == b"ready"  # its images are built
            goods = [asyncio.create_task(good("image")), asyncio.create_task(good("tensor"))]
            watcher = asyncio.create_task(watch_rss())
            await asyncio.sleep(BASELINE_S)
            rss_before = harness.tree_rss(process.pid)
            attack.set()
            attacker.stdin.write(b"go\n")
            await attacker.stdin.drain()
            result = json.loads(await attacker.stdout.readline())
            assert await attacker.wait() == 0
        finally:
            if attacker.returncode is None:
                attacker.kill()
                await attacker.wait()
        stop.set()
        await asyncio.gather(*goods, watcher)  # a failed good request raises here

    refusals = result["refusals_s"]
    alone, attacked = phase["alone"], phase["attacked"]
    return {
        "hostile_requests": result["sent"],
        "hostile_refused_invalid_argument": len(refusals),
        "wrong": result["wrong"],
        "hostile_bytes_per_round": result["bytes_per_round"],
        "refusal_p50_ms": _ms(refusals, 50),
        "refusal_max_ms": _ms(refusals, 100),
        "good_image_alone": _latencies(alone["image"]),
        "good_tensor_alone": _latencies(alone["tensor"]),
        "good_image_attacked": {**_latencies(attacked["image"]), "max_ms": _ms(attacked["image"], 100)},
        "good_tensor_attacked": {**_latencies(attacked["tensor"]), "max_ms": _ms(attacked["tensor"], 100)},
        "rss_growth_peak_mb": round((max(rss) - rss_before) / 2**20, 1),
    }


@pytest.mark.slow
@pytest.mark.parametrize("server_layout", harness.LAYOUTS)
def test_costly_images_are_refused_while_other_clients_are_served(tmp_path, server_layout):
    if harness.default_model_path().is_file():
        repository, model, size = harness.DEFAULT_REPOSITORY, harness.DEFAULT_MODEL, 32
    else:
        repository, model, size = make_repository(tmp_path / "repo", {"tiny": [1]}), "tiny", 32
    with harness.running_server(
        repository, tmp_path / "server.log", *harness.layout_args(server_layout)
    ) as server:
        figures = asyncio.run(_scenario(server.address, server.proc.pid, model, size))
        assert server.health() == 1  # SERVING
    figures["model"] = model
    harness.record_figures("costly_images", **figures)
    assert figures["wrong"] == []
    expected = HOSTILE_CLIENTS * ROUNDS * len(costly_client.hostile_images())
    assert figures["hostile_requests"] == figures["hostile_refused_invalid_argument"] == expected
    assert figures["good_image_attacked"]["n"] > 0 and figures["good_tensor_attacked"]["n"] > 0
    assert figures["rss_growth_peak_mb"] < RSS_GROWTH_LIMIT_MB
