"""``inference.GRPCInferenceService``: the KServe v2 / Triton tensor API.

Wire-compatible with Triton so that tritonclient, perf_analyzer and KServe
clients work unchanged (the Open Inference Protocol, https://github.com/kserve/open-inference-protocol,
as Triton extends it). Input validation lives in :mod:`service.api.tensors`, output encoding in
:mod:`service.api.tensor_outputs`; batching and inference in the engine.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from service import __version__, errors, layout, modelmeta, shm
from service.api import accounting, error_codes, request_fields, streams, tensor_outputs, tensors
from service.api.state import ServerState
from service.engine import interface
from service.engine.interface import Engine, Model
from service.gen.inference import grpc_service_pb2 as pb
from service.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.gen.inference import model_config_pb2 as mc

if TYPE_CHECKING:
    from service.metrics import Metrics

log = logging.getLogger(__name__)

SERVER_NAME = "svertka"
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"

#: Protocol extensions advertised in ServerMetadata. Each is implemented and tested:
#: perf_analyzer calls ModelStatistics around every window once "statistics" is listed.
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics")

#: Request parameters that would make the server read model content from the request.
#: svertka never loads anything a client sends; these are refused, not ignored.
_CONTENT_PARAMS = ("config",)
_CONTENT_PARAM_PREFIX = "file:"


def rpc(method):
    """Map every failure of a unary servicer method through the one status table."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as exc:
            error_codes.fail(context, exc)

    return wrapper


def _unimplemented(rpc_name: str, why: str):
    @rpc
    async def method(self, request, context):
        raise errors.Unimplemented(f"{rpc_name} is not supported by svertka: {why}")

    method.__name__ = rpc_name
    return method


