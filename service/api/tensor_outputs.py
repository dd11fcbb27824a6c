"""KServe v2 outputs: which outputs a ModelInfer request asks for, and the response that carries them.

Raw FP32 logits in ``raw_output_contents`` (as Triton's gRPC endpoint sends
them), Triton's classification extension (top k as BYTES
``"score:index:label"``), or written to a system shared memory region. A
graph's other outputs (``meta.extra_outputs``) come raw, in their own
datatypes, unpacked from the rows the engine answers with
(``modelmeta.extra_output``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service import errors, modelmeta, shm
from service.api.tensors import shared_memory_slice
from service.gen.inference import grpc_service_pb2 as pb

#: The parameter of a requested output that turns it into a top-k classification (Triton extension).
CLASSIFICATION_PARAM = "classification"


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    classification_k: int | None  # None: the raw tensor
    shared_memory: shm.Slice | None = None  # where to write it instead of the response


def _param_text(param: pb.InferParameter) -> str:
    """An InferParameter as a message shows it: its kind and bounded value."""
    which = param.WhichOneof("parameter_choice")
    if which is None:
        return "no value"
    return f"{which} {errors.shown(getattr(param, which))}"


def _int_param(param: pb.InferParameter) -> int | None:
    which = param.WhichOneof("parameter_choice")
    if which in ("int64_param", "uint64_param"):
        return int(getattr(param, which))
    if which == "string_param":
        if len(param.string_param) > 20:  # int() of a long digit string is quadratic; no k is that long
            return None
        try:
            return int(param.string_param)
        except ValueError:
            return None
    return None


def requested_outputs(
    request: pb.ModelInferRequest, meta: modelmeta.ModelMeta, shm_registry: shm.SharedMemory | None = None
) -> list[RequestedOutput]:
    """The outputs to return: every output (raw) when none are named."""
    names = [meta.output_name, *(name for name, _, _ in meta.extra_outputs)]
    if not request.outputs:
        return [RequestedOutput(name, None) for name in names]
    result = []
    seen = set()
    for out in request.outputs:
        if out.name not in names:
            listed = f"one output, '{names[0]}'" if len(names) == 1 else f"outputs {names[:16]}"
            raise errors.InvalidInput(
                f"unknown output {errors.shown(out.name)}: model '{request.model_name}' has {listed}"
            )
        if out.name in seen:
            raise errors.InvalidInput(f"output '{out.name}' requested twice")
        seen.add(out.name)
        k = None
        if CLASSIFICATION_PARAM in out.parameters:
            k = _int_param(out.parameters[CLASSIFICATION_PARAM])
            if k is None or k < 1:
                raise errors.InvalidInput(
                    f"output '{out.name}': parameter 'classification' must be an integer >= 1 (top k), "
                    f"got {_param_text(out.parameters[CLASSIFICATION_PARAM])}"
                )
            if out.name != meta.output_name:
                raise errors.InvalidInput(
                    f"output '{out.name}': parameter 'classification' applies to the classifier's "
                    f"output '{meta.output_name}' only"
                )
        where = shared_memory_slice(f"output '{out.name}'", out.parameters, shm_registry)
        if where is not None and k is not None:
            raise errors.InvalidInput(
                f"output '{out.name}': a classification output cannot go to shared memory "
                "(its strings have no fixed size); request it inline"
            )
        result.append(RequestedOutput(out.name, k, where))
    return result


def encode_bytes(items: Sequence[bytes]) -> bytes:
    """Serialize BYTES elements for raw_output_contents (4-byte LE length + bytes each)."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def classification_strings(logits: np.ndarray, k: int, labels: Sequence[str]) -> list[bytes]:
    """Triton's classification extension: per row the top k as ``b"score:index:label"``, best first.

    ``score`` is the output tensor's own value (the logit), as Triton reports it;
    ties keep the lower index first.
    """
    k = min(k, logits.shape[1])
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    out = []
    for row, indices in zip(logits, order, strict=True):
        for index in indices:
            out.append(f"{float(row[index]):f}:{int(index)}:{labels[int(index)]}".encode())
    return out


def _output_spec(meta: modelmeta.ModelMeta, name: str) -> tuple[int | None, str, tuple[int, ...]]:
    """(index among the extra outputs or None for the classifier's, numpy dtype, dims after the batch)."""
    for index, (extra, dtype, dims) in enumerate(meta.extra_outputs):
        if extra == name:
            return index, dtype, dims
    return None, "float32", (meta.num_classes,)


def check_output_room(outputs: Sequence[RequestedOutput], rows: int, meta: modelmeta.ModelMeta) -> None:
    """Refuse, before any compute, a shared memory output too small for ``rows`` rows of it."""
    for requested in outputs:
        if requested.shared_memory is None:
            continue
        _, dtype, dims = _output_spec(meta, requested.name)
        need = rows * int(np.prod(dims, dtype=np.int64)) * np.dtype(dtype).itemsize
        if requested.shared_memory.byte_size < need:
            shape = ",".join(str(d) for d in (rows, *dims))
            raise errors.InvalidInput(
                f"output '{requested.name}': {modelmeta.OUTPUT_DATATYPES[dtype]} [{shape}] needs {need} "
                f"bytes but shared_memory_byte_size is {requested.shared_memory.byte_size}"
            )


def build_outputs(
    response: pb.ModelInferResponse,
    logits: np.ndarray,
    outputs: Sequence[RequestedOutput],
    meta: modelmeta.ModelMeta,
    shm_registry: shm.SharedMemory | None = None,
) -> None:
    """Fill ``response`` with the requested outputs: raw_output_contents (as Triton does),
    or written to the shared memory region an output names (then the response holds its
    name, datatype and shape, and an empty raw_output_contents entry)."""
    rows = logits.shape[0]
    packed, logits = logits, logits[:, : meta.num_classes]  # the graph's other outputs follow
    for requested in outputs:
        tensor = response.outputs.add(name=requested.name)
        if requested.classification_k is None:
            index, dtype, _ = _output_spec(meta, requested.name)
            value = logits if index is None else modelmeta.extra_output(meta, packed, index)
            tensor.datatype = modelmeta.OUTPUT_DATATYPES[dtype]
            tensor.shape.extend(value.shape)
            data = np.ascontiguousarray(value, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
            if requested.shared_memory is not None:
                shm_registry.write(requested.shared_memory, data, f"output '{requested.name}'")
                # An empty entry keeps raw_output_contents aligned with outputs, as Triton does:
                # clients (perf_analyzer's C++ one included) index one by the other.
                response.raw_output_contents.append(b"")
            else:
                response.raw_output_contents.append(data)
        else:
            k = min(requested.classification_k, logits.shape[1])
            tensor.datatype = "BYTES"
            tensor.shape.extend((rows, k))
            response.raw_output_contents.append(encode_bytes(classification_strings(logits, k, meta.labels)))
