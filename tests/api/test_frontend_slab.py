"""A frontend's shared memory slab, with the engine in a process of its own (``--frontends N``).

A frontend hands request rows to the engine through its slab. A request that
can never fit is the client's mistake and says how many rows fit; a full slab
refuses at once with RESOURCE_EXHAUSTED (nothing waits for room), and the
room comes back when the answers have arrived.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from service.gen.inference import grpc_service_pb2 as pb
from service.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.gen.svertka.v1 import classifier_pb2 as cpb
from service.gen.svertka.v1 import classifier_pb2_grpc as cpb_grpc
from tests.api import images
from tests.api.conftest import InProcessServer

ROW_BYTES = 3 * 32 * 32 * 4  # one row of the tiny model
SLAB_BYTES = 64 << 10  # five rows


def _request(rows: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="input", datatype="FP32", shape=[rows, 3, 32, 32])
    request.raw_input_contents.append(np.zeros((rows, 3, 32, 32), "<f4").tobytes())
    return request


@pytest.fixture(scope="module")
def small_slab(tiny_repository):
    srv = InProcessServer(tiny_repository, engine_process=True, slab_bytes=SLAB_BYTES)
    yield srv
    srv.close()


def test_a_request_larger_than_the_slab_says_how_many_rows_fit(small_slab):
    with small_slab.channel() as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        with pytest.raises(grpc.RpcError) as info:
            infer(_request(6), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "send at most 5 rows per request" in info.value.details(), info.value.details()
        assert list(infer(_request(5), timeout=30).outputs[0].shape) == [5, 10]
    assert small_slab.engine.ranges.in_use == 0


def test_a_full_slab_refuses_at_once_and_recovers_when_answers_arrive(small_slab):
    ranges = small_slab.engine.ranges

    async def fill() -> list[int]:  # what requests in flight would hold (on the server's loop)
        taken = []
        while (offset := ranges.take(ROW_BYTES)) is not None:
            taken.append(offset)
        return taken

    async def give_back(taken: list[int]) -> None:
        for offset in taken:
            ranges.give_back(offset)

    taken = small_slab.call(fill())
    try:
        with small_slab.channel() as channel:
            infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            classify = cpb_grpc.ImageClassifierStub(channel).Classify
            for call, request in (
                (infer, _request(1)),
                (classify, cpb.ClassifyRequest(model="tiny", image=images.png(1))),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    call(request, timeout=30)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "this frontend's shared memory is full" in info.value.details()
    finally:
        small_slab.call(give_back(taken))
    with small_slab.channel() as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_request(5), timeout=30)
        assert list(response.outputs[0].shape) == [5, 10]
        top = cpb_grpc.ImageClassifierStub(channel).Classify(
            cpb.ClassifyRequest(model="tiny", image=images.png(1)), timeout=30
        )
        assert top.predictions
    assert ranges.in_use == 0
