"""Request messages that do not parse: INVALID_ARGUMENT for the caller, one log line at most.

grpc.aio deserializes a request with the handler's ``request_deserializer``
before any servicer code runs. When that raises (bytes that are not the
message the method takes: ``0a ff ff``, a truncated field, a client speaking
another method's schema), grpc answers ``UNKNOWN`` with the Python exception's
text and logs a traceback at ERROR for every such request: a client can fill
the log at will, and learns nothing useful about what it did wrong.

:class:`DecodeInterceptor` gives every method a deserializer that never raises:
a message that does not parse becomes an :class:`Undecodable` marker, and the
method's handler is wrapped so that a marker ends the call with
``INVALID_ARGUMENT`` naming the message type expected. On a client stream,
requests already read before the bad one are still answered; then the stream
ends with that status. Refusals are logged at WARNING at most once per
``LOG_EVERY_S`` (with how many were not logged).

Parsing itself can cost far more than the bytes received: protobuf keeps
each element of a packed repeated integer as 8 bytes, so a 29 MB ModelInfer
request whose shape lists 30 million one-byte dimensions parses into 240 MB
(upb grows the array by doubling: about 500 MB allocated) and takes 0.3 s
on the event loop, before any servicer code could look at it. So ModelInfer
requests (and every other request of the two public services; a map of
millions of entries grows the same way) are first walked on the wire with
their schema (:func:`check_request`) when they are ``WALK_FROM_BYTES`` or
larger: at most ``MAX_FIELDS`` fields in the whole message, a shape of at
most ``MAX_RANK`` dimensions, at most ``MAX_PACKED_VARINT_BYTES`` of packed
integers and ``MAX_UNKNOWN_BYTES`` in unknown fields; only then are they
parsed. The walk reads field headers only, so its cost is bounded by the
field limit, not by the message size. Methods outside the two APIs (health
checks, reflection: open even when a token is required) take messages of at
most ``MAX_OTHER_MESSAGE_BYTES``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from service import errors
from service.api import error_codes, tensors
from service.api.interception import PerMethodInterceptor, behavior_of, is_async, rebuilt
from service.gen.inference import grpc_service_pb2 as infer_pb
from service.gen.svertka.v1 import classifier_pb2 as classifier_pb

log = logging.getLogger(__name__)

#: At most one WARNING line per this many seconds about undecodable requests.
LOG_EVERY_S = 10.0


@dataclasses.dataclass(frozen=True)
class Undecodable:
    """Stands in for a request message whose bytes did not parse, or were refused unparsed."""

    nbytes: int
    #: Why it was refused before parsing ("" when the parser itself failed).
    reason: str = ""


# -- the wire walk -----------------------------------------------------------------------------
#: Fields in one request message, nested ones included (a map entry, a repeated element and each
#: field inside them count one). A ModelInfer request from tritonclient has about 20; 4,096
#: covers a BYTES input of 4,000 images in typed ``bytes_contents`` (each element is a field).
#: Walking 4,096 fields takes about 2 ms: the walk's cost is bounded by this, not by the size.
MAX_FIELDS = 4096
#: Bytes of packed repeated integers in one request, all fields together (each element parses
#: into up to 8 bytes from 1), and the fields with a tighter rule of their own (per message).
MAX_PACKED_VARINT_BYTES = 64 * 1024
#: Bytes in fields the schema does not know (kept by protobuf as they came, for the request's life).
MAX_UNKNOWN_BYTES = 64 * 1024
#: Messages smaller than this are parsed without a walk: nothing in them can grow past a few MB
#: when parsed (packed integers grow 8x, map entries about 50x), and a walk of thousands of tiny
#: fields would cost more event-loop time than it saves.
WALK_FROM_BYTES = 64 * 1024
#: The largest message taken by a method outside the two APIs (health checks, reflection): open
#: to everyone even with a token configured, and holding nothing bigger than a service name.
MAX_OTHER_MESSAGE_BYTES = 8 * 1024
_PACKED_LIMITS = {
    # Each dimension takes 1 to 10 bytes packed: more than MAX_RANK * 10 bytes, more dimensions.
    "inference.ModelInferRequest.InferInputTensor.shape": (
        tensors.MAX_RANK * 10,
        f"expected at most {tensors.MAX_RANK} dimensions",
    ),
}

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LENGTH, _WIRE_FIXED32 = 0, 1, 2, 5
_VARINT_TYPES = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_BOOL,
    FieldDescriptor.TYPE_ENUM,
}


class _Malformed(Exception):
    """The bytes are not a protobuf message (the parser would fail on them too)."""


class _Refused(Exception):
    """A well-formed message that declares more than the server will parse."""


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


@dataclasses.dataclass
class _Budget:
    """What the rest of one message's walk may still accept, shared by all its nested messages."""

    fields: int = MAX_FIELDS
    #: Packed integer bytes in the whole message: protobuf merges repeated occurrences of a
    #: packed field (and of a singular message field), so a limit per occurrence would not hold.
    packed_bytes: int = MAX_PACKED_VARINT_BYTES
    unknown_bytes: int = MAX_UNKNOWN_BYTES


