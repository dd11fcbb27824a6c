"""Every error path of both APIs: the exact status code and a message that names the problem."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from service.gen.inference import grpc_service_pb2 as kpb
from service.gen.inference import grpc_service_pb2_grpc as kgrpc
from service.gen.svertka.v1 import classifier_pb2 as cpb
from service.gen.svertka.v1 import classifier_pb2_grpc as cgrpc
from tests.api import images
from tests.helpers.tinymodel import make_repository

C = grpc.StatusCode


def _error(fn, request):
    with pytest.raises(grpc.RpcError) as info:
        fn(request, timeout=30)
    return info.value.code(), info.value.details()


@pytest.fixture(scope="module")
def stubs(server):
    with server.channel() as channel:
        yield cgrpc.ImageClassifierStub(channel), kgrpc.GRPCInferenceServiceStub(channel)


def _tensor_request(shape=(1, 3, 32, 32), *, model="tiny", version="", nbytes=None, values=None):
    request = kpb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="input", datatype="FP32", shape=list(shape))
    if values is not None:
        request.raw_input_contents.append(np.asarray(values, "<f4").tobytes())
    else:
        count = int(np.prod(shape)) if nbytes is None else nbytes // 4
        request.raw_input_contents.append(b"\0" * (count * 4 if nbytes is None else nbytes))
    return request


IMAGE_CASES = [
    (
        cpb.ClassifyRequest(model="nope", image=images.png(1)),
        C.NOT_FOUND,
        "model 'nope' is not in the repository (models: small, tiny)",
    ),
    (
        cpb.ClassifyRequest(model="tiny", version=7, image=images.png(1)),
        C.NOT_FOUND,
        "model 'tiny' has no version 7 (versions in the repository: 1, 2)",
    ),
    (
        cpb.ClassifyRequest(model="tiny", version=1, image=images.png(1)),
        C.UNAVAILABLE,
        "model 'tiny' version 1 is not loaded (version 2 is serving)",
    ),
    (
        cpb.ClassifyRequest(model="tiny", version=-1, image=images.png(1)),
        C.INVALID_ARGUMENT,
        "version: expected a positive integer or 0 (newest), got -1",
    ),
    (
        cpb.ClassifyRequest(model="../tiny", image=images.png(1)),
        C.INVALID_ARGUMENT,
        "model name '../tiny' is invalid",
    ),
    (
        cpb.ClassifyRequest(image=images.png(1)),
        C.INVALID_ARGUMENT,
        "model: required because this server serves several models: ['small', 'tiny']",
    ),
    (cpb.ClassifyRequest(model="tiny"), C.INVALID_ARGUMENT, "image: empty; expected encoded image bytes"),
    (
        cpb.ClassifyRequest(model="tiny", image=b"GIF89a not really"),
        C.INVALID_ARGUMENT,
        "GIF image is corrupt or truncated",
    ),
    (
        cpb.ClassifyRequest(model="tiny", image=b"hello world"),
        C.INVALID_ARGUMENT,
        "not an image: 11 bytes that are not JPEG, PNG, WebP, BMP or GIF",
    ),
    (
        cpb.ClassifyRequest(model="tiny", image=images.png(1)[:60]),
        C.INVALID_ARGUMENT,
        "PNG image is corrupt or truncated",
    ),
    (
        cpb.ClassifyRequest(model="tiny", image=images.png(1), top_k=0),
        C.INVALID_ARGUMENT,
        "top_k: expected >= 1 (or unset for 5), got 0",
    ),
    (
        cpb.ClassifyRequest(model="tiny", image=images.png(1), top_k=-3),
        C.INVALID_ARGUMENT,
        "top_k: expected >= 1 (or unset for 5), got -3",
    ),
]


@pytest.mark.parametrize(("request_", "code", "message"), IMAGE_CASES)
def test_image_api_errors(stubs, request_, code, message):
    got_code, details = _error(stubs[0].Classify, request_)
    assert got_code == code
    assert message in details


def _tensor_cases():
    wrong_name = _tensor_request()
    wrong_name.inputs[0].name = "pixels"
    wrong_type = _tensor_request()
    wrong_type.inputs[0].datatype = "INT64"
    two_inputs = _tensor_request()
    two_inputs.inputs.add(name="extra", datatype="FP32", shape=[1])
    bad_output = _tensor_request()
    bad_output.outputs.add(name="probs")
    return [
        (
            _tensor_request(nbytes=1000),
            C.INVALID_ARGUMENT,
            "input 'input': expected FP32 with 12288 bytes for shape [1,3,32,32], got 1000 bytes",
        ),
        (
            _tensor_request((1, 3, 16, 16)),
            C.INVALID_ARGUMENT,
            "input 'input': expected FP32 shape [N,3,32,32], got [1,3,16,16]",
        ),
        (_tensor_request((-1, 3, 32, 32), nbytes=0), C.INVALID_ARGUMENT, "has a negative dimension"),
        (_tensor_request((2**40, 3, 32, 32), nbytes=0), C.INVALID_ARGUMENT, "is too large"),
        (
            _tensor_request((65, 3, 32, 32)),
            C.INVALID_ARGUMENT,
            "batch of 65 rows; expected 1 to 64 rows per request",
        ),
        (wrong_name, C.INVALID_ARGUMENT, "unknown input 'pixels': model 'tiny' has one input, 'input'"),
        (
            wrong_type,
            C.INVALID_ARGUMENT,
            "expected datatype FP32 (a [N,3,32,32] tensor) or BYTES (encoded images), got 'INT64'",
        ),
        (two_inputs, C.INVALID_ARGUMENT, "expected exactly 1 input ('input'), got 2 ['input', 'extra']"),
        (bad_output, C.INVALID_ARGUMENT, "unknown output 'probs': model 'tiny' has one output, 'logits'"),
        (_tensor_request(model=""), C.INVALID_ARGUMENT, "model name: required"),
        (_tensor_request(model="nope"), C.NOT_FOUND, "model 'nope' is not in the repository"),
        (
            _tensor_request(version="x"),
            C.INVALID_ARGUMENT,
            "model version: expected a positive integer or empty, got 'x'",
        ),
        (_tensor_request(version="9"), C.NOT_FOUND, "model 'tiny' has no version 9"),
        # One spelling per version (service.layout): no leading zero, ASCII digits, at most 2**63-1.
        *(
            (
                _tensor_request(version=version),
                C.INVALID_ARGUMENT,
                f"model version: expected a positive integer or empty, got {version!r} "
                "(a version is a decimal integer from 1 to 9223372036854775807 without leading zeros)",
            )
            for version in ("02", "\u00b2", "9223372036854775808", "99999999999999999999999", " 2", "+2")
        ),
        (
            _tensor_request(version="9" * 100_000),
            C.INVALID_ARGUMENT,
            "got '9999999999999999999999999999999999999999999999999999999999999999'... (100000 characters)",
        ),
        (
            _tensor_request(version="9223372036854775807"),
            C.NOT_FOUND,
            "model 'tiny' has no version 9223372036854775807",
        ),
    ]


@pytest.mark.parametrize(("request_", "code", "message"), _tensor_cases())
def test_tensor_api_errors(stubs, request_, code, message):
    got_code, details = _error(stubs[1].ModelInfer, request_)
    assert got_code == code
    assert message in details


def test_bad_image_in_a_bytes_request_names_its_index(stubs):
    request = kpb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="input", datatype="BYTES", shape=[3])
    request.inputs[0].contents.bytes_contents.extend([images.png(1), b"junk", images.png(2)])
    code, details = _error(stubs[1].ModelInfer, request)
    assert code == C.INVALID_ARGUMENT
    assert details.startswith("input 'input' element 1: not an image: 4 bytes")


@pytest.mark.parametrize(
    ("rpc", "request_"),
    [
        ("CudaSharedMemoryRegister", kpb.CudaSharedMemoryRegisterRequest(name="r")),
        ("TraceSetting", kpb.TraceSettingRequest()),
        ("LogSettings", kpb.LogSettingsRequest()),
    ],
)
def test_unsupported_rpcs_are_unimplemented_with_a_reason(stubs, rpc, request_):
    code, details = _error(getattr(stubs[1], rpc), request_)
    assert code == C.UNIMPLEMENTED
    assert details.startswith(f"{rpc} is not supported by svertka: ")


def test_metadata_of_unknown_models(stubs):
    assert _error(stubs[1].ModelMetadata, kpb.ModelMetadataRequest(name="nope"))[0] == C.NOT_FOUND
    assert _error(stubs[1].ModelConfig, kpb.ModelConfigRequest(name="nope"))[0] == C.NOT_FOUND
    assert _error(stubs[1].ModelReady, kpb.ModelReadyRequest(name="nope"))[0] == C.NOT_FOUND
    assert _error(stubs[1].ModelStatistics, kpb.ModelStatisticsRequest(name="nope"))[0] == C.NOT_FOUND


def test_model_control_is_off_by_default(stubs):
    code, details = _error(stubs[1].RepositoryModelLoad, kpb.RepositoryModelLoadRequest(model_name="tiny"))
    assert code == C.PERMISSION_DENIED
    assert "--enable-model-control" in details
    code, _ = _error(stubs[1].RepositoryModelUnload, kpb.RepositoryModelUnloadRequest(model_name="tiny"))
    assert code == C.PERMISSION_DENIED


def _nan_request(model: str = "tiny") -> kpb.ModelInferRequest:
    nan = np.zeros((1, 3, 32, 32), np.float32)
    nan[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    return _tensor_request(values=nan, model=model)


def test_non_finite_inputs_are_computed_by_default_as_triton_does(stubs):
    response = stubs[1].ModelInfer(_nan_request(), timeout=30)
    assert response.model_version == "2" and list(response.outputs[0].shape) == [1, 10]


def test_non_finite_inputs_are_refused_where_the_model_asks(make_server, tmp_path):
    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    (repo / "tiny" / "config.yaml").write_text("reject_non_finite_inputs: true\n")
    with make_server(repo).channel() as channel:
        code, details = _error(kgrpc.GRPCInferenceServiceStub(channel).ModelInfer, _nan_request())
    assert code == C.INVALID_ARGUMENT
    assert details == "input 'input': 3 values are NaN or infinite; expected finite FP32 values"


def test_a_huge_model_name_is_quoted_bounded(stubs):
    for fn, request in (
        (stubs[0].Classify, cpb.ClassifyRequest(model="../" + "x" * 1_000_000, image=images.png(1))),
        (stubs[1].ModelInfer, _tensor_request(model="../" + "x" * 1_000_000)),
    ):
        code, details = _error(fn, request)
        assert code == C.INVALID_ARGUMENT
        assert details.startswith("model name '../xxxx") and "... (1000003 characters) is invalid" in details
        assert len(details) < 400


def test_model_control_when_enabled(make_server, tmp_path):
    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    srv = make_server(repo, enable_model_control=True)
    with srv.channel() as channel:
        stub = kgrpc.GRPCInferenceServiceStub(channel)
        for name in ("../tiny", "a/b", "..", ".hidden", "x" * 200):
            code, details = _error(stub.RepositoryModelLoad, kpb.RepositoryModelLoadRequest(model_name=name))
            assert code == C.INVALID_ARGUMENT, name
            assert "is invalid" in details
        upload = kpb.RepositoryModelLoadRequest(model_name="tiny")
        upload.parameters["file:1/model.onnx"].bytes_param = b"\0"
        code, details = _error(stub.RepositoryModelLoad, upload)
        assert code == C.UNIMPLEMENTED and "never from request content" in details
        code, _ = _error(stub.RepositoryModelLoad, kpb.RepositoryModelLoadRequest(model_name="absent"))
        assert code == C.NOT_FOUND

        stub.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="tiny"))
        assert stub.ModelReady(kpb.ModelReadyRequest(name="tiny")).ready is False
        code, details = _error(stub.ModelInfer, _tensor_request())
        assert code == C.UNAVAILABLE and "model 'tiny' is unavailable: unloaded" in details

        # A new version dropped in, then loaded on request.
        make_repository(repo, {"tiny": [2]})
        stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="tiny"))
        assert stub.ModelReady(kpb.ModelReadyRequest(name="tiny")).ready is True
        assert stub.ModelInfer(_tensor_request()).model_version == "2"


def test_oversized_messages_are_resource_exhausted(make_server):
    srv = make_server(max_message_bytes=64 * 1024)
    with srv.channel() as channel:
        code, details = _error(
            cgrpc.ImageClassifierStub(channel).Classify,
            cpb.ClassifyRequest(model="tiny", image=b"\xff" * 100_000),
        )
    assert code == C.RESOURCE_EXHAUSTED
    assert "larger than max" in details


def test_a_request_that_can_never_fit_the_queue_is_resource_exhausted(make_server, tmp_path):
    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    (repo / "tiny" / "config.yaml").write_text("max_queue_size: 4\nmax_batch_size: 4\n")
    srv = make_server(repo)
    with srv.channel() as channel:
        code, details = _error(
            kgrpc.GRPCInferenceServiceStub(channel).ModelInfer, _tensor_request((5, 3, 32, 32))
        )
    assert code == C.RESOURCE_EXHAUSTED
    assert "a request of 5 rows can never fit the queue of 4 rows" in details


def test_unknown_request_parameters_are_accepted(stubs):
    request = _tensor_request()
    request.parameters["timeout"].int64_param = 10
    request.parameters["sequence_id"].string_param = "abc"
    request.parameters["made_up"].double_param = 1.5
    request.inputs[0].parameters["binary_data_size"].int64_param = 12288
    request.outputs.add(name="logits").parameters["binary_data"].bool_param = True
    assert stubs[1].ModelInfer(request, timeout=30).outputs[0].name == "logits"
