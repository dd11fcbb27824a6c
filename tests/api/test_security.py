"""TLS, mutual TLS and bearer tokens, with real certificates made by openssl in the test."""

from __future__ import annotations

import shutil
import subprocess
import types
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from service.gen.inference import grpc_service_pb2 as kpb
from service.gen.inference import grpc_service_pb2_grpc as kgrpc
from service.gen.svertka.v1 import classifier_pb2 as cpb
from service.gen.svertka.v1 import classifier_pb2_grpc as cgrpc
from tests.api import images

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(directory: Path, name: str, ca: str, *, server: bool) -> None:
    """A key and a certificate for ``name`` signed by the CA ``ca`` (.key/.pem)."""
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=directory)  # fmt: skip
    ext = directory / f"{name}.ext"
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        if server
        else "extendedKeyUsage=clientAuth\n"
    )
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-sha256", "-extfile", ext.name, cwd=directory)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, and a rogue CA's client."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                 "-days", "2", "-subj", f"/CN={ca}", cwd=d)  # fmt: skip
    _issue(d, "server", "ca", server=True)
    _issue(d, "client", "ca", server=False)
    _issue(d, "rogue", "rogue-ca", server=False)
    return d


def _secure_channel(srv, pki: Path, client: str | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / f"{client}.key").read_bytes() if client else None,
        certificate_chain=(pki / f"{client}.pem").read_bytes() if client else None,
    )
    return grpc.secure_channel(f"localhost:{srv.port}", credentials)


def _classify(channel, metadata=()):
    stub = cgrpc.ImageClassifierStub(channel)
    return stub.Classify(
        cpb.ClassifyRequest(model="tiny", image=images.png(1)), timeout=10, metadata=metadata
    )


def test_tls(make_server, pki):
    srv = make_server(tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    with _secure_channel(srv, pki) as channel:
        assert _classify(channel).model_name == "tiny"
    with srv.channel() as plaintext, pytest.raises(grpc.RpcError) as info:
        _classify(plaintext)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(make_server, pki):
    srv = make_server(tls_cert=pki / "server.pem", tls_key=pki / "server.key", tls_client_ca=pki / "ca.pem")
    with _secure_channel(srv, pki, "client") as channel:
        assert _classify(channel).model_name == "tiny"
    for client in (None, "rogue"):
        with _secure_channel(srv, pki, client) as channel, pytest.raises(grpc.RpcError) as info:
            _classify(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, client


def test_bearer_token_guards_both_apis_but_not_health_or_reflection(make_server, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    srv = make_server(auth_token_file=token_file)
    good = (("authorization", "Bearer s3cret-token"),)
    with srv.channel() as channel:
        assert _classify(channel, good).model_name == "tiny"
        kserve = kgrpc.GRPCInferenceServiceStub(channel)
        assert kserve.ServerReady(kpb.ServerReadyRequest(), metadata=good).ready
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret-token"),)):
            for call in (
                lambda m: _classify(channel, m),
                lambda m: kserve.ServerReady(kpb.ServerReadyRequest(), metadata=m),
                lambda m: list(
                    kserve.ModelStreamInfer(iter([kpb.ModelInferRequest(model_name="tiny")]), metadata=m)
                ),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    call(metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "missing or invalid bearer token" in info.value.details()
        # Probes and tools need no token.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert "svertka.v1.ImageClassifier" in set(ProtoReflectionDescriptorDatabase(channel).get_services())


def _send_unparsable(channel, method: str, metadata) -> None:
    path = f"/inference.GRPCInferenceService/{method}"
    if method == "ModelInfer":
        call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        call(b"\x0a\xff\xff", metadata=metadata, timeout=10)
    else:
        stream = channel.stream_stream(path, request_serializer=None, response_deserializer=None)
        list(stream(iter([b"\x0a\xff\xff"]), metadata=metadata, timeout=10))


def test_a_call_refused_for_its_token_never_has_its_message_parsed(make_server, tmp_path):
    """Bytes that would not even parse get UNAUTHENTICATED, not INVALID_ARGUMENT: they were never read."""
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    srv = make_server(auth_token_file=token_file)
    with srv.channel() as channel:
        for method in ("ModelInfer", "ModelStreamInfer"):
            for metadata, code in (
                ((), grpc.StatusCode.UNAUTHENTICATED),
                ((("authorization", "Bearer s3cret-token"),), grpc.StatusCode.INVALID_ARGUMENT),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    _send_unparsable(channel, method, metadata)
                assert info.value.code() == code, (method, info.value.details())


def test_the_token_is_checked_before_the_message_is_deserialized():
    import asyncio

    from service.api import auth

    def parse(data: bytes):
        raise AssertionError("a refused call's message was parsed")

    async def continuation(details):
        return grpc.unary_unary_rpc_method_handler(lambda request, context: None, request_deserializer=parse)

    details = types.SimpleNamespace(
        method="/inference.GRPCInferenceService/ModelInfer",
        invocation_metadata=(("authorization", "Bearer wrong"),),
    )
    interceptor = auth.BearerTokenInterceptor(b"s3cret-token")
    handler = asyncio.run(interceptor.intercept_service(continuation, details))
    assert handler.request_deserializer(b"\x0a\xff\xff") is None
