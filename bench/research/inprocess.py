"""svertka's own per-request cost, without gRPC: ModelInfer called in process on the null model.

Backs findings 3, 10 (garbage-collector pauses ruled out) and 26 (the
in-process part of a request) in bench/findings.md (docs/benchmarks.md, "Findings").

The servicer, the model manager, the batcher and its instance thread, the
metrics: everything a request goes through in ``svertka serve`` except the
gRPC transport, with one 224x224 FP32 request (588 KiB, parsed from its wire
form as the server would get it) awaited back to back. Prints wall and process
CPU time per request for each repeat; run it under ``py-spy record`` to see
where the time goes. It also prints the garbage collector's pauses over the
measured requests (``gc.callbacks``: collections per generation, their total
and longest time), the pauses every request in the process waits for.

``python -m bench.research.inprocess [--requests N] [--repeats R]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
import time
from pathlib import Path

import numpy as np

WORK = Path(__file__).resolve().parents[2] / ".bench"


class _Context:
    """What the tensor API reads from a grpc.aio ServicerContext on the success path; a refusal's status."""

    status: tuple = ()

    def set_code(self, code) -> None:
        self.status = (code, *self.status[1:])

    def set_details(self, details: str) -> None:
        self.status = (*self.status[:1], details)

    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:0"


class GcPauses:
    """Collections per generation and their durations, from ``gc.callbacks``, while installed."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._started = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._started)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self, requests: int) -> str:
        parts = []
        for gen, times in self.pauses.items():
            if times:
                parts.append(f"gen{gen}: {len(times)} ({1e6 * sum(times) / requests:.1f} us/request, "
                             f"longest {1e3 * max(times):.2f} ms)")  # fmt: skip
            else:
                parts.append(f"gen{gen}: 0")
        return "gc " + ", ".join(parts)


async def measure(requests: int, repeats: int) -> list[tuple[float, float, str]]:
    from bench import models, target
    from service.api.inference import InferenceServicer
    from service.api.state import ServerState
    from service.config import ServerConfig
    from service.gen.inference import grpc_service_pb2 as pb
    from service.metrics import Metrics
    from service.server import build_engine

    null = models.null_model(WORK / "models")
    repo = target.single_model_repository(null.path, null.name, WORK / "inprocess" / "repos")
    metrics = Metrics()
    # The engine as ``svertka serve`` builds it (server defaults), without the gRPC server around it.
    manager = build_engine(ServerConfig(model_repository=repo), metrics)
    await manager.start()
    state = ServerState()
    state.started = True
    servicer = InferenceServicer(manager, state, metrics)
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    request = pb.ModelInferRequest(model_name=null.name)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    request = pb.ModelInferRequest.FromString(request.SerializeToString())
    context = _Context()
    try:
        for _ in range(200):
            reply = await servicer.ModelInfer(request, context)
        # A refusal sets its status on the context and returns an empty reply: time answers only.
        if len(reply.raw_output_contents) != 1 or len(reply.raw_output_contents[0]) != 4 * 1000:
            raise RuntimeError(f"ModelInfer did not answer 1000 logits: {context.status}")
        runs = []
        for _ in range(repeats):
            with GcPauses() as pauses:
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(requests):
                    await servicer.ModelInfer(request, context)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            runs.append((wall / requests * 1e6, cpu / requests * 1e6, pauses.summary(requests)))
        return runs
    finally:
        await manager.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.research.inprocess", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    logging.disable(logging.INFO)
    for wall, cpu, pauses in asyncio.run(measure(args.requests, args.repeats)):
        print(f"{wall:6.0f} us wall  {cpu:6.0f} us CPU per request  {pauses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
