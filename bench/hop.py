"""What one batch's trip to its instance thread and back costs: ``run_in_executor`` against svertka's worker.

Every batch is computed in its instance's thread and its result handed back to
the event loop; on the null model and the small digits models that round trip
is a large share of a request. This times the round trip alone (a run
function that returns its input at once), both ways, alternating, and prints
microseconds of wall and process CPU time per batch (best of the repeats).

``python -m bench.hop [--batches N] [--repeats R]``
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import sys
import time

import numpy as np

from service import batching


def _identity(batch: np.ndarray) -> np.ndarray:
    return batch


async def _time(hop, batches: int) -> tuple[float, float]:
    arrays = [np.zeros((1, 4), np.float32)]
    for _ in range(200):
        await hop(arrays)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        await hop(arrays)
    return (time.perf_counter() - wall) / batches * 1e6, (time.process_time() - cpu) / batches * 1e6


async def main_async(batches: int, repeats: int) -> dict[str, tuple[float, float]]:
    loop = asyncio.get_running_loop()
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    worker = batching._Worker(_identity, "hop-bench")

    async def via_executor(arrays):
        return await loop.run_in_executor(executor, batching._compute, _identity, arrays)

    async def via_worker(arrays):
        return await worker.submit(loop, arrays)

    results: dict[str, list[tuple[float, float]]] = {"run_in_executor": [], "svertka worker": []}
    try:
        for _ in range(repeats):
            results["run_in_executor"].append(await _time(via_executor, batches))
            results["svertka worker"].append(await _time(via_worker, batches))
    finally:
        executor.shutdown()
        worker.stop()
    return {name: min(runs) for name, runs in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hop", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    for name, (wall, cpu) in asyncio.run(main_async(args.batches, args.repeats)).items():
        print(f"{name:16s} {wall:6.1f} us wall  {cpu:6.1f} us CPU per batch round trip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
