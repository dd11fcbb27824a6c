"""A closed-loop load generator over both APIs, checking every answer it gets.

``concurrency`` workers share one request counter; each worker speaks one of
four ways (image unary, image stream, tensor unary, tensor stream), so both
APIs and both call shapes carry the load at once. Every answer is checked
against the offline reference (the caller must get *its own* result), and a
fixed fraction of requests is deliberately malformed: those must fail with
INVALID_ARGUMENT and must not disturb anything else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter

import grpc
import grpc.aio
import numpy as np

from service.gen.inference import grpc_service_pb2 as kpb
from service.gen.inference import grpc_service_pb2_grpc as kgrpc
from service.gen.svertka.v1 import classifier_pb2 as cpb
from service.gen.svertka.v1 import classifier_pb2_grpc as cgrpc
from tests.reliability.harness import logits_of, tensor_request

KINDS = ("image_unary", "image_stream", "tensor_unary", "tensor_stream")
#: Every DELIBERATE_EVERY-th request is malformed on purpose.
DELIBERATE_EVERY = 97
#: Requests per stream before it is closed and a new one opened (a few seconds of traffic).
STREAM_REQUESTS = 200
#: Batched and single-row inference differ in the last bits (different kernels); answers must agree to this.
ATOL = 1e-4


@dataclasses.dataclass
class Workload:
    """What to send and what must come back."""

    model: str
    images: list[bytes]  # valid encoded images
    image_softmax: np.ndarray  # (len(images), classes): the offline answer per image
    tensors: np.ndarray  # (k, 3, H, W) valid inputs
    tensor_logits: np.ndarray  # (k, classes): the offline answer per tensor


@dataclasses.dataclass
class Tally:
    """Outcomes by (kind, status name), wrong answers, and latencies of good requests."""

    codes: Counter = dataclasses.field(default_factory=Counter)
    deliberate: Counter = dataclasses.field(default_factory=Counter)
    wrong_answers: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    latencies_s: list[float] = dataclasses.field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(self.codes.values()) + sum(self.deliberate.values())


class _Counter:
    def __init__(self, limit: int) -> None:
        self.next = 0
        self.limit = limit

    def take(self) -> int | None:
        if self.next >= self.limit:
            return None
        n = self.next
        self.next += 1
        return n


def _check_image(workload: Workload, index: int, response: cpb.ClassifyResponse) -> str | None:
    ref = workload.image_softmax[index]
    if not response.predictions:
        return f"image {index}: no predictions"
    for p in response.predictions:
        if abs(p.score - ref[p.index]) > ATOL:
            return f"image {index}: class {p.index} score {p.score} != offline {ref[p.index]}"
    if response.predictions[0].score < ref.max() - ATOL:
        return f"image {index}: top-1 {response.predictions[0].index} is not the offline top-1 {ref.argmax()}"
    return None


def _check_tensor(workload: Workload, index: int, response: kpb.ModelInferResponse) -> str | None:
    got = logits_of(response)[0]
    want = workload.tensor_logits[index]
    if not np.allclose(got, want, atol=ATOL, rtol=ATOL):
        return f"tensor {index}: max diff {np.abs(got - want).max()}"
    return None


def _image_request(workload: Workload, n: int) -> tuple[cpb.ClassifyRequest, int | None]:
    if n % DELIBERATE_EVERY == 0:
        return cpb.ClassifyRequest(
            model=workload.model, image=b"\x89PNG\r\n\x1a\n" + b"\0" * 40, id=str(n)
        ), None
    index = n % len(workload.images)
    return cpb.ClassifyRequest(model=workload.model, image=workload.images[index], top_k=3, id=str(n)), index


def _tensor_request(workload: Workload, n: int) -> tuple[kpb.ModelInferRequest, int | None]:
    index = n % len(workload.tensors)
    request = tensor_request(workload.tensors[index : index + 1], model=workload.model, rid=str(n))
    if n % DELIBERATE_EVERY == 0:
        request.raw_input_contents[0] = request.raw_input_contents[0][:-4]  # one float short
        return request, None
    return request, index


async def _close_stream(call, kind: str, tally: Tally) -> None:
    await call.done_writing()
    while await call.read() is not grpc.aio.EOF:
        tally.unexpected.append(f"{kind}: an answer nobody asked for")


async def _worker(kind: str, channel: grpc.aio.Channel, workload: Workload, counter: _Counter, tally: Tally):
    image_stub = cgrpc.ImageClassifierStub(channel)
    tensor_stub = kgrpc.GRPCInferenceServiceStub(channel)
    call = None
    sent_on_stream = 0

    def open_stream():
        if kind == "image_stream":
            return image_stub.ClassifyStream(timeout=600)
        if kind == "tensor_stream":
            return tensor_stub.ModelStreamInfer(timeout=600)
        return None

    call = open_stream()
    try:
        while (n := counter.take()) is not None:
            if call is not None and sent_on_stream == STREAM_REQUESTS:
                # Like a good client: a stream must not outlive the server's max connection age
                # (plus its grace), or the server cuts it with UNAVAILABLE; reopen it well before.
                await _close_stream(call, kind, tally)
                call, sent_on_stream = open_stream(), 0
            sent_on_stream += 1
            image = kind.startswith("image")
            request, index = _image_request(workload, n) if image else _tensor_request(workload, n)
            start = time.perf_counter()
            code, problem, error_text = "OK", None, ""
            try:
                if call is None:
                    fn = image_stub.Classify if image else tensor_stub.ModelInfer
                    response = await fn(request, timeout=60)
                else:
                    await call.write(request)
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        raise RuntimeError("stream ended early")
                    if kind == "image_stream" and response.HasField("error"):
                        code, error_text = response.error.code_name, response.error.message
                    elif kind == "tensor_stream" and response.error_message:
                        # Triton's stream carries no status code, only the message.
                        code, error_text = "STREAM_ERROR", response.error_message
                    if kind == "tensor_stream" and not response.error_message:
                        response = response.infer_response
            except grpc.aio.AioRpcError as exc:
                code, error_text = exc.code().name, exc.details() or ""
            elapsed = time.perf_counter() - start
            if index is None:
                # Deliberately malformed: must be refused as such, naming the problem.
                expected = "image" if image else "expected FP32 with"
                if code not in ("INVALID_ARGUMENT", "STREAM_ERROR") or expected not in error_text:
                    tally.unexpected.append(f"{kind} #{n}: deliberate error answered {code}: {error_text}")
                tally.deliberate[kind] += 1
                continue
            tally.codes[(kind, code)] += 1
            if code != "OK":
                tally.unexpected.append(f"{kind} #{n}: {code}: {error_text}")
                continue
            if response.id != str(n):
                problem = f"{kind} #{n}: answered with id {response.id!r}"
            else:
                problem = (_check_image if image else _check_tensor)(workload, index, response)
            if problem:
                tally.wrong_answers.append(problem)
            tally.latencies_s.append(elapsed)
    finally:
        if call is not None:
            await _close_stream(call, kind, tally)


async def run_load(
    address: str, workload: Workload, *, total: int, concurrency: int, channels: int = 4
) -> Tally:
    """Send ``total`` requests with ``concurrency`` workers spread over ``channels`` connections."""
    tally = Tally()
    counter = _Counter(total)
    opened = [grpc.aio.insecure_channel(address) for _ in range(channels)]
    try:
        await asyncio.gather(
            *(
                _worker(KINDS[i % len(KINDS)], opened[i % channels], workload, counter, tally)
                for i in range(concurrency)
            )
        )
    finally:
        for channel in opened:
            await channel.close()
    return tally
