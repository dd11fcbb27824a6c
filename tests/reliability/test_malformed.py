"""The malformed-request catalogue: every bad (or merely unusual) request, its exact status and message.

One table, one parametrized test, both APIs. Each row is a request a real
client could send, the exact gRPC status it must get, and a phrase the
message must contain that names the problem (what was wrong, what was
expected). Rows with ``OK`` are inputs that look odd but are valid and must
be served: 1x1 and extremely thin images, CMYK JPEGs, 16-bit and palette
PNGs, animated GIFs, top_k above the class count, unknown parameters.

The requests are built lazily (some images take a moment to make), so the
table costs nothing when deselected.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message

from service.gen.inference import grpc_service_pb2 as kpb
from service.gen.inference import grpc_service_pb2_grpc as kgrpc
from service.gen.svertka.v1 import classifier_pb2 as cpb
from service.gen.svertka.v1 import classifier_pb2_grpc as cgrpc
from tests.api.conftest import InProcessServer
from tests.helpers.tinymodel import make_repository
from tests.reliability import hostile

C = grpc.StatusCode
MAX_MESSAGE_BYTES = 1 << 20
PIXEL_LIMIT = "more than the limit of 40000000 (max_image_pixels)"


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    call: str  # "classify" | "infer" | "classify_stream" | "infer_stream"
    build: Callable[[], Message]
    code: grpc.StatusCode
    message: str | None = None  # must appear in the error message (None for OK)
    outputs: int | None = None  # OK rows: predictions (image API) or classes per row (tensor API)


# -- request builders ---------------------------------------------------------------
def classify(image: bytes | Callable[[], bytes], **fields) -> Callable[[], cpb.ClassifyRequest]:
    def build():
        data = image() if callable(image) else image
        return cpb.ClassifyRequest(**{"model": "tiny", **fields}, image=data)

    return build


def infer(
    shape=(1, 3, 32, 32),
    *,
    model="tiny",
    version="",
    datatype="FP32",
    name="input",
    raw: bytes | None = None,
    values=None,
    fp32=None,
    edit: Callable[[kpb.ModelInferRequest], None] | None = None,
) -> Callable[[], kpb.ModelInferRequest]:
    """A ModelInfer request: by default raw zeros of the right size for ``shape``."""

    def build():
        request = kpb.ModelInferRequest(model_name=model, model_version=version)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(shape))
        if fp32 is not None:
            tensor.contents.fp32_contents.extend(fp32)
        elif values is not None:
            request.raw_input_contents.append(np.asarray(values, "<f4").tobytes())
        elif raw is not None:
            request.raw_input_contents.append(raw)
        else:
            request.raw_input_contents.append(b"\0" * (4 * math.prod(shape)))
        if edit is not None:
            edit(request)
        return request

    return build


def images_tensor(*items: bytes, raw: bytes | None = None, shape=None) -> Callable[[], kpb.ModelInferRequest]:
    """A BYTES request carrying encoded images (typed bytes_contents, or ``raw``)."""

    def build():
        request = kpb.ModelInferRequest(model_name="tiny")
        tensor = request.inputs.add(name="input", datatype="BYTES", shape=list(shape or [len(items)]))
        if raw is not None:
            request.raw_input_contents.append(raw)
        else:
            tensor.contents.bytes_contents.extend(items)
        return request

    return build


def _with_nan() -> np.ndarray:
    x = np.zeros((1, 3, 32, 32), np.float32)
    x[0, 1, 2, 3] = np.nan
    return x


def _inf_list() -> list[float]:
    values = [0.0] * (3 * 32 * 32)
    values[5] = math.inf
    values[6] = -math.inf
    return values


def _add_input(request):
    request.inputs.add(name="extra", datatype="FP32", shape=[1])


def _drop_inputs(request):
    del request.inputs[:]
    del request.raw_input_contents[:]


def _second_raw(request):
    request.raw_input_contents.append(b"\0" * 4)


def _typed_too(request):
    request.inputs[0].contents.fp32_contents.extend([0.0] * 12288)


def _int_contents(request):
    del request.raw_input_contents[:]
    request.inputs[0].contents.int_contents.extend([0] * 12288)


def _output(name: str = "logits", twice: bool = False, classification=None):
    def edit(request):
        for _ in range(2 if twice else 1):
            out = request.outputs.add(name=name)
            if isinstance(classification, int):
                out.parameters["classification"].int64_param = classification
            elif isinstance(classification, str):
                out.parameters["classification"].string_param = classification

    return edit


def _unknown_parameters(request):
    request.parameters["timeout"].int64_param = 5_000_000
    request.parameters["priority"].uint64_param = 1
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    request.parameters["made_up_by_a_client"].string_param = "whatever"
    request.inputs[0].parameters["binary_data_size"].int64_param = 12288


def _lengths(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


H = hostile
# fmt: off
IMAGE_CASES = [
    # Broken or not images at all.
    Case("empty-image", "classify", classify(b""), C.INVALID_ARGUMENT, "image: empty; expected encoded image bytes"),
    Case("truncated-png", "classify", classify(lambda: H.png()[:60]), C.INVALID_ARGUMENT, "PNG image is corrupt or truncated"),
    Case("half-png", "classify", classify(lambda: H.png()[:2000]), C.INVALID_ARGUMENT, "PNG image is corrupt or truncated"),
    Case("corrupt-png-stream", "classify", classify(H.png_corrupt_stream), C.INVALID_ARGUMENT, "PNG image is corrupt or truncated"),
    Case("truncated-jpeg", "classify", classify(lambda: H.jpeg()[:1000]), C.INVALID_ARGUMENT, "JPEG image is corrupt or truncated"),
    Case("jpeg-header-only", "classify", classify(b"\xff\xd8\xff\xe0" + b"\0" * 20), C.INVALID_ARGUMENT, "JPEG image is corrupt or truncated: cannot read its header"),
    Case("corrupt-jpeg-scan", "classify", classify(H.jpeg_corrupt_scan), C.INVALID_ARGUMENT, "JPEG image is corrupt or truncated"),
    Case("truncated-gif", "classify", classify(lambda: H.gif(1)[:30]), C.INVALID_ARGUMENT, "GIF image is corrupt or truncated"),
    Case("truncated-webp", "classify", classify(lambda: H.webp()[:30]), C.INVALID_ARGUMENT, "WEBP image is corrupt or truncated"),
    Case("truncated-bmp", "classify", classify(lambda: H.bmp()[:40]), C.INVALID_ARGUMENT, "BMP image is corrupt or truncated"),
    Case("palette-png-without-palette", "classify", classify(H.palette_png_without_plte), C.INVALID_ARGUMENT, "PNG image has palette mode P but no palette"),
    Case("zero-width-png", "classify", classify(lambda: H.png_claiming(0, 10)), C.INVALID_ARGUMENT, "PNG image is corrupt or truncated"),
    Case("text", "classify", classify(b"hello world"), C.INVALID_ARGUMENT, "not an image: 11 bytes that are not JPEG, PNG, WebP, BMP or GIF (it starts with the text 'hello wo')"),
    Case("json", "classify", classify(b'{"image": "aGVsbG8="}'), C.INVALID_ARGUMENT, "not an image: 21 bytes that are not JPEG, PNG, WebP, BMP or GIF (it looks like JSON text)"),
    Case("pdf", "classify", classify(b"%PDF-1.7\n%\xe2\xe3"), C.INVALID_ARGUMENT, "(it starts with the text '%PDF-1.7')"),
    Case("elf", "classify", classify(b"\x7fELF\x02\x01\x01" + b"\0" * 9), C.INVALID_ARGUMENT, "(its first bytes are 7f 45 4c 46 02 01 01 00)"),
    Case("tiff-not-accepted", "classify", classify(H.tiff), C.INVALID_ARGUMENT, "not an image:"),
    Case("svg-not-accepted", "classify", classify(b"<svg xmlns='http://www.w3.org/2000/svg'/>"), C.INVALID_ARGUMENT, "(it starts with the text '<svg xml')"),
    # Decompression bombs: refused from the header, before any pixel is decoded.
    Case("bomb-png-header", "classify", classify(lambda: H.png_claiming(20000, 20000)), C.INVALID_ARGUMENT, f"PNG image has 400000000 pixels, {PIXEL_LIMIT}"),
    Case("bomb-png-real", "classify", classify(H.real_png_bomb), C.INVALID_ARGUMENT, f"PNG image is 7000x7000 = 49000000 pixels, {PIXEL_LIMIT}"),
    Case("bomb-jpeg-header", "classify", classify(lambda: H.jpeg_claiming(30000, 30000)), C.INVALID_ARGUMENT, f"JPEG image has 900000000 pixels, {PIXEL_LIMIT}"),
    Case("bomb-gif-header", "classify", classify(lambda: H.gif_claiming(65535, 65535)), C.INVALID_ARGUMENT, f"GIF image has 4294836225 pixels, {PIXEL_LIMIT}"),
    Case("bomb-bmp-header", "classify", classify(lambda: H.bmp_claiming(30000, 30000)), C.INVALID_ARGUMENT, f"BMP image has 900000000 pixels, {PIXEL_LIMIT}"),
    # Unusual but valid: served.
    Case("1x1-png", "classify", classify(lambda: H.png(1, 1)), C.OK, outputs=5),
    Case("1x2000-png", "classify", classify(lambda: H.png(1, 2000)), C.OK, outputs=5),
    Case("3000x1-jpeg", "classify", classify(lambda: H.jpeg(3000, 1)), C.OK, outputs=5),
    Case("cmyk-jpeg", "classify", classify(H.cmyk_jpeg), C.OK, outputs=5),
    Case("grey-jpeg", "classify", classify(lambda: H.jpeg(mode="L")), C.OK, outputs=5),
    Case("progressive-jpeg", "classify", classify(lambda: H.jpeg(progressive=True)), C.OK, outputs=5),
    Case("exif-rotated-jpeg", "classify", classify(H.exif_rotated_jpeg), C.OK, outputs=5),
    Case("16-bit-png", "classify", classify(H.png16), C.OK, outputs=5),
    Case("palette-png", "classify", classify(H.palette_png), C.OK, outputs=5),
    Case("palette-png-transparency", "classify", classify(lambda: H.palette_png(True)), C.OK, outputs=5),
    Case("rgba-png", "classify", classify(lambda: H.png(mode="RGBA")), C.OK, outputs=5),
    Case("grey-alpha-png", "classify", classify(lambda: H.png(mode="LA")), C.OK, outputs=5),
    Case("animated-gif", "classify", classify(lambda: H.gif(3)), C.OK, outputs=5),
    Case("webp", "classify", classify(H.webp), C.OK, outputs=5),
    Case("bmp", "classify", classify(H.bmp), C.OK, outputs=5),
    # Models, versions, top_k, size.
    Case("unknown-model", "classify", classify(H.png, model="nope"), C.NOT_FOUND, "model 'nope' is not in the repository (models: small, tiny)"),
    Case("unknown-version", "classify", classify(H.png, version=7), C.NOT_FOUND, "model 'tiny' has no version 7 (versions in the repository: 1, 2)"),
    Case("version-not-loaded", "classify", classify(H.png, version=1), C.UNAVAILABLE, "model 'tiny' version 1 is not loaded (version 2 is serving)"),
    Case("negative-version", "classify", classify(H.png, version=-2), C.INVALID_ARGUMENT, "version: expected a positive integer or 0 (newest), got -2"),
    Case("path-in-model-name", "classify", classify(H.png, model="../tiny"), C.INVALID_ARGUMENT, "model name '../tiny' is invalid"),
    Case("model-required", "classify", classify(H.png, model=""), C.INVALID_ARGUMENT, "model: required because this server serves several models"),
    Case("top-k-zero", "classify", classify(H.png, top_k=0), C.INVALID_ARGUMENT, "top_k: expected >= 1 (or unset for 5), got 0"),
    Case("top-k-negative", "classify", classify(H.png, top_k=-1), C.INVALID_ARGUMENT, "top_k: expected >= 1 (or unset for 5), got -1"),
    Case("top-k-above-classes", "classify", classify(H.png, top_k=11), C.OK, outputs=10),
    Case("oversized-message", "classify", classify(b"\xff\xd8\xff" + b"\0" * (MAX_MESSAGE_BYTES + 10)), C.RESOURCE_EXHAUSTED, "Received message larger than max"),
    Case("stream-bad-image", "classify_stream", classify(b"GIF89a\x01"), C.INVALID_ARGUMENT, "GIF image is corrupt or truncated"),
]

TENSOR_CASES = [
    # Which model.
    Case("unknown-model", "infer", infer(model="nope"), C.NOT_FOUND, "model 'nope' is not in the repository"),
    Case("unknown-version", "infer", infer(version="9"), C.NOT_FOUND, "model 'tiny' has no version 9 (versions in the repository: 1, 2)"),
    Case("version-not-loaded", "infer", infer(version="1"), C.UNAVAILABLE, "model 'tiny' version 1 is not loaded (version 2 is serving)"),
    Case("version-not-a-number", "infer", infer(version="latest"), C.INVALID_ARGUMENT, "model version: expected a positive integer or empty, got 'latest'"),
    Case("version-zero", "infer", infer(version="0"), C.INVALID_ARGUMENT, "model version: expected a positive integer or empty, got '0'"),
    Case("no-model-name", "infer", infer(model=""), C.INVALID_ARGUMENT, "model name: required"),
    Case("path-in-model-name", "infer", infer(model="../../etc"), C.INVALID_ARGUMENT, "model name '../../etc' is invalid"),
    # Which inputs.
    Case("wrong-input-name", "infer", infer(name="pixels"), C.INVALID_ARGUMENT, "unknown input 'pixels': model 'tiny' has one input, 'input'"),
    Case("no-inputs", "infer", infer(edit=_drop_inputs), C.INVALID_ARGUMENT, "expected exactly 1 input ('input'), got 0"),
    Case("two-inputs", "infer", infer(edit=_add_input), C.INVALID_ARGUMENT, "expected exactly 1 input ('input'), got 2 ['input', 'extra']"),
    Case("two-raw-entries", "infer", infer(edit=_second_raw), C.INVALID_ARGUMENT, "raw_input_contents: expected one entry per input (1), got 2"),
    # Datatype and shape.
    Case("datatype-int64", "infer", infer(datatype="INT64"), C.INVALID_ARGUMENT, "expected datatype FP32 (a [N,3,32,32] tensor) or BYTES (encoded images), got 'INT64'"),
    Case("datatype-fp16", "infer", infer(datatype="FP16"), C.INVALID_ARGUMENT, "or BYTES (encoded images), got 'FP16'"),
    Case("datatype-unknown", "infer", infer(datatype="FLOAT32"), C.INVALID_ARGUMENT, "got 'FLOAT32' (not a KServe datatype; known: BOOL"),
    Case("datatype-missing", "infer", infer(datatype=""), C.INVALID_ARGUMENT, "or BYTES (encoded images), got no datatype"),
    Case("rank-3", "infer", infer((3, 32, 32)), C.INVALID_ARGUMENT, "input 'input': expected FP32 shape [N,3,32,32], got [3,32,32]"),
    Case("wrong-height", "infer", infer((1, 3, 16, 32)), C.INVALID_ARGUMENT, "expected FP32 shape [N,3,32,32], got [1,3,16,32]"),
    Case("channels-last", "infer", infer((1, 32, 32, 3)), C.INVALID_ARGUMENT, "expected FP32 shape [N,3,32,32], got [1,32,32,3]"),
    Case("negative-dim", "infer", infer((-1, 3, 32, 32), raw=b""), C.INVALID_ARGUMENT, "shape [-1,3,32,32] has a negative dimension"),
    Case("overflowing-dim", "infer", infer((2**62, 3, 32, 32), raw=b""), C.INVALID_ARGUMENT, "shape [4611686018427387904,3,32,32] is too large"),
    Case("zero-batch", "infer", infer((0, 3, 32, 32)), C.INVALID_ARGUMENT, "batch dimension must be >= 1, got [0,3,32,32]"),
    Case("too-many-rows", "infer", infer((65, 3, 32, 32)), C.INVALID_ARGUMENT, "batch of 65 rows; expected 1 to 64 rows per request (max_rows_per_request)"),
    # Data.
    Case("raw-4-bytes-short", "infer", infer(raw=b"\0" * 12284), C.INVALID_ARGUMENT, "input 'input': expected FP32 with 12288 bytes for shape [1,3,32,32], got 12284 bytes"),
    Case("raw-too-long", "infer", infer(raw=b"\0" * 12292), C.INVALID_ARGUMENT, "expected FP32 with 12288 bytes for shape [1,3,32,32], got 12292 bytes"),
    Case("raw-and-typed", "infer", infer(edit=_typed_too), C.INVALID_ARGUMENT, "data given both in raw_input_contents and in contents.fp32_contents; send one"),
    Case("typed-wrong-field", "infer", infer(edit=_int_contents), C.INVALID_ARGUMENT, "datatype FP32 carries typed data in contents.fp32_contents, got contents.int_contents"),
    Case("typed-too-few", "infer", infer(fp32=[0.0] * 5, edit=lambda r: r.ClearField("raw_input_contents")), C.INVALID_ARGUMENT, "expected 3072 FP32 values for shape [1,3,32,32], got 5 in contents.fp32_contents"),
    Case("no-data", "infer", infer(edit=lambda r: r.ClearField("raw_input_contents")), C.INVALID_ARGUMENT, "got 0 in contents.fp32_contents (and no raw_input_contents)"),
    Case("nan-raw", "infer", infer(values=_with_nan()), C.INVALID_ARGUMENT, "input 'input': 1 values are NaN or infinite; expected finite FP32 values"),
    Case("inf-typed", "infer", infer(fp32=_inf_list(), edit=lambda r: r.ClearField("raw_input_contents")), C.INVALID_ARGUMENT, "2 values are NaN or infinite"),
    Case("typed-valid", "infer", infer(fp32=[0.25] * 3072, edit=lambda r: r.ClearField("raw_input_contents")), C.OK, outputs=10),
    # BYTES inputs (encoded images).
    Case("bytes-corrupt-image", "infer", images_tensor(H.png(), b"junk"), C.INVALID_ARGUMENT, "input 'input' element 1: not an image: 4 bytes"),
    Case("bytes-bomb", "infer", images_tensor(H.png_claiming(20000, 20000)), C.INVALID_ARGUMENT, f"input 'input' element 0: PNG image has 400000000 pixels, {PIXEL_LIMIT}"),
    Case("bytes-raw-truncated-prefix", "infer", images_tensor(raw=_lengths(b"abc") + b"\x05\0", shape=[2]), C.INVALID_ARGUMENT, "raw BYTES element 1 is truncated: 2 bytes left where a 4-byte length prefix was expected"),
    Case("bytes-raw-length-lies", "infer", images_tensor(raw=struct.pack("<I", 1000) + b"abc", shape=[1]), C.INVALID_ARGUMENT, "raw BYTES element 0 declares 1000 bytes but only 3 remain"),
    Case("bytes-wrong-shape", "infer", images_tensor(b"a", b"b", shape=[1, 2]), C.INVALID_ARGUMENT, "BYTES input holds encoded images with shape [N] or [N,1], got [1,2]"),
    Case("bytes-count-mismatch", "infer", images_tensor(b"a", b"b", shape=[3]), C.INVALID_ARGUMENT, "shape [3] needs 3 images, got 2"),
    Case("bytes-overflowing-dim", "infer", images_tensor(b"a", shape=[2**62]), C.INVALID_ARGUMENT, "shape [4611686018427387904] is too large"),
    Case("bytes-valid-raw", "infer", images_tensor(raw=_lengths(H.png(), H.jpeg()), shape=[2, 1]), C.OK, outputs=10),
    # Outputs and parameters.
    Case("unknown-output", "infer", infer(edit=_output("probs")), C.INVALID_ARGUMENT, "unknown output 'probs': model 'tiny' has one output, 'logits'"),
    Case("output-twice", "infer", infer(edit=_output(twice=True)), C.INVALID_ARGUMENT, "output 'logits' requested twice"),
    Case("classification-zero", "infer", infer(edit=_output(classification=0)), C.INVALID_ARGUMENT, "parameter 'classification' must be an integer >= 1 (top k)"),
    Case("classification-not-a-number", "infer", infer(edit=_output(classification="three")), C.INVALID_ARGUMENT, "parameter 'classification' must be an integer >= 1 (top k)"),
    Case("classification-above-classes", "infer", infer(edit=_output(classification=11)), C.OK, outputs=10),
    Case("unknown-parameters", "infer", infer(edit=_unknown_parameters), C.OK, outputs=10),
    Case("oversized-message", "infer", infer((90, 3, 32, 32)), C.RESOURCE_EXHAUSTED, "Received message larger than max"),
    Case("stream-wrong-byte-count", "infer_stream", infer(raw=b"\0" * 100), C.INVALID_ARGUMENT, "expected FP32 with 12288 bytes for shape [1,3,32,32], got 100 bytes"),
]
# fmt: on

CASES = [pytest.param(c, id=f"image-{c.id}") for c in IMAGE_CASES] + [
    pytest.param(c, id=f"tensor-{c.id}") for c in TENSOR_CASES
]


def test_the_catalogue_is_large_and_unambiguous():
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids))
    failing = [c for c in IMAGE_CASES + TENSOR_CASES if c.code != C.OK]
    assert len(failing) >= 40
    assert all(c.message for c in failing)


@pytest.fixture(scope="module", params=["one-process", "engine-process"])
def srv(request, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    make_repository(repo, {"tiny": [1, 2]})
    # The NaN/Inf rows need the refusal, which is per model and off by default (as in Triton).
    (repo / "tiny" / "config.yaml").write_text("reject_non_finite_inputs: true\n")
    make_repository(repo, {"small": [1]}, num_classes=4, size=16)
    server = InProcessServer(
        repo, max_message_bytes=MAX_MESSAGE_BYTES, engine_process=request.param == "engine-process"
    )
    yield server
    server.close()


@pytest.fixture(scope="module")
def stubs(srv):
    # The client may send more than the server accepts: the server's limit is what is tested.
    with srv.channel(**{"grpc.max_send_message_length": 4 * MAX_MESSAGE_BYTES}) as channel:
        yield cgrpc.ImageClassifierStub(channel), kgrpc.GRPCInferenceServiceStub(channel)


def _stream_then_good(method, bad: Message, good: Message):
    """Send a bad request then a good one on one stream: the error is in-band and the stream lives on."""
    replies = list(method(iter([bad, good]), timeout=30))
    assert len(replies) == 2
    return replies


@pytest.mark.parametrize("case", CASES)
def test_malformed_request(stubs, case: Case):
    image_api, tensor_api = stubs
    request = case.build()
    if case.call == "classify_stream":
        bad_reply, good_reply = _stream_then_good(
            image_api.ClassifyStream, request, cpb.ClassifyRequest(model="tiny", image=hostile.png())
        )
        assert bad_reply.error.code_name == case.code.name
        assert case.message in bad_reply.error.message
        assert not good_reply.HasField("error") and len(good_reply.predictions) == 5
        return
    if case.call == "infer_stream":
        bad_reply, good_reply = _stream_then_good(tensor_api.ModelStreamInfer, request, infer()())
        assert case.message in bad_reply.error_message  # Triton's stream carries messages, not codes
        assert not good_reply.error_message and good_reply.infer_response.model_version == "2"
        return
    method = image_api.Classify if case.call == "classify" else tensor_api.ModelInfer
    if case.code != C.OK:
        with pytest.raises(grpc.RpcError) as info:
            method(request, timeout=30)
        assert info.value.code() == case.code, info.value.details()
        assert case.message in info.value.details()
        assert "<_io." not in info.value.details() and " object at 0x" not in info.value.details()
        return
    response = method(request, timeout=30)
    if case.call == "classify":
        assert len(response.predictions) == case.outputs
        scores = [p.score for p in response.predictions]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
    else:
        out = response.outputs[0]
        assert out.shape[-1] == case.outputs and all(math.isfinite(v) for v in _floats(response))


def _floats(response: kpb.ModelInferResponse) -> list[float]:
    out = response.outputs[0]
    if out.datatype == "FP32":
        return np.frombuffer(response.raw_output_contents[0], "<f4").tolist()
    return [0.0]  # classification strings: their count is checked by the shape


def test_an_animated_gif_is_classified_by_its_first_frame(stubs):
    image_api, _ = stubs
    animated = image_api.Classify(
        cpb.ClassifyRequest(model="tiny", image=hostile.gif(3), top_k=10), timeout=30
    )
    first = image_api.Classify(cpb.ClassifyRequest(model="tiny", image=hostile.gif(1), top_k=10), timeout=30)
    assert [(p.index, p.score) for p in animated.predictions] == [
        (p.index, p.score) for p in first.predictions
    ]
