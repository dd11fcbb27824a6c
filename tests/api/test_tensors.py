"""ModelInfer input validation and output encoding, straight on the messages (no server)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from service import errors
from service.api import tensor_outputs, tensors
from service.gen.inference import grpc_service_pb2 as pb
from tests.helpers.tinymodel import tiny_meta

META = tiny_meta(num_classes=4, size=8, labels=["cat", "dog", "emu", "yak"])


def _request(datatype="FP32", shape=(1, 3, 8, 8), *, name="input", raw=None, fp32=None, **typed):
    request = pb.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if fp32 is not None:
        tensor.contents.fp32_contents.extend(fp32)
    for field, values in typed.items():
        getattr(tensor.contents, field).extend(values)
    if raw is not None:
        request.raw_input_contents.append(raw)
    return request


def test_raw_fp32_is_a_zero_copy_view_of_the_request_bytes():
    data = np.arange(2 * 3 * 8 * 8, dtype=np.float32)
    request = _request(shape=(2, 3, 8, 8), raw=data.tobytes())
    parsed = tensors.parse_input(request, META)
    assert parsed.rows == 2 and parsed.images is None
    np.testing.assert_array_equal(parsed.tensor.ravel(), data)
    assert not parsed.tensor.flags.owndata  # a view on the message's buffer, not a copy


def test_typed_fp32_contents():
    values = np.linspace(-1, 1, 3 * 8 * 8, dtype=np.float32)
    parsed = tensors.parse_input(_request(fp32=values.tolist()), META)
    np.testing.assert_array_equal(parsed.tensor.ravel(), values)


def test_bytes_input_raw_and_typed():
    images = [b"\x89PNG first", b"", b"third"]
    raw = b"".join(struct.pack("<I", len(x)) + x for x in images)
    parsed = tensors.parse_input(_request("BYTES", (3,), raw=raw), META)
    assert parsed.images == images and parsed.rows == 3
    parsed = tensors.parse_input(_request("BYTES", (2, 1), bytes_contents=images[:2]), META)
    assert parsed.images == images[:2]


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        (
            {"raw": b"\0" * 1000},
            "input 'input': expected FP32 with 768 bytes for shape [1,3,8,8], got 1000 bytes",
        ),
        ({"shape": (1, 3, 9, 8), "raw": b""}, "input 'input': expected FP32 shape [N,3,8,8], got [1,3,9,8]"),
        ({"shape": (3, 8, 8), "raw": b""}, "expected FP32 shape [N,3,8,8], got [3,8,8]"),
        ({"shape": (-1, 3, 8, 8), "raw": b""}, "has a negative dimension"),
        ({"shape": (0, 3, 8, 8), "raw": b""}, "batch dimension must be >= 1"),
        ({"shape": (2**62, 3, 8, 8), "raw": b""}, "is too large"),
        ({"name": "pixels", "raw": b""}, "unknown input 'pixels': model 'tiny' has one input, 'input'"),
        ({"datatype": "INT64", "raw": b""}, "expected datatype FP32 (a [N,3,8,8] tensor) or BYTES"),
        ({"datatype": "", "raw": b""}, "got no datatype"),
        ({"datatype": "FLOAT", "raw": b""}, "not a KServe datatype"),
        (
            {"fp32": [1.0] * 10},
            "expected 192 FP32 values for shape [1,3,8,8], got 10 in contents.fp32_contents",
        ),
        ({}, "got 0 in contents.fp32_contents (and no raw_input_contents)"),
        (
            {"int_contents": [1] * 192},
            "datatype FP32 carries typed data in contents.fp32_contents, got contents.int_contents",
        ),
        (
            {"raw": b"\0" * 768, "fp32": [0.0] * 192},
            "both in raw_input_contents and in contents.fp32_contents",
        ),
    ],
)
def test_malformed_tensor_inputs(request_kwargs, message):
    with pytest.raises(errors.InvalidInput) as info:
        tensors.parse_input(_request(**request_kwargs), META)
    assert message in info.value.message


def test_input_count_and_raw_count():
    request = _request(raw=b"\0" * 768)
    request.inputs.add(name="extra", datatype="FP32", shape=[1])
    with pytest.raises(
        errors.InvalidInput, match=r"expected exactly 1 input \('input'\), got 2 \['input', 'extra'\]"
    ):
        tensors.parse_input(request, META)
    request = _request(raw=b"\0" * 768)
    request.raw_input_contents.append(b"")
    with pytest.raises(
        errors.InvalidInput, match=r"raw_input_contents: expected one entry per input \(1\), got 2"
    ):
        tensors.parse_input(request, META)
    with pytest.raises(errors.InvalidInput, match=r"got 0$"):
        tensors.parse_input(pb.ModelInferRequest(model_name="tiny"), META)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x05\x00", "element 0 is truncated: 2 bytes left where a 4-byte length prefix was expected"),
        (struct.pack("<I", 10) + b"abc", "element 0 declares 10 bytes but only 3 remain"),
        (struct.pack("<I", 1) + b"a", "shape [2] needs 2 images, got 1"),
    ],
)
def test_malformed_bytes_inputs(raw, message):
    with pytest.raises(errors.InvalidInput) as info:
        tensors.parse_input(_request("BYTES", (2,), raw=raw), META)
    assert message in info.value.message


def test_bytes_shape_must_be_a_list_of_images():
    with pytest.raises(errors.InvalidInput, match=r"shape \[N\] or \[N,1\], got \[1,3,8,8\]"):
        tensors.parse_input(_request("BYTES", (1, 3, 8, 8), bytes_contents=[b"x"]), META)


def test_requested_outputs_and_classification_parameter():
    request = pb.ModelInferRequest(model_name="tiny")
    assert tensor_outputs.requested_outputs(request, META) == [tensor_outputs.RequestedOutput("logits", None)]
    out = request.outputs.add(name="logits")
    out.parameters["classification"].int64_param = 2
    assert tensor_outputs.requested_outputs(request, META) == [tensor_outputs.RequestedOutput("logits", 2)]
    out.parameters["classification"].int64_param = 0
    with pytest.raises(errors.InvalidInput, match="'classification' must be an integer >= 1"):
        tensor_outputs.requested_outputs(request, META)
    request = pb.ModelInferRequest(model_name="tiny")
    request.outputs.add(name="probs")
    with pytest.raises(
        errors.InvalidInput, match="unknown output 'probs': model 'tiny' has one output, 'logits'"
    ):
        tensor_outputs.requested_outputs(request, META)


def test_outputs_are_raw_and_classification_is_tritons_format():
    logits = np.array([[0.5, 2.0, -1.0, 2.0], [3.0, 0.0, 1.0, -2.0]], dtype=np.float32)
    response = pb.ModelInferResponse()
    tensor_outputs.build_outputs(
        response,
        logits,
        [tensor_outputs.RequestedOutput("logits", None), tensor_outputs.RequestedOutput("logits", 9)],
        META,
    )
    raw_out, cls_out = response.outputs
    assert (raw_out.datatype, list(raw_out.shape)) == ("FP32", [2, 4])
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 4), logits)
    # k above the class count returns every class; ties keep the lower index first.
    assert (cls_out.datatype, list(cls_out.shape)) == ("BYTES", [2, 4])
    items = []
    raw = response.raw_output_contents[1]
    while raw:
        (n,) = struct.unpack_from("<I", raw)
        items.append(raw[4 : 4 + n].decode())
        raw = raw[4 + n :]
    assert items[:4] == ["2.000000:1:dog", "2.000000:3:yak", "0.500000:0:cat", "-1.000000:2:emu"]
    assert items[4] == "3.000000:0:cat"


# -- what a request declares is checked before anything grows with it --------------------------


def test_a_shape_is_refused_on_its_rank_before_its_dimensions_are_read():
    request = _request(shape=[1] * 1000, raw=b"")
    with pytest.raises(errors.InvalidInput) as info:
        tensors.parse_input(request, META)
    assert info.value.message == "input 'input': shape has 1000 dimensions; expected at most 8"


def test_rows_over_the_limit_are_refused_before_bytes_are_split():
    raw = tensor_outputs.encode_bytes([b"x"] * 5)
    with pytest.raises(errors.InvalidInput) as info:
        tensors.parse_input(_request("BYTES", (5,), raw=raw), META, max_rows=4)
    assert "batch of 5 rows; expected 1 to 4 rows per request (max_rows_per_request)" in info.value.message


def test_raw_bytes_stop_splitting_at_the_declared_count():
    """Sixteen empty elements under shape [1]: refused after reading two length prefixes."""
    raw = b"\0\0\0\0" * 16
    with pytest.raises(errors.InvalidInput) as info:
        tensors.parse_input(_request("BYTES", (1,), raw=raw), META)
    assert info.value.message == (
        "input 'input': shape needs 1 BYTES elements but raw_input_contents has 60 more bytes after element 0"
    )
    assert tensors.split_raw_bytes("input", tensor_outputs.encode_bytes([b"a", b"bc"]), 2) == [b"a", b"bc"]


def test_typed_bytes_are_counted_before_they_are_copied():
    with pytest.raises(errors.InvalidInput) as info:
        tensors.parse_input(_request("BYTES", (1,), bytes_contents=[b""] * 100), META)
    assert info.value.message == "input 'input': shape [1] needs 1 images, got 100"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "n" * 100_000}, "unknown input 'nnnnnnnn"),
        ({"datatype": "D" * 100_000, "raw": b""}, "got 'DDDDDDDD"),
    ],
)
def test_echoed_names_are_bounded(kwargs, fragment):
    with pytest.raises(errors.InvalidInput) as info:
        tensors.parse_input(_request(**kwargs), META)
    assert fragment in info.value.message and "(100000 characters)" in info.value.message
    assert len(info.value.message) < 400


def test_many_inputs_are_named_in_the_message_only_by_their_first_few():
    request = pb.ModelInferRequest(model_name="tiny")
    for i in range(10_000):
        request.inputs.add(name=f"in{i}")
    with pytest.raises(errors.InvalidInput) as info:
        tensors.parse_input(request, META)
    assert (
        info.value.message
        == "expected exactly 1 input ('input'), got 10000 ['in0', 'in1', 'in2', 'in3', ...]"
    )


def test_a_long_classification_parameter_is_refused_and_bounded():
    request = _request(raw=b"\0" * 768)
    request.outputs.add(name="logits").parameters["classification"].string_param = "9" * 100_000
    with pytest.raises(errors.InvalidInput) as info:
        tensor_outputs.requested_outputs(request, META)
    assert (
        "parameter 'classification' must be an integer >= 1 (top k), got string_param '999"
        in info.value.message
    )
    assert len(info.value.message) < 400
