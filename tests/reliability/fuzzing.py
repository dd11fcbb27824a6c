"""What the fuzzers check, shared by the hypothesis tests (test_fuzz.py) and the atheris harness.

Two entry points take untrusted bytes in svertka: the KServe tensor parsing
(``service.api.tensors``) and image decoding (``service.preprocess``). For
any input, each must either return a well-formed result or raise the domain
error :class:`service.errors.InvalidInput`; any other exception, a crash or a
hang is a bug. The ``check_*`` functions below assert exactly that, and
assert that what comes back is usable (right shape, dtype, finite values).
"""

from __future__ import annotations

import functools

import numpy as np

from service import config, errors
from service.api import tensor_outputs, tensors
from service.gen.inference import grpc_service_pb2 as kpb
from service.preprocess import Preprocessor
from tests.helpers.tinymodel import tiny_meta
from tests.reliability import hostile

META = tiny_meta(num_classes=10, size=32)


@functools.cache
def preprocessor() -> Preprocessor:
    return Preprocessor(META, max_pixels=config.DEFAULT_MAX_IMAGE_PIXELS)


@functools.cache
def seed_images() -> tuple[bytes, ...]:
    """Small valid images of every accepted format and the awkward modes: what mutations start from."""
    return (
        hostile.png(12, 9),
        hostile.png(8, 8, mode="RGBA"),
        hostile.png16(),
        hostile.palette_png(True),
        hostile.jpeg(16, 12),
        hostile.jpeg(16, 16, mode="L"),
        hostile.cmyk_jpeg(),
        hostile.jpeg(16, 16, progressive=True),
        hostile.exif_rotated_jpeg(),
        hostile.gif(2),
        hostile.webp(),
        hostile.bmp(),
    )


def check_decode(data: bytes) -> np.ndarray | None:
    """Decode ``data``; None if refused with InvalidInput, else the checked tensor."""
    try:
        x = preprocessor()(data)
    except errors.InvalidInput as exc:
        assert exc.message and "<_io." not in exc.message
        return None
    assert x.dtype == np.float32 and x.shape == META.input_shape, (x.dtype, x.shape)
    assert np.isfinite(x).all()
    return x


def check_parse(request: kpb.ModelInferRequest) -> tensors.ParsedInput | None:
    """Parse a ModelInfer request for the tiny model; None if refused with InvalidInput."""
    try:
        parsed = tensors.parse_input(request, META)
        outputs = tensor_outputs.requested_outputs(request, META)
    except errors.InvalidInput as exc:
        assert exc.message
        return None
    assert len(request.inputs) == 1 and request.inputs[0].name == META.input_name
    assert parsed.rows >= 1
    if parsed.tensor is not None:
        assert parsed.images is None
        assert parsed.tensor.dtype == np.float32
        assert parsed.tensor.shape == (parsed.rows, *META.input_shape)
    else:
        assert parsed.images is not None and len(parsed.images) == parsed.rows
        assert all(isinstance(item, bytes) for item in parsed.images)
    for out in outputs:
        assert out.name == META.output_name
        assert out.classification_k is None or out.classification_k >= 1
    return parsed


def check_request_bytes(data: bytes) -> None:
    """Untrusted wire bytes -> protobuf -> parse (protobuf's own DecodeError is the transport's business)."""
    from google.protobuf.message import DecodeError

    try:
        request = kpb.ModelInferRequest.FromString(data)
    except DecodeError:
        return
    check_parse(request)


def check_split(raw: bytes) -> None:
    """Raw BYTES splitting: a list whose re-encoding is the input, or InvalidInput."""
    try:
        items = tensors.split_raw_bytes("input", raw)
    except errors.InvalidInput:
        return
    assert tensor_outputs.encode_bytes(items) == raw
