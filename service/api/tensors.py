"""KServe v2 tensors <-> numpy: the input validation of ModelInfer, in one place.

Pure functions over the generated messages (no gRPC context, no model
runtime), so every malformed-request case can be unit-tested and fuzzed
directly. Messages say what was expected, in the protocol's own terms
(datatype strings, shapes with the batch dimension), because the client that
gets them is usually a generic tool such as tritonclient or perf_analyzer.

Raw contents are wrapped with ``np.frombuffer`` (no copy: the array views
the request's bytes) after an exact byte-count check; typed contents are
checked element by element count.

Cost comes first: everything a request declares (the number of inputs, a
shape's rank and dimensions, the rows it asks for, the element count of a
BYTES tensor) is checked against small limits with ``len()`` on the parsed
message before any loop, allocation or error text that grows with it, so a
request that declares thirty million dimensions or sixteen million empty
images is refused in microseconds. Client-supplied names in messages go
through :func:`service.errors.shown` (bounded).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service import config, errors, modelmeta, shm
from service.engine import interface
from service.gen.inference import grpc_service_pb2 as pb

#: Datatypes whose typed contents live in which InferTensorContents field.
TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
ALL_TYPED_FIELDS = tuple(sorted(set(TYPED_FIELDS.values())))
KNOWN_DATATYPES = (*TYPED_FIELDS, "FP16", "BF16")

#: Upper bound on any element count we are asked to allocate for, far above any real request
#: (the message-size limit bounds real payloads); it stops int64 shapes from overflowing the math.
_MAX_ELEMENTS = 1 << 40
#: The highest rank any tensor of this API may have (FP32 inputs are 4-d, BYTES 1- or 2-d); a
#: shape is refused on its length before a single dimension is read.
MAX_RANK = 8


@dataclass(frozen=True)
class ParsedInput:
    """What a ModelInfer request asks the model to compute, before any inference.

    Exactly one of ``tensor`` (the model's input dtype and shape, e.g. float32 (n, 3, H, W)) and
    ``images`` (n encoded images) is set.
    """

    tensor: np.ndarray | None
    images: list[bytes] | None
    rows: int


#: What a tensor that names a shared memory region gets when the server does not allow them.
SHM_DISABLED = (
    "system shared memory is disabled on this server: send the tensor data in the request, "
    "or start the server with --allow-shared-memory (same-host clients only)"
)


def shared_memory_slice(what: str, parameters, shm_registry: shm.SharedMemory | None) -> shm.Slice | None:
    """The shared memory slice a tensor's parameters name, or None when they name none."""
    present = [p for p in shm.PARAMS if p in parameters]
    if not present:
        return None
    if shm_registry is None:
        raise errors.PermissionDenied(f"{what}: {SHM_DISABLED}")
    for required in (shm.REGION_PARAM, shm.BYTE_SIZE_PARAM):
        if required not in parameters:
            raise errors.InvalidInput(
                f"{what}: parameter '{required}' is required with {', '.join(repr(p) for p in present)}"
            )
    region = parameters[shm.REGION_PARAM]
    if region.WhichOneof("parameter_choice") != "string_param" or not region.string_param:
        raise errors.InvalidInput(f"{what}: parameter '{shm.REGION_PARAM}' must be a region name (string)")
    numbers = {shm.OFFSET_PARAM: 0}  # the offset is optional
    for key in (p for p in (shm.BYTE_SIZE_PARAM, shm.OFFSET_PARAM) if p in parameters):
        which = parameters[key].WhichOneof("parameter_choice")
        value = getattr(parameters[key], which) if which in ("int64_param", "uint64_param") else -1
        if value < 0:
            raise errors.InvalidInput(f"{what}: parameter '{key}' must be an integer >= 0 (int64_param)")
        numbers[key] = value
    if len(region.string_param) > shm.MAX_NAME_CHARS:
        raise errors.InvalidInput(
            f"{what}: parameter '{shm.REGION_PARAM}' is {len(region.string_param)} characters; "
            f"region names have at most {shm.MAX_NAME_CHARS}"
        )
    where = shm.Slice(region.string_param, numbers[shm.OFFSET_PARAM], numbers[shm.BYTE_SIZE_PARAM])
    shm_registry.check(where, what)
    return where


def _shape_text(shape: Sequence[int]) -> str:
    """A shape for a message; callers check the rank (<= MAX_RANK) first, so this stays short."""
    return (
        "["
        + ",".join(str(int(d)) for d in shape[:MAX_RANK])
        + (",..." if len(shape) > MAX_RANK else "")
        + "]"
    )


def _shape_of(tensor, what: str) -> list[int]:
    """The tensor's shape as a list, refused on its length first (a list of 30 M ints costs seconds)."""
    rank = len(tensor.shape)
    if rank > MAX_RANK:
        raise errors.InvalidInput(f"{what}: shape has {rank} dimensions; expected at most {MAX_RANK}")
    return list(tensor.shape)


def _element_count(name: str, shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        if dim < 0:
            raise errors.InvalidInput(
                f"input '{name}': shape {_shape_text(shape)} has a negative dimension; "
                "every dimension must be >= 0 in a request"
            )
        count *= int(dim)
        if count > _MAX_ELEMENTS:
            raise errors.InvalidInput(f"input '{name}': shape {_shape_text(shape)} is too large")
    return count


def _typed_fields_set(contents: pb.InferTensorContents) -> list[str]:
    return [f for f in ALL_TYPED_FIELDS if len(getattr(contents, f))]


def parse_input(
    request: pb.ModelInferRequest,
    meta: modelmeta.ModelMeta,
    shm_registry: shm.SharedMemory | None = None,
    *,
    max_rows: int = config.DEFAULT_MAX_ROWS_PER_REQUEST,
) -> ParsedInput:
    """Validate a ModelInfer request's inputs against the model and extract the data.

    Accepts one input named like the model's input, either a tensor of the model's datatype and
    shape (FP32 ``[n, 3, H, W]`` for svertka's own exports; raw, typed contents or a system shared
    memory region) or BYTES ``[n]`` /
    ``[n, 1]`` holding encoded images, with 1 <= n <= ``max_rows`` (the model's
    max_rows_per_request, checked here before anything is read or split).
    ``shm_registry`` is None when the server does not allow shared memory.
    """
    expected_name = meta.input_name
    if len(request.inputs) != 1:
        shown_names = ", ".join(errors.shown(i.name) for i in request.inputs[:4])
        more = ", ..." if len(request.inputs) > 4 else ""
        raise errors.InvalidInput(
            f"expected exactly 1 input ('{expected_name}'), got {len(request.inputs)}"
            + (f" [{shown_names}{more}]" if shown_names else "")
        )
    tensor = request.inputs[0]
    if tensor.name != expected_name:
        raise errors.InvalidInput(
            f"unknown input {errors.shown(tensor.name)}: model '{request.model_name}' has one input, "
            f"'{expected_name}'"
        )
    raw = request.raw_input_contents
    typed = _typed_fields_set(tensor.contents)
    where = shared_memory_slice(f"input '{tensor.name}'", tensor.parameters, shm_registry)
    if where is not None:
        return _parse_shared_memory(tensor, where, bool(raw) or bool(typed), meta, shm_registry, max_rows)
    if len(raw) not in (0, len(request.inputs)):
        raise errors.InvalidInput(
            f"raw_input_contents: expected one entry per input ({len(request.inputs)}), got {len(raw)}"
        )
    if raw and typed:
        raise errors.InvalidInput(
            f"input '{tensor.name}': data given both in raw_input_contents and in contents.{typed[0]}; send one"
        )
    datatype = tensor.datatype
    shape = _shape_of(tensor, f"input '{tensor.name}'")
    if datatype == meta.input_datatype:
        count = _tensor_count(meta, shape, max_rows)
        return _parse_tensor(tensor, raw[0] if raw else None, typed, shape, count, datatype)
    if datatype == "BYTES":
        count = _bytes_count(tensor.name, shape, max_rows)
        return _parse_bytes(tensor, raw[0] if raw else None, typed, shape, count)
    what = errors.shown(datatype) if datatype else "no datatype"
    known = (
        ""
        if datatype in KNOWN_DATATYPES
        else f" (not a KServe datatype; known: {', '.join(KNOWN_DATATYPES)})"
    )
    raise errors.InvalidInput(
        f"input '{tensor.name}': expected datatype {meta.input_datatype} (a "
        f"{interface.input_dims_text(meta)} tensor) or BYTES (encoded images), got {what}{known}"
    )


def _check_rows(name: str, shape: list[int], max_rows: int) -> None:
    interface.check_rows(name, int(shape[0]), max_rows, _shape_text(shape))


#: Where a datatype's typed values go in InferTensorContents (FP16 has none: raw only) ...
_TYPED_FIELDS = {"FP32": "fp32_contents", "UINT8": "uint_contents"}
#: ... and its numpy dtype on the wire (little-endian).
_WIRE_DTYPES = {"FP32": "<f4", "FP16": "<f2", "UINT8": "u1"}


def _tensor_count(meta: modelmeta.ModelMeta, shape: list[int], max_rows: int) -> int:
    """Elements of a tensor input after checking its shape against the model."""
    interface.check_input_shape(meta, shape, _shape_text(shape))
    interface.check_request_batch(meta, shape, _shape_text(shape))
    count = _element_count(meta.input_name, shape)  # rank <= MAX_RANK here: a few multiplications
    _check_rows(meta.input_name, shape, max_rows)
    return count


def _parse_tensor(
    tensor, raw: bytes | None, typed: list[str], shape: list[int], count: int, datatype: str
) -> ParsedInput:
    name = tensor.name
    wire = np.dtype(_WIRE_DTYPES[datatype])
    if raw is not None:
        want = count * wire.itemsize
        if len(raw) != want:
            raise errors.InvalidInput(
                f"input '{name}': expected {datatype} with {want} bytes for shape {_shape_text(shape)}, "
                f"got {len(raw)} bytes"
            )
        array = np.frombuffer(raw, dtype=wire).reshape(shape)
    else:
        field = _TYPED_FIELDS.get(datatype)
        if field is None:
            raise errors.InvalidInput(
                f"input '{name}': datatype {datatype} has no typed contents; send it in raw_input_contents"
            )
        if typed and typed != [field]:
            raise errors.InvalidInput(
                f"input '{name}': datatype {datatype} carries typed data in contents.{field}, got contents.{typed[0]}"
            )
        values = getattr(tensor.contents, field)
        if len(values) != count:
            raise errors.InvalidInput(
                f"input '{name}': expected {count} {datatype} values for shape {_shape_text(shape)}, "
                f"got {len(values)} in contents.{field}" + ("" if values else " (and no raw_input_contents)")
            )
        if datatype == "UINT8":
            wide = np.asarray(values, dtype=np.uint32)
            if wide.size and int(wide.max()) > 255:
                raise errors.InvalidInput(
                    f"input '{name}': UINT8 values must be 0-255, got {int(wide.max())} in contents.{field}"
                )
            array = wide.astype(np.uint8).reshape(shape)
        else:
            array = np.asarray(values, dtype=np.float32).reshape(shape)
    return ParsedInput(tensor=array, images=None, rows=int(shape[0]))


def _parse_shared_memory(
    tensor,
    where: shm.Slice,
    inline: bool,
    meta: modelmeta.ModelMeta,
    shm_registry: shm.SharedMemory,
    max_rows: int,
) -> ParsedInput:
    name = tensor.name
    datatype = meta.input_datatype
    if inline:
        raise errors.InvalidInput(
            f"input '{name}': data given both in a shared memory region and in the request; send one"
        )
    if tensor.datatype != datatype:
        raise errors.InvalidInput(
            f"input '{name}': a shared memory input must be {interface.input_shape_text(meta)}, "
            f"got datatype {errors.shown(tensor.datatype) if tensor.datatype else 'none'}"
        )
    shape = _shape_of(tensor, f"input '{name}'")
    # Rows and byte count first: nothing is allocated or read for a request that would be refused.
    count = _tensor_count(meta, shape, max_rows)
    need = count * meta.input_itemsize
    if where.byte_size != need:
        raise errors.InvalidInput(
            f"input '{name}': shared_memory_byte_size is {where.byte_size} but {datatype} "
            f"{_shape_text(shape)} needs {need} bytes"
        )
    array = shm_registry.read(where, _WIRE_DTYPES[datatype], shape, f"input '{name}'")
    return ParsedInput(tensor=array, images=None, rows=int(shape[0]))


def split_raw_bytes(name: str, raw: bytes, count: int | None = None) -> list[bytes]:
    """Split a raw BYTES tensor: each element is a 4-byte little-endian length, then the bytes.

    With ``count`` (the element count the shape declares), splitting stops after that many
    elements and refuses the rest at once: the loop never runs more than ``count + 1`` times,
    however many elements the bytes hold.
    """
    items = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw):
        if count is not None and len(items) == count:
            raise errors.InvalidInput(
                f"input '{name}': shape needs {count} BYTES elements but raw_input_contents has "
                f"{len(raw) - offset} more bytes after element {count - 1}"
            )
        if offset + 4 > len(raw):
            raise errors.InvalidInput(
                f"input '{name}': raw BYTES element {len(items)} is truncated: "
                f"{len(raw) - offset} bytes left where a 4-byte length prefix was expected"
            )
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise errors.InvalidInput(
                f"input '{name}': raw BYTES element {len(items)} declares {length} bytes "
                f"but only {len(raw) - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    return items


def _bytes_count(name: str, shape: list[int], max_rows: int) -> int:
    """Elements of a BYTES ``[N]`` / ``[N, 1]`` input after checking its shape and rows."""
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise errors.InvalidInput(
            f"input '{name}': BYTES input holds encoded images with shape [N] or [N,1], got {_shape_text(shape)}"
        )
    count = _element_count(name, shape)  # rank <= MAX_RANK here: a few multiplications
    _check_rows(name, shape, max_rows)
    return count


def _parse_bytes(tensor, raw: bytes | None, typed: list[str], shape: list[int], count: int) -> ParsedInput:
    name = tensor.name
    if raw is not None:
        images = split_raw_bytes(name, raw, count)
    else:
        if typed and typed != ["bytes_contents"]:
            raise errors.InvalidInput(
                f"input '{name}': datatype BYTES carries typed data in contents.bytes_contents, got contents.{typed[0]}"
            )
        given = len(tensor.contents.bytes_contents)
        if given != count:  # before the list: sixteen million empty elements cost nothing to refuse
            raise errors.InvalidInput(
                f"input '{name}': shape {_shape_text(shape)} needs {count} images, got {given}"
            )
        images = list(tensor.contents.bytes_contents)
    if len(images) != count:
        raise errors.InvalidInput(
            f"input '{name}': shape {_shape_text(shape)} needs {count} images, got {len(images)}"
        )
    return ParsedInput(tensor=None, images=images, rows=count)