def _walk(descriptor: Descriptor, data: bytes, pos: int, end: int, budget: _Budget, path: str) -> None:
    """Walk the fields of one message in data[pos:end], descending into message fields.

    Reads field headers only; ``budget`` bounds the fields, packed integers and unknown bytes of
    the whole tree.
    """
    packed_here: dict[int, int] = {}  # packed bytes per field number in this message instance
    while pos < end:
        budget.fields -= 1
        if budget.fields < 0:
            raise _Refused(
                f"the request has more than {MAX_FIELDS} fields (nested fields and elements included)"
            )
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _WIRE_VARINT:
            _, pos = _varint(data, pos, end)
        elif wire in (_WIRE_FIXED64, _WIRE_FIXED32):
            pos += 8 if wire == _WIRE_FIXED64 else 4
        elif wire == _WIRE_LENGTH:
            length, start = _varint(data, pos, end)
            pos = start + length
            if pos > end:
                raise _Malformed
            field = descriptor.fields_by_number.get(number)
            if field is None:
                # Unknown to this schema: protobuf keeps its bytes, for as long as the request lives.
                budget.unknown_bytes -= length
                if budget.unknown_bytes < 0:
                    raise _Refused(
                        f"the request carries more than {MAX_UNKNOWN_BYTES} bytes in fields this server "
                        "does not know"
                    )
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                _walk(field.message_type, data, start, pos, budget, f"{path}.{field.name}")
            elif field.type in _VARINT_TYPES and length:
                packed_here[number] = total = packed_here.get(number, 0) + length
                budget.packed_bytes -= length
                rule = _PACKED_LIMITS.get(field.full_name)
                if rule is not None and total > rule[0]:
                    raise _Refused(f"{path}.{field.name} is {total} bytes packed or more; {rule[1]}")
                if budget.packed_bytes < 0:
                    raise _Refused(
                        f"the request has more than {MAX_PACKED_VARINT_BYTES} bytes of packed integers "
                        f"(at {path}.{field.name}); they grow up to 8 times when parsed"
                    )
        else:  # groups: no message here uses them
            raise _Malformed
        if pos > end or number == 0:
            raise _Malformed


def check_request(descriptor: Descriptor, data: bytes) -> str:
    """Why the serialized ``descriptor`` message ``data`` must not be parsed ("" when it may be).

    Raises ValueError when the bytes are not a protobuf message at all.
    """
    try:
        _walk(descriptor, data, 0, len(data), _Budget(), _PATHS.get(descriptor.full_name, "the request"))
    except _Refused as exc:
        return str(exc)
    except _Malformed:
        raise ValueError("not a protobuf message") from None
    return ""


def check_infer_request(data: bytes) -> str:
    """:func:`check_request` for a ModelInferRequest."""
    return check_request(infer_pb.ModelInferRequest.DESCRIPTOR, data)


#: How a message's fields are named in a refusal (the request itself reads as "request").
_PATHS = {"inference.ModelInferRequest": "request"}


