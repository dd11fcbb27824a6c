"""``svertka.v1.ImageClassifier``: encoded image in, top-k classes out.

Each method translates proto -> domain -> proto; decoding, batching and
inference happen in the model (``ServedModel.infer_images``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import grpc
import numpy as np

from service import errors, layout
from service.api import accounting, error_codes, request_fields, streams
from service.api.state import ServerState
from service.engine.interface import Engine, Model
from service.gen.svertka.v1 import classifier_pb2 as pb
from service.gen.svertka.v1 import classifier_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from service.metrics import Metrics

#: top_k when the request leaves it unset.
DEFAULT_TOP_K = 5


def resolve_model(engine: Engine, name: str, version: int) -> Model:
    """The model a request names; an empty name means the server's only model."""
    if version != 0 and not layout.is_version(version):  # 0: the newest; else service.layout's rule
        raise errors.InvalidInput(f"version: expected a positive integer or 0 (newest), got {version}")
    if not name:
        names = sorted({s.name for s in engine.statuses()})
        if len(names) != 1:
            raise errors.InvalidInput(f"model: required because this server serves several models: {names}")
        name = names[0]
    request_fields.validate_model_name(name)
    return engine.get(name, version or None)


def top_k_of(request: pb.ClassifyRequest, num_classes: int) -> int:
    if not request.HasField("top_k"):
        return min(DEFAULT_TOP_K, num_classes)
    if request.top_k < 1:
        raise errors.InvalidInput(f"top_k: expected >= 1 (or unset for {DEFAULT_TOP_K}), got {request.top_k}")
    return request.top_k


def _timings_pb(record: accounting.RequestRecord) -> pb.Timings:
    t = record.timings
    return pb.Timings(
        decode_us=round(t.preprocess_s * 1e6),
        queue_us=round(t.queue_s * 1e6),
        compute_us=round(t.compute_s * 1e6),
        total_us=round(record.total_s * 1e6),
    )


class ImageClassifierServicer(pb_grpc.ImageClassifierServicer):
    """The image API over an engine (see proto/svertka/v1/classifier.proto)."""

    def __init__(self, engine: Engine, state: ServerState, metrics: Metrics) -> None:
        self._engine = engine
        self._state = state
        self._metrics = metrics

    async def _classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext, peer: str | None = None
    ) -> pb.ClassifyResponse:
        """One request; raises a domain error on failure. ``peer``: the stream's, taken at its start."""
        start = time.perf_counter()
        self._state.check_accepting()
        model = resolve_model(self._engine, request.model, request.version)
        rid = request_fields.request_id(request.id, context)
        record = accounting.RequestRecord(
            self._metrics,
            model,
            api="image",
            method="Classify",
            rid=rid,
            peer=peer or context.peer(),
            start=start,
        )
        record.images = 1
        with accounting.track(record):
            k = top_k_of(request, model.meta.num_classes)
            image = request.image  # read once: with protobuf's upb backend every read copies the bytes
            if not image:
                raise errors.InvalidInput(
                    "image: empty; expected encoded image bytes (JPEG, PNG, WebP, BMP or GIF)"
                )
            (result,) = await model.infer_images(
                [image], deadline=request_fields.deadline_of(context), timings=record.timings
            )
            if isinstance(result, errors.SvertkaError):
                raise result
            post_start = time.perf_counter()
            predictions = [
                pb.Prediction(label=label, index=index, score=score)
                for index, label, score in model.top_k(np.asarray(result), k)
            ]
            record.postprocessed(time.perf_counter() - post_start)
            response = pb.ClassifyResponse(
                predictions=predictions, model_name=model.name, model_version=model.version, id=request.id
            )
        response.timings.CopyFrom(_timings_pb(record))
        return response

    async def Classify(self, request, context):
        try:
            return await self._classify(request, context)
        except Exception as exc:  # every failure leaves through the one mapping table
            error_codes.fail(context, exc)

    async def ClassifyStream(self, request_iterator, context):
        # context.peer() reads the C call: once the client is gone, a request of this stream still
        # being handled would read freed memory (grpcio 1.85 segfaults). Take it while the call lives.
        peer = context.peer()

        async def handle(request: pb.ClassifyRequest) -> pb.ClassifyResponse:
            try:
                return await self._classify(request, context, peer)
            except Exception as exc:  # answered in-band: the stream stays open
                code, message = error_codes.status_for(exc)
                return pb.ClassifyResponse(
                    id=request.id[: request_fields.MAX_REQUEST_ID_CHARS],
                    error=pb.Error(code=code.value[0], code_name=code.name, message=message),
                )

        try:
            async for response in streams.run_stream(request_iterator, handle, stop=self._state.drain_event):
                yield response
        except Exception as exc:
            error_codes.fail(context, exc)