def _duration(d) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The tensor API over an engine."""

    def __init__(
        self,
        engine: Engine,
        state: ServerState,
        metrics: Metrics,
        *,
        enable_model_control: bool = False,
        shared_memory: shm.SharedMemory | None = None,
    ) -> None:
        self._engine = engine
        self._state = state
        self._metrics = metrics
        self._model_control = enable_model_control
        #: None: system shared memory is not allowed on this server (--allow-shared-memory).
        self._shm = shared_memory

    # -- helpers -----------------------------------------------------------
    def _model(self, name: str, version: str):
        if not name:
            raise errors.InvalidInput("model name: required (RepositoryIndex lists the models)")
        request_fields.validate_model_name(name)
        return self._engine.get(name, request_fields.parse_version(version))

    # -- server and model state --------------------------------------------
    @rpc
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request, context):
        ready = self._state.started and not self._state.draining
        ready = ready and any(s.state == "READY" for s in self._engine.statuses())
        return pb.ServerReadyResponse(ready=ready)

    @rpc
    async def ModelReady(self, request, context):
        if not self._state.started or self._state.draining:
            return pb.ModelReadyResponse(ready=False)
        try:
            self._model(request.name, request.version)
        except errors.ModelNotReady as exc:
            # The bool alone cannot say why; the reason travels as trailing metadata.
            context.set_trailing_metadata((("svertka-reason", _metadata_text(exc.message)),))
            return pb.ModelReadyResponse(ready=False)
        # Ready, on an older version: the repository's newest config or file was refused.
        status = next((s for s in self._engine.statuses() if s.name == request.name), None)
        if status is not None and status.reason.startswith(interface.RELOAD_FAILED):
            context.set_trailing_metadata((("svertka-reload-failed", _metadata_text(status.reason)),))
        return pb.ModelReadyResponse(ready=True)

    @rpc
    async def ServerMetadata(self, request, context):
        extensions = EXTENSIONS if self._shm is None else (*EXTENSIONS, "system_shared_memory")
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=extensions)

    @rpc
    async def ModelMetadata(self, request, context):
        model = self._model(request.name, request.version)
        meta = model.meta
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(model.version)],
            platform=PLATFORM,
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=meta.input_name,
                    datatype=meta.input_datatype,
                    shape=interface.batch_shape(meta, *meta.input_shape),
                )
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=meta.output_name,
                    datatype="FP32",
                    shape=interface.batch_shape(meta, meta.num_classes),
                ),
                *(
                    pb.ModelMetadataResponse.TensorMetadata(
                        name=name,
                        datatype=modelmeta.OUTPUT_DATATYPES[dtype],
                        shape=interface.batch_shape(meta, *dims),
                    )
                    for name, dtype, dims in meta.extra_outputs
                ),
            ],
        )

    @rpc
    async def ModelConfig(self, request, context):
        model = self._model(request.name, request.version)
        return pb.ModelConfigResponse(config=model_config(model))

    # -- inference -----------------------------------------------------------
    async def _infer(
        self, request: pb.ModelInferRequest, context, method: str, peer: str | None = None
    ) -> pb.ModelInferResponse:
        start = time.perf_counter()
        self._state.check_accepting()
        model = self._model(request.model_name, request.model_version)
        record = accounting.RequestRecord(
            self._metrics,
            model,
            api="tensor",
            method=method,
            rid=request_fields.request_id(request.id, context),
            peer=peer or context.peer(),
            start=start,
        )
        with accounting.track(record):
            outputs = tensor_outputs.requested_outputs(request, model.meta, self._shm)
            parsed = tensors.parse_input(
                request, model.meta, self._shm, max_rows=model.settings.max_rows_per_request
            )
            tensor_outputs.check_output_room(outputs, parsed.rows, model.meta)
            record.images = parsed.rows
            deadline = request_fields.deadline_of(context)
            if parsed.tensor is not None:
                logits = await model.infer_tensor(parsed.tensor, deadline=deadline, timings=record.timings)
            else:
                results = await model.infer_images(parsed.images, deadline=deadline, timings=record.timings)
                logits = _stack_image_results(results, model.meta.input_name)
            post_start = time.perf_counter()
            response = pb.ModelInferResponse(
                model_name=model.name, model_version=str(model.version), id=request.id
            )
            tensor_outputs.build_outputs(response, logits, outputs, model.meta, self._shm)
            record.postprocessed(time.perf_counter() - post_start)
        return response

    @rpc
    async def ModelInfer(self, request, context):
        return await self._infer(request, context, "ModelInfer")

    async def ModelStreamInfer(self, request_iterator, context):
        # Taken once while the call is alive: see ImageClassifierServicer.ClassifyStream.
        peer = context.peer()

        async def handle(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                return pb.ModelStreamInferResponse(
                    infer_response=await self._infer(request, context, "ModelStreamInfer", peer)
                )
            except Exception as exc:  # answered in-band, as Triton does: the stream stays open
                _, message = error_codes.status_for(exc)
                return pb.ModelStreamInferResponse(
                    error_message=message,
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name[: request_fields.MAX_ECHOED_CHARS],
                        model_version=request.model_version[: request_fields.MAX_ECHOED_CHARS],
                        id=request.id[: request_fields.MAX_REQUEST_ID_CHARS],
                    ),
                )

        try:
            async for response in streams.run_stream(request_iterator, handle, stop=self._state.drain_event):
                yield response
        except Exception as exc:
            error_codes.fail(context, exc)

    # -- statistics ------------------------------------------------------------
    @rpc
    async def ModelStatistics(self, request, context):
        if request.name:
            request_fields.validate_model_name(request.name)
        wanted_version = request_fields.parse_version(request.version)
        models = [
            m
            for m in self._engine.served()
            if (not request.name or m.name == request.name)
            and (wanted_version is None or m.version == wanted_version)
        ]
        if request.name and not models:
            # Let the engine say what exists (NOT_FOUND) or why it is not ready (UNAVAILABLE).
            self._model(request.name, request.version)
        response = pb.ModelStatisticsResponse()
        for model in sorted(models, key=lambda m: (m.name, m.version)):
            snap = await model.statistics()
            stats = response.model_stats.add(
                name=model.name,
                version=str(model.version),
                last_inference=snap.last_inference_ms,
                inference_count=snap.inference_count,
                execution_count=snap.execution_count,
            )
            inf = stats.inference_stats
            inf.success.CopyFrom(_duration(snap.success))
            inf.fail.CopyFrom(_duration(snap.fail))
            inf.queue.CopyFrom(_duration(snap.queue))
            inf.compute_input.CopyFrom(_duration(snap.compute_input))
            inf.compute_infer.CopyFrom(_duration(snap.compute_infer))
            inf.compute_output.CopyFrom(_duration(snap.compute_output))
            for size in sorted(snap.batch_stats):
                c_in, c_inf, c_out = snap.batch_stats[size]
                stats.batch_stats.add(
                    batch_size=size,
                    compute_input=_duration(c_in),
                    compute_infer=_duration(c_inf),
                    compute_output=_duration(c_out),
                )
        return response

    # -- repository ------------------------------------------------------------
    @rpc
    async def RepositoryIndex(self, request, context):
        response = pb.RepositoryIndexResponse()
        for s in sorted(self._engine.statuses(), key=lambda s: (s.name, s.version or 0)):
            if request.ready and s.state != "READY":
                continue
            response.models.add(
                name=s.name,
                version="" if s.version is None else str(s.version),
                state=s.state,
                reason=s.reason,
            )
        return response

    def _check_model_control(self, rpc_name: str, request) -> str:
        if not self._model_control:
            raise errors.PermissionDenied(
                f"{rpc_name} is disabled: start the server with --enable-model-control to load and unload models"
            )
        name = request_fields.validate_model_name(request.model_name)
        for key in request.parameters:
            if key in _CONTENT_PARAMS or key.startswith(_CONTENT_PARAM_PREFIX):
                raise errors.Unimplemented(
                    f"{rpc_name} parameter '{key}' is not supported: svertka loads models only from its "
                    "repository directory, never from request content"
                )
        return name

    @rpc
    async def RepositoryModelLoad(self, request, context):
        name = self._check_model_control("RepositoryModelLoad", request)
        self._state.check_accepting()
        result = await self._engine.load(name)
        if result.state != "READY":
            raise errors.ModelNotReady(f"model '{name}' failed to load: {result.reason or result.state}")
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request, context):
        name = self._check_model_control("RepositoryModelUnload", request)
        await self._engine.unload(name)
        return pb.RepositoryModelUnloadResponse()

    # -- system shared memory (Triton's extension; service/shm.py) ------------------
    def _registry(self, rpc_name: str) -> shm.SharedMemory:
        if self._shm is None:
            raise errors.PermissionDenied(f"{rpc_name}: {tensors.SHM_DISABLED}")
        return self._shm

    @rpc
    async def SystemSharedMemoryStatus(self, request, context):
        response = pb.SystemSharedMemoryStatusResponse()
        for region in await self._registry("SystemSharedMemoryStatus").region_status(request.name):
            response.regions[region.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size
                )
            )
        return response

    @rpc
    async def SystemSharedMemoryRegister(self, request, context):
        await self._registry("SystemSharedMemoryRegister").register_region(
            request.name, request.key, request.offset, request.byte_size
        )
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc
    async def SystemSharedMemoryUnregister(self, request, context):
        await self._registry("SystemSharedMemoryUnregister").unregister_region(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    # -- not supported ------------------------------------------------------------
    _CUDA_SHM = (
        "CUDA shared memory is not supported; use system shared memory or send the data in the request"
    )
    CudaSharedMemoryStatus = _unimplemented("CudaSharedMemoryStatus", _CUDA_SHM)
    CudaSharedMemoryRegister = _unimplemented("CudaSharedMemoryRegister", _CUDA_SHM)
    CudaSharedMemoryUnregister = _unimplemented("CudaSharedMemoryUnregister", _CUDA_SHM)
    TraceSetting = _unimplemented("TraceSetting", "request tracing is not available; use the access log")
    LogSettings = _unimplemented("LogSettings", "log settings are fixed at start (--log-level, --log-format)")


def _metadata_text(text: str, limit: int = 1024) -> str:
    """Text safe for an ASCII metadata value: no control characters, non-ASCII escaped, bounded."""
    flat = " ".join(text.split())
    return flat.encode("ascii", "backslashreplace").decode("ascii")[:limit]


def _stack_image_results(results, input_name: str):
    """Logits rows of a BYTES request, or the first image's error naming which element failed."""
    for i, result in enumerate(results):
        if isinstance(result, errors.SvertkaError):
            raise type(result)(f"input '{input_name}' element {i}: {result.message}")
    return np.stack([np.asarray(r, dtype=np.float32) for r in results])  # rows, extra outputs included


