"""Models that take pixels (``svertka export --input uint8-nhwc``): UINT8 [N, H, W, 3], normalised in the graph.

``tinypix`` is ``tiny``'s graph behind such an input, so for the same pixels
both must compute the same logits: the tensor API with UINT8 pixels against
FP32 normalised values, and the image API, which hands ``tinypix`` the decoded
pixels and ``tiny`` the normalised floats. Both layouts: one process, and the
engine in a process of its own (rows of 1 byte per element in the slab).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from export.pixel_input import normalised
from service.gen.inference import grpc_service_pb2 as pb
from service.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.gen.inference import model_config_pb2 as mc
from service.gen.svertka.v1 import classifier_pb2 as cpb
from service.gen.svertka.v1 import classifier_pb2_grpc as cpb_grpc
from tests.api import images
from tests.api.conftest import InProcessServer
from tests.helpers.tinymodel import make_tiny_model, tiny_meta


@pytest.fixture(scope="module", params=["one-process", "engine-process"])
def pix_server(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("pixrepo")
    make_tiny_model(root / "tiny" / "1" / "model.onnx", seed=3)
    make_tiny_model(root / "tinypix" / "1" / "model.onnx", seed=3, pixel_input=True)
    srv = InProcessServer(root, engine_process=request.param == "engine-process")
    yield srv
    srv.close()


@pytest.fixture()
def stub(pix_server):
    with pix_server.channel() as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _logits(response: pb.ModelInferResponse) -> np.ndarray:
    (out,) = response.outputs
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(out.shape))


def _pixels(n: int) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _request(model: str, datatype: str, x: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype=datatype, shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def test_metadata_and_config_say_uint8_nhwc(stub):
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="tinypix"), timeout=10)
    (inp,) = meta.inputs
    assert (inp.name, inp.datatype, list(inp.shape)) == ("input", "UINT8", [-1, 32, 32, 3])
    config = stub.ModelConfig(pb.ModelConfigRequest(name="tinypix"), timeout=10).config
    (cin,) = config.input
    assert (cin.data_type, cin.format, list(cin.dims)) == (
        mc.TYPE_UINT8,
        mc.ModelInput.FORMAT_NHWC,
        [32, 32, 3],
    )
    # the float model is as before
    (inp,) = stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), timeout=10).inputs
    assert (inp.datatype, list(inp.shape)) == ("FP32", [-1, 3, 32, 32])


def test_uint8_pixels_give_the_logits_of_their_normalised_floats(stub):
    pixels = _pixels(3)
    got = _logits(stub.ModelInfer(_request("tinypix", "UINT8", pixels), timeout=30))
    expected = _logits(stub.ModelInfer(_request("tiny", "FP32", normalised(pixels, tiny_meta())), timeout=30))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # typed contents: uint_contents, 0-255
    request = pb.ModelInferRequest(model_name="tinypix")
    tensor = request.inputs.add(name="input", datatype="UINT8", shape=[3, 32, 32, 3])
    tensor.contents.uint_contents.extend(pixels.ravel().tolist())
    np.testing.assert_array_equal(_logits(stub.ModelInfer(request, timeout=30)), got)


@pytest.mark.parametrize(
    "datatype, shape, expected",
    [
        ("FP32", [1, 3, 32, 32], "expected datatype UINT8 (a [N,32,32,3] tensor) or BYTES"),
        ("UINT8", [1, 3, 32, 32], "expected UINT8 shape [N,32,32,3], got [1,3,32,32]"),
        ("FP16", [1, 32, 32, 3], "expected datatype UINT8"),
    ],
)
def test_a_pixel_model_says_what_it_takes(stub, datatype, shape, expected):
    request = pb.ModelInferRequest(model_name="tinypix")
    request.inputs.add(name="input", datatype=datatype, shape=shape)
    request.raw_input_contents.append(b"\0" * int(np.prod(shape)) * (1 if datatype == "UINT8" else 4))
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in info.value.details(), info.value.details()


def test_uint8_values_above_255_are_refused(stub):
    request = pb.ModelInferRequest(model_name="tinypix")
    tensor = request.inputs.add(name="input", datatype="UINT8", shape=[1, 32, 32, 3])
    tensor.contents.uint_contents.extend([256] + [0] * (32 * 32 * 3 - 1))
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UINT8 values must be 0-255, got 256" in info.value.details()


def test_the_image_api_feeds_a_pixel_model_the_decoded_pixels(pix_server):
    with pix_server.channel() as channel:
        classify = cpb_grpc.ImageClassifierStub(channel).Classify
        for seed in range(4):
            image = images.png(seed)
            pix = classify(cpb.ClassifyRequest(model="tinypix", image=image, top_k=10), timeout=30)
            ref = classify(cpb.ClassifyRequest(model="tiny", image=image, top_k=10), timeout=30)
            by_index = {p.index: p.score for p in ref.predictions}
            assert sorted(by_index) == sorted(p.index for p in pix.predictions) == list(range(10))
            np.testing.assert_allclose(
                [p.score for p in pix.predictions], [by_index[p.index] for p in pix.predictions], atol=1e-5
            )
