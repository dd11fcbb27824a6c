"""What the batcher costs per request, apart from the model: the hop to the instance thread and the rest.

Backs finding 12 in bench/findings.md (docs/benchmarks.md, "Findings"), the
instance run threads in docs/engine.md ("Thread budget" table, and the hop in
"Batching policy"), and the choice of a queue over ``run_in_executor`` in the
batcher's worker (``service/engine/batch_run.py``).

Every batch is computed in its instance's thread and its result handed back to
the event loop; on the null model and the small digits models that is a large
share of a request. With a run function that returns its input at once, this
times, alternating, best of the repeats:

* the round trip alone, ``run_in_executor`` against svertka's worker thread;
* ``Batcher.submit`` end to end, one caller (concurrency 1) and eight callers
  (requests per second and CPU per request), for this checkout's
  ``service/engine/batching.py`` and, with ``--baseline FILE``, for another version of
  it (e.g. ``git show REV:service/engine/batching.py > /tmp/batching_before.py``).

``python -m bench.research.hop [--batches N] [--repeats R] [--baseline FILE]``
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

from service.engine import batch_run, batching


def _identity(batch: np.ndarray) -> np.ndarray:
    return batch


async def _time(call, batches: int) -> tuple[float, float]:
    for _ in range(200):
        await call()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        await call()
    return (time.perf_counter() - wall) / batches * 1e6, (time.process_time() - cpu) / batches * 1e6


async def _closed_loop(submit, callers: int, seconds: float) -> tuple[float, float]:
    """(requests per second, CPU microseconds per request) with ``callers`` awaiting back to back."""
    stop = time.perf_counter() + seconds

    async def caller() -> int:
        done = 0
        while time.perf_counter() < stop:
            await submit()
            done += 1
        return done

    cpu = time.process_time()
    done = sum(await asyncio.gather(*(caller() for _ in range(callers))))
    return done / seconds, (time.process_time() - cpu) / done * 1e6


def _load_batching(path: Path):
    spec = importlib.util.spec_from_file_location("batching_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


async def main_async(batches: int, repeats: int, baseline: Path | None) -> None:
    loop = asyncio.get_running_loop()
    x = np.zeros((1, 4), np.float32)

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    worker = batch_run.Worker(_identity, "hop-bench")
    hops: dict[str, list[tuple[float, float]]] = {"run_in_executor": [], "svertka worker": []}
    try:
        for _ in range(repeats):
            hops["run_in_executor"].append(
                await _time(
                    lambda: loop.run_in_executor(executor, batch_run.compute, _identity, [x]), batches
                )
            )
            hops["svertka worker"].append(await _time(lambda: worker.submit(loop, [x]), batches))
    finally:
        executor.shutdown()
        worker.stop()
    for name, runs in hops.items():
        wall, cpu = min(runs)
        print(f"round trip  {name:16s} {wall:6.1f} us wall  {cpu:6.1f} us CPU")

    versions = {"this checkout": batching}
    if baseline is not None:
        versions[f"baseline {baseline.name}"] = _load_batching(baseline)
    batchers = {
        name: module.Batcher([_identity], max_batch_size=8, max_queue_delay_s=0.002, max_queue_rows=64)
        for name, module in versions.items()
    }
    one: dict[str, list[tuple[float, float]]] = {name: [] for name in batchers}
    eight: dict[str, list[tuple[float, float]]] = {name: [] for name in batchers}
    try:
        for _ in range(repeats):
            for name, b in batchers.items():
                one[name].append(await _time(lambda b=b: b.submit(x), batches))
                eight[name].append(await _closed_loop(lambda b=b: b.submit(x), 8, 1.0))
    finally:
        for b in batchers.values():
            await b.close()
    for name in batchers:
        wall, cpu = min(one[name])
        rate, per = max(eight[name])
        print(f"Batcher.submit  {name:24s} 1 caller: {wall:6.1f} us wall {cpu:6.1f} us CPU;  "
              f"8 callers: {rate:8.0f} req/s {per:5.1f} us CPU per request")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.research.hop", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", type=Path, default=None, metavar="FILE", help="another batching.py")
    args = parser.parse_args(argv)
    asyncio.run(main_async(args.batches, args.repeats, args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