def _kind(provider: str) -> int:
    if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        return mc.ModelInstanceGroup.KIND_GPU
    return mc.ModelInstanceGroup.KIND_CPU


def model_config(model: Model) -> mc.ModelConfig:
    """Triton's view of a served model: what perf_analyzer and friends read before sending."""
    meta, settings = model.meta, model.settings
    config = mc.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend=BACKEND,
        # A graph whose batch is fixed at 1 is Triton's max_batch_size 0: dims are the full shape.
        max_batch_size=0 if meta.fixed_batch else settings.max_batch_size,
        default_model_filename=layout.MODEL_FILE,
    )
    batch = [1] if meta.fixed_batch else []
    config.version_policy.latest.num_versions = 1
    config.input.add(
        name=meta.input_name,
        data_type=mc.DataType.Value("TYPE_" + meta.input_datatype),
        format=mc.ModelInput.FORMAT_NHWC if meta.layout == "NHWC" else mc.ModelInput.FORMAT_NCHW,
        dims=[*batch, *meta.input_shape],
    )
    config.output.add(name=meta.output_name, data_type=mc.TYPE_FP32, dims=[*batch, meta.num_classes])
    for name, dtype, dims in meta.extra_outputs:
        datatype = mc.DataType.Value("TYPE_" + modelmeta.OUTPUT_DATATYPES[dtype])
        config.output.add(name=name, data_type=datatype, dims=[*batch, *dims])
    if not meta.fixed_batch:
        batching = config.dynamic_batching
        batching.preferred_batch_size.extend(settings.preferred_batch_sizes)
        batching.max_queue_delay_microseconds = round(settings.max_queue_delay_ms * 1000)
        batching.default_queue_policy.max_queue_size = settings.max_queue_size
    config.instance_group.add(
        name=f"{model.name}_{model.version}", kind=_kind(model.provider), count=settings.instances
    )
    config.model_transaction_policy.decoupled = False
    for key, value in (
        ("execution_provider", model.provider),
        ("precision", meta.precision),
        ("arch", meta.arch),
        ("dataset", meta.dataset),
        ("num_classes", str(meta.num_classes)),
        ("max_rows_per_request", str(settings.max_rows_per_request)),
        ("max_image_pixels", str(settings.max_image_pixels)),
        ("max_decoded_pixels", str(model.max_decoded_pixels)),
        ("reject_non_finite_inputs", "true" if settings.reject_non_finite_inputs else "false"),
        ("sha256", model.sha256),
    ):
        config.parameters[key].string_value = value
    return config
