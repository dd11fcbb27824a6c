"""Property-based fuzzing (hypothesis) of request parsing and image decoding.

Bounded in ``make test`` (a few hundred examples per property, seconds);
``make fuzz`` runs the same properties with SVERTKA_FUZZ_EXAMPLES raised
(and the atheris harness, tests/reliability/fuzz_atheris.py). Failing
examples are kept in build/hypothesis so a rerun replays them first.

Properties (tests/reliability/fuzzing.py): the parser and the decoder either
return a well-formed result or raise InvalidInput -- never another exception,
never a hang (each example has a deadline) -- and a whole server answers any
request with a status that is not INTERNAL.
"""

from __future__ import annotations

import os
import struct

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from service.api import tensor_outputs, tensors
from service.gen.inference import grpc_service_pb2 as kpb
from service.gen.inference import grpc_service_pb2_grpc as kgrpc
from service.gen.svertka.v1 import classifier_pb2 as cpb
from service.gen.svertka.v1 import classifier_pb2_grpc as cgrpc
from tests.api.conftest import InProcessServer
from tests.helpers import ROOT
from tests.helpers.tinymodel import make_repository
from tests.reliability import fuzzing

#: Examples per property in ``make test``; ``make fuzz`` multiplies them.
EXAMPLES = int(os.environ.get("SVERTKA_FUZZ_EXAMPLES", "300"))


def fuzz_settings(examples: int = EXAMPLES, deadline_ms: int = 5000):
    return settings(
        max_examples=examples,
        deadline=deadline_ms,  # a hang or a pathological slowdown fails the example
        database=DirectoryBasedExampleDatabase(str(ROOT / "build" / "hypothesis")),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- strategies -----------------------------------------------------------------------
DIMS = st.one_of(
    st.integers(-3, 70),
    st.sampled_from([3, 32, 16, 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1, -(2**63)]),
)
DATATYPES = st.one_of(st.sampled_from([*tensors.KNOWN_DATATYPES, "", "FLOAT32", "fp32"]), st.text(max_size=8))
NAMES = st.one_of(st.sampled_from(["input", "", "logits", "INPUT"]), st.text(max_size=10))


@st.composite
def raw_for(draw, shape: list[int], datatype: str) -> bytes:
    """Raw contents: often exactly the size the shape implies, sometimes off by a little, sometimes anything."""
    if (
        datatype == "FP32"
        and all(0 <= d <= 70 for d in shape)
        and np.prod(shape, dtype=np.int64) <= 70 * 3072
    ):
        n = int(np.prod(shape, dtype=np.int64))
        choice = draw(st.sampled_from(["exact", "special", "off"]))
        if choice == "exact":
            return draw(st.binary(min_size=4 * n, max_size=4 * n)) if n <= 64 else b"\0" * (4 * n)
        if choice == "special":
            values = (
                draw(
                    st.lists(
                        st.sampled_from([0.0, np.nan, np.inf, -np.inf, 1e38, -0.0]), min_size=n, max_size=n
                    )
                )
                if n <= 64
                else [np.nan] * n
            )
            return np.asarray(values, "<f4").tobytes()
        return b"\0" * max(0, 4 * n + draw(st.integers(-5, 5)))
    if datatype == "BYTES":
        items = draw(st.lists(st.binary(max_size=20), max_size=4))
        raw = b"".join(struct.pack("<I", len(i)) + i for i in items)
        return raw[: draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw
    return draw(st.binary(max_size=64))


@st.composite
def infer_requests(draw) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=draw(st.sampled_from(["tiny", "", "x"])))
    n_inputs = draw(st.sampled_from([1, 1, 1, 0, 2]))
    for _ in range(n_inputs):
        datatype = draw(st.one_of(st.sampled_from(["FP32", "FP32", "BYTES"]), DATATYPES))
        shape = draw(
            st.one_of(
                st.lists(DIMS, min_size=4, max_size=4).map(lambda s: [s[0], 3, 32, 32] if s[1] == 3 else s),
                st.lists(DIMS, max_size=5),
            )
        )
        tensor = request.inputs.add(name=draw(NAMES), datatype=datatype, shape=shape)
        how = draw(st.sampled_from(["raw", "raw", "typed", "both", "none"]))
        if how in ("raw", "both"):
            request.raw_input_contents.append(draw(raw_for(shape, datatype)))
        if how in ("typed", "both"):
            field = draw(st.sampled_from(tensors.ALL_TYPED_FIELDS))
            if field == "bytes_contents":
                values = draw(st.lists(st.binary(max_size=16), max_size=4))
            elif field == "bool_contents":
                values = draw(st.lists(st.booleans(), max_size=8))
            elif field in ("fp32_contents", "fp64_contents"):
                values = draw(st.lists(st.floats(width=32), max_size=8))
                if draw(st.booleans()) and datatype == "FP32":
                    count = int(abs(np.prod([d for d in shape if abs(d) < 100] or [1])))
                    values = [0.5] * min(count, 70 * 3072)
            elif field in ("uint_contents", "uint64_contents"):
                values = draw(st.lists(st.integers(0, 2**32 - 1), max_size=8))
            else:
                values = draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8))
            getattr(tensor.contents, field).extend(values)
    if draw(st.booleans()):
        out = request.outputs.add(name=draw(st.sampled_from(["logits", "logits", "probs", ""])))
        param = draw(st.sampled_from(["none", "int", "uint", "str", "bool", "double"]))
        p = out.parameters["classification"]
        if param == "int":
            p.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        elif param == "uint":
            p.uint64_param = draw(st.integers(0, 2**64 - 1))
        elif param == "str":
            p.string_param = draw(st.text(max_size=6))
        elif param == "bool":
            p.bool_param = draw(st.booleans())
        elif param == "double":
            p.double_param = draw(st.floats())
    return request


