"""Engine benchmark: the batching policy and onnxruntime's thread spinning, in process, no gRPC.

Backs docs/engine.md, "Batching policy" (dispatch when idle against waiting
``max_queue_delay``) and "Thread budget" (``intra_op_spinning`` on the image
API), the policy in ``service/engine/batching.py``'s docstring, and finding 9 in
bench/findings.md (docs/benchmarks.md, "Findings"). Closed-loop callers call
``ServedModel.infer_tensor`` (one row each) or ``infer_images`` (one JPEG each)
for a few seconds; prints throughput and latency percentiles. ::

    .venv/bin/python -m bench.research.engine_batching --repository DIR --model NAME [--seconds 3]
    .venv/bin/python -m bench.research.engine_batching --repository DIR --model NAME --what spinning --spinning-order off on

``DIR`` is any svertka repository (``make model`` builds models/;
``python -m bench.research.engine_models`` the ones the recorded numbers used).
``--what spinning`` serves a copy of the model whose settings file sets
``intra_op_spinning`` (``bench.research.experiments.with_settings``), one per
entry of ``--spinning-order``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

from bench.research import experiments
from service.engine.repository import ModelRepository
from service.metrics import Metrics


async def closed_loop(call, concurrency: int, seconds: float) -> tuple[float, float, float, int]:
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < stop:
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    lat = np.array(latencies) * 1000
    return (
        len(latencies) / elapsed,
        float(np.percentile(lat, 50)),
        float(np.percentile(lat, 99)),
        len(latencies),
    )


def photo_jpeg() -> bytes:
    image = Image.fromarray(skdata.coffee()).resize((1024, 768), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


async def bench_policy(args) -> None:
    manager = ModelRepository(args.repository, Metrics(process_metrics=False, gpu_metrics=False))
    await manager.start()
    model = manager.get(args.model)
    x = np.random.default_rng(0).standard_normal((1, *model.meta.input_shape), dtype=np.float32)
    print(f"model {args.model}: provider {model.provider}, {model.threads_per_instance} threads")
    print("policy               conc   req/s    p50 ms   p99 ms   rows/batch")
    for concurrency in args.concurrency:
        for idle_dispatch in (True, False):
            model.batcher.dispatch_when_idle = idle_dispatch
            before = await model.statistics()
            rps, p50, p99, _ = await closed_loop(lambda: model.infer_tensor(x), concurrency, args.seconds)
            after = await model.statistics()
            rows = after.inference_count - before.inference_count
            batches = after.execution_count - before.execution_count
            name = "dispatch when idle" if idle_dispatch else f"wait {model.settings.max_queue_delay_ms:g} ms"
            print(
                f"{name:20s} {concurrency:4d} {rps:8.1f} {p50:8.2f} {p99:8.2f} {rows / max(batches, 1):8.2f}"
            )
    await manager.close()


async def bench_spinning(args) -> None:
    jpeg = photo_jpeg()
    print("intra-op spinning   api     conc   req/s    p50 ms   p99 ms   CPU ms/req")
    work = Path(tempfile.mkdtemp(prefix="engine-batching-"))
    for spinning in args.spinning_order:
        repository = experiments.with_settings(
            Path(args.repository), args.model, work / f"spinning-{spinning}", {"intra_op_spinning": spinning}
        )
        manager = ModelRepository(repository, Metrics(process_metrics=False, gpu_metrics=False))
        await manager.start()
        model = manager.get(args.model)
        for concurrency in args.concurrency:
            cpu = time.process_time()  # all threads of this process: spinning shows up here
            rps, p50, p99, count = await closed_loop(
                lambda m=model: m.infer_images([jpeg]), concurrency, args.seconds
            )
            cpu_ms = (time.process_time() - cpu) * 1000 / max(count, 1)
            print(
                f"{str(spinning):19s} image  {concurrency:4d} {rps:8.1f} {p50:8.2f} {p99:8.2f} {cpu_ms:10.2f}"
            )
        await manager.close()
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--what", choices=["policy", "spinning"], default="policy")
    parser.add_argument(
        "--spinning-order", type=lambda v: v == "on", nargs="+", default=[False, True], metavar="on|off"
    )
    args = parser.parse_args()
    asyncio.run(bench_policy(args) if args.what == "policy" else bench_spinning(args))


if __name__ == "__main__":
    main()
