"""The ModelInfer wire walk: what is refused unparsed, and that real requests pass untouched."""

from __future__ import annotations

import random

import numpy as np
import pytest

from service.api import wire
from service.gen.inference import grpc_service_pb2 as pb


def _triton_like_request() -> pb.ModelInferRequest:
    """What tritonclient sends: its parameters, one raw input, one classification output."""
    request = pb.ModelInferRequest(model_name="tiny", model_version="1", id="42")
    request.parameters["triton_enable_empty_final_response"].bool_param = False
    request.parameters["priority"].uint64_param = 0
    request.parameters["timeout"].int64_param = 1000
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[2, 3, 8, 8])
    tensor.parameters["binary_data_size"].int64_param = 1536
    request.outputs.add(name="logits").parameters["classification"].int64_param = 3
    request.raw_input_contents.append(np.zeros((2, 3, 8, 8), np.float32).tobytes())
    return request


def _many_parameters(tensor: pb.InferInputTensor, count: int) -> None:
    for i in range(count):
        tensor.parameters[f"p{i}"].bool_param = True


def test_real_requests_are_not_refused():
    assert wire.check_infer_request(_triton_like_request().SerializeToString()) == ""
    typed = pb.ModelInferRequest(model_name="tiny")
    typed.inputs.add(name="input", datatype="FP32", shape=[1, 3, 8, 8]).contents.fp32_contents.extend(
        [0.5] * 192
    )
    images = pb.ModelInferRequest(model_name="tiny")
    images.inputs.add(name="input", datatype="BYTES", shape=[64]).contents.bytes_contents.extend([b"x"] * 64)
    for request in (typed, images, pb.ModelInferRequest()):
        assert wire.check_infer_request(request.SerializeToString()) == ""


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (
            lambda r: r.inputs.add(name="input", shape=[1] * 100),
            "request.inputs.shape is 100 bytes packed or more; expected at most 8 dimensions",
        ),
        (
            lambda r: r.inputs.add(name="input").contents.bytes_contents.extend([b""] * 5000),
            "the request has more than 4096 fields",
        ),
        (
            lambda r: r.inputs.add(name="input").contents.int64_contents.extend([1] * 70_000),
            "the request has more than 65536 bytes of packed integers (at request.inputs.contents.int64_contents)",
        ),
        (lambda r: r.raw_input_contents.extend([b""] * 5000), "the request has more than 4096 fields"),
        (
            lambda r: _many_parameters(r.outputs.add(name="logits"), 5000),
            "the request has more than 4096 fields",
        ),
    ],
)
def test_requests_that_would_grow_when_parsed_are_refused_unparsed(build, reason):
    request = pb.ModelInferRequest(model_name="tiny")
    build(request)
    assert wire.check_infer_request(request.SerializeToString()).startswith(reason)


def test_every_method_of_both_services_is_walked_with_its_own_schema():
    """A map of many entries in a request nobody would expect to be big (TraceSetting: UNIMPLEMENTED)."""
    request = pb.TraceSettingRequest()
    for i in range(3):
        request.settings[f"k{i}"].value.extend(["a"] * 3000)
    methods = wire._walked_methods()
    assert methods["/inference.GRPCInferenceService/TraceSetting"] is pb.TraceSettingRequest.DESCRIPTOR
    assert "/svertka.v1.ImageClassifier/ClassifyStream" in methods
    assert wire.check_request(pb.TraceSettingRequest.DESCRIPTOR, request.SerializeToString()).startswith(
        "the request has more than 4096 fields"
    )


def test_bytes_that_are_not_a_message_are_malformed():
    for data in (b"\x0a\xff\xff", b"\x0a\x05ab", b"\x0b", b"\xff" * 11):
        with pytest.raises(ValueError):
            wire.check_infer_request(data)


def test_the_walk_never_calls_malformed_what_the_parser_accepts():
    """Mutated real requests: whenever the walk says "not a message", protobuf must agree."""
    rng = random.Random(1234)
    base = _triton_like_request().SerializeToString()
    for _ in range(5000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            del data[rng.randrange(len(data)) :]
        try:
            wire.check_infer_request(bytes(data))
        except ValueError:
            with pytest.raises(Exception):  # noqa: B017 - protobuf's DecodeError has no stable import path
                pb.ModelInferRequest.FromString(bytes(data))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _repeated_field(number: int, payload: bytes, times: int) -> bytes:
    """``times`` occurrences of one length-delimited field: protobuf merges them into one value."""
    return (_varint(number << 3 | 2) + _varint(len(payload)) + payload) * times


def test_a_packed_field_repeated_is_counted_as_one():
    """1,000 occurrences of a 64 KiB packed int64 field each pass a per-occurrence limit; merged, 65 M values."""
    contents = _repeated_field(3, b"\x01" * 65536, 1000)  # InferTensorContents.int64_contents
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="input", datatype="INT64", shape=[1]
    ).SerializeToString()
    tensor += _repeated_field(5, contents, 1)  # InferInputTensor.contents
    data = pb.ModelInferRequest(model_name="tiny").SerializeToString() + _repeated_field(5, tensor, 1)
    assert wire.check_infer_request(data).startswith(
        "the request has more than 65536 bytes of packed integers (at request.inputs.contents.int64_contents)"
    )
    # The same with the contents message repeated instead (protobuf merges those too).
    contents = _repeated_field(3, b"\x01" * 40_000, 1)
    tensor = _repeated_field(5, contents, 3)
    data = _repeated_field(5, tensor, 1)
    assert "more than 65536 bytes of packed integers" in wire.check_infer_request(data)
    shape = _repeated_field(3, b"\x01" * 80, 2)  # two occurrences of a full 8-dimension shape
    assert wire.check_infer_request(_repeated_field(5, shape, 1)).startswith(
        "request.inputs.shape is 160 bytes packed or more; expected at most 8 dimensions"
    )


def test_unknown_fields_are_held_to_a_small_budget():
    data = pb.ModelInferRequest(model_name="tiny").SerializeToString() + _repeated_field(99, b"x" * 70_000, 1)
    assert wire.check_infer_request(data).startswith("the request carries more than 65536 bytes in fields")
    assert pb.ModelInferRequest.FromString(data).model_name == "tiny"  # protobuf itself would keep them