def _walked_methods() -> dict[str, Descriptor]:
    """Every method of the two public services, by path, with its request message type."""
    methods = {}
    for service in (
        infer_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        classifier_pb.DESCRIPTOR.services_by_name["ImageClassifier"],
    ):
        for method in service.methods:
            methods[f"/{service.full_name}/{method.name}"] = method.input_type
    return methods


def _message_name(method: str) -> str:
    """``/inference.GRPCInferenceService/ModelInfer`` -> ``ModelInfer``."""
    return method.rsplit("/", 1)[-1] or method


#: What ``prepared`` returns for a call it has refused.
_REFUSED = object()


class _RateLimitedLog:
    """One WARNING line per ``every_s``; the lines skipped meanwhile are counted in the next one."""

    def __init__(self, every_s: float) -> None:
        self._every_s = every_s
        self._next = 0.0
        self._skipped = 0

    def warning(self, text: str) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        skipped, self._skipped = self._skipped, 0
        self._next = now + self._every_s
        suffix = f" ({skipped} more since the last such line)" if skipped else ""
        log.warning("%s%s", text, suffix)


class DecodeInterceptor(PerMethodInterceptor):
    """Turns request messages that fail to parse into INVALID_ARGUMENT (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._log = _RateLimitedLog(LOG_EVERY_S)
        self._walked = _walked_methods()

    def _refusal(self, method: str, item: Undecodable, context: Any) -> errors.InvalidInput:
        name = _message_name(method)
        try:
            peer = context.peer()
        except Exception:  # pragma: no cover - a call that is already gone
            peer = "?"
        if item.reason:
            self._log.warning(
                f"refused an unparsed {name} request of {item.nbytes} bytes from {peer}: {item.reason}"
            )
            return errors.InvalidInput(f"{item.reason}; the request ({item.nbytes} bytes) was not parsed")
        self._log.warning(f"refused an undecodable {name} request of {item.nbytes} bytes from {peer}")
        return errors.InvalidInput(
            f"the request is not a valid {name} request message: its {item.nbytes} bytes do not parse "
            "as the protobuf message this method takes (a client built from another .proto, or "
            "corrupted bytes)"
        )

    def _deserializer(self, method: str, parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
        walked = self._walked.get(method)

        def deserialize(data: bytes) -> Any:
            try:
                if walked is None:
                    if len(data) > MAX_OTHER_MESSAGE_BYTES:
                        return Undecodable(
                            len(data), f"a request of this method has at most {MAX_OTHER_MESSAGE_BYTES} bytes"
                        )
                elif len(data) >= WALK_FROM_BYTES:
                    reason = check_request(walked, data)
                    if reason:
                        return Undecodable(len(data), reason)
                return parse(data)
            except Exception:  # protobuf's DecodeError, or any parser failure on client bytes
                return Undecodable(len(data))

        return deserialize

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.request_deserializer is None or not is_async(handler):
            return handler  # every servicer here is async; a sync one keeps grpc's own handling
        behavior, _ = behavior_of(handler)
        streaming = handler.request_streaming

        async def checked(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for item in requests:
                if isinstance(item, Undecodable):
                    raise self._refusal(method, item, context)  # the servicer ends the stream with it
                yield item

        def prepared(request: Any, context: Any) -> Any:
            """What the behaviour gets, or _REFUSED once the call's status is set."""
            if streaming:
                return checked(request, context)
            if isinstance(request, Undecodable):
                error_codes.fail(context, self._refusal(method, request, context))
                return _REFUSED
            return request

        if inspect.isasyncgenfunction(behavior):

            async def run(request: Any, context: Any):
                request = prepared(request, context)
                if request is not _REFUSED:
                    async for response in behavior(request, context):
                        yield response

        else:  # a coroutine (one that answers, or one that writes with context.write and returns)

            async def run(request: Any, context: Any) -> Any:
                request = prepared(request, context)
                return None if request is _REFUSED else await behavior(request, context)

        return rebuilt(
            handler, run, request_deserializer=self._deserializer(method, handler.request_deserializer)
        )
