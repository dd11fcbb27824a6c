"""A client process that keeps many requests in flight until it is killed (tests/reliability only).

``python -m tests.reliability.noisy_client HOST:PORT MODEL`` opens image and
tensor streams and unary calls, prints "busy" once answers flow, and never
stops on its own: the test kills it with SIGKILL, so the server sees
connections vanish with requests queued, computing and half-sent.
"""

from __future__ import annotations

import asyncio
import sys

import grpc.aio
import numpy as np

from service.gen.inference import grpc_service_pb2_grpc as kgrpc
from service.gen.svertka.v1 import classifier_pb2 as cpb
from service.gen.svertka.v1 import classifier_pb2_grpc as cgrpc
from tests.reliability.harness import tensor_request
from tests.reliability.hostile import png


async def _unary(channel, model: str, answered: asyncio.Event) -> None:
    stub = kgrpc.GRPCInferenceServiceStub(channel)
    x = np.full((1, 3, 32, 32), 0.5, np.float32)
    while True:
        await stub.ModelInfer(tensor_request(x, model=model), timeout=60)
        answered.set()


async def _stream(channel, model: str) -> None:
    call = cgrpc.ImageClassifierStub(channel).ClassifyStream(timeout=600)
    image = png(40, 40)
    n = 0
    while True:  # writes without waiting for answers; reads them now and then
        await call.write(cpb.ClassifyRequest(model=model, image=image, id=str(n)))
        n += 1
        if n % 8 == 0:
            await call.read()


async def main(address: str, model: str) -> None:
    answered = asyncio.Event()
    async with grpc.aio.insecure_channel(address) as channel:
        tasks = [asyncio.create_task(_unary(channel, model, answered)) for _ in range(16)]
        tasks += [asyncio.create_task(_stream(channel, model)) for _ in range(4)]
        await answered.wait()
        print("busy", flush=True)
        await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