@st.composite
def mutated_images(draw) -> bytes:
    """A valid seed image with a few byte-level mutations (flip, insert, delete, truncate, splice)."""
    data = bytearray(draw(st.sampled_from(fuzzing.seed_images())))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dims"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del data[at:]
        else:  # overwrite 4 bytes of the header region, where sizes live
            at = draw(st.integers(0, min(40, len(data) - 1)))
            data[at : at + 4] = draw(st.binary(min_size=4, max_size=4))
    return bytes(data)


# -- properties ---------------------------------------------------------------------------
@fuzz_settings()
@given(infer_requests())
def test_tensor_parsing_returns_a_usable_input_or_invalid_input(request):
    fuzzing.check_parse(request)


@fuzz_settings()
@given(st.binary(max_size=512))
def test_tensor_parsing_of_arbitrary_wire_bytes(data):
    fuzzing.check_request_bytes(data)


@fuzz_settings()
@given(
    st.one_of(
        st.binary(max_size=64), st.lists(st.binary(max_size=12), max_size=5).map(tensor_outputs.encode_bytes)
    )
)
def test_raw_bytes_splitting_round_trips_or_is_refused(raw):
    fuzzing.check_split(raw)


@fuzz_settings()
@given(mutated_images())
def test_decoding_mutated_images_returns_a_tensor_or_invalid_input(data):
    fuzzing.check_decode(data)


@fuzz_settings()
@given(
    st.binary(max_size=256).flatmap(
        lambda tail: st.sampled_from(
            [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\0\0\0\0WEBP", b"BM", b""]
        ).map(lambda head: head + tail)
    )
)
def test_decoding_arbitrary_bytes_behind_a_real_signature(data):
    fuzzing.check_decode(data)


def test_every_seed_image_decodes():
    """The mutations start from valid images (else the decoder fuzz would only test rejection)."""
    assert all(fuzzing.check_decode(image) is not None for image in fuzzing.seed_images())


# -- the whole server -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    repo = make_repository(tmp_path_factory.mktemp("repo"), {"tiny": [1]})
    server = InProcessServer(repo)
    with server.channel() as channel:
        yield cgrpc.ImageClassifierStub(channel), kgrpc.GRPCInferenceServiceStub(channel)
    server.close()


#: What a fuzzed request may get back; INTERNAL ("internal error") would be an unhandled exception.
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@pytest.mark.slow
@pytest.mark.integration
def test_the_server_never_answers_a_fuzzed_request_with_internal(stubs):
    image_api, tensor_api = stubs

    @fuzz_settings(examples=max(50, EXAMPLES // 3))
    @given(infer_requests(), mutated_images(), st.integers(-3, 12))
    def run(request, image, top_k):
        for call, message in (
            (tensor_api.ModelInfer, request),
            (image_api.Classify, cpb.ClassifyRequest(model="tiny", image=image, top_k=top_k)),
        ):
            try:
                call(message, timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() in ALLOWED, (exc.code(), exc.details())

    run()
