"""The images' HEALTHCHECK command, run against real servers configured as a container is.

The server and the check get the same ``SVERTKA_*`` environment (the check
is run as the Dockerfile's HEALTHCHECK says, ``svertka`` being this
checkout's): plaintext, TLS, and mutual TLS, with real certificates made by
openssl. The server's certificate names only ``svertka.test``, not the
loopback address the check connects to, as a certificate for a Service
would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.target import PYTHON_M_SERVICE, ServerProcess
from service.api.health import LIVENESS_SERVICE
from service.health_cli import certificate_names
from tests.deploy import test_images
from tests.helpers.tinymodel import make_repository
from tests.reliability.harness import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


def _issue(directory: Path, name: str, extensions: str) -> None:
    """``name``.key/.pem signed by the CA ``ca``."""
    _openssl(directory, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")  # fmt: skip
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-sha256", "-extfile", f"{name}.ext")  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA; a server certificate for svertka.test (usable as a client's too); a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl(d, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=svertka-test-ca")  # fmt: skip
    _issue(d, "server", "subjectAltName=DNS:svertka.test\nextendedKeyUsage=serverAuth,clientAuth\n")
    _issue(d, "client", "extendedKeyUsage=clientAuth\n")
    return d


def healthcheck(env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    """The Dockerfile's HEALTHCHECK, in ``env`` alone (as Docker runs it in the container)."""
    command = test_images.healthcheck("Dockerfile")
    assert command[0] == "svertka"
    return subprocess.run(
        [*PYTHON_M_SERVICE, *command[1:], *extra],
        env={"PATH": os.environ["PATH"], **env},
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=30,
    )


def serve(tmp_path: Path, settings: dict[str, str]) -> tuple[ServerProcess, dict[str, str]]:
    """A server configured by ``settings`` alone; those settings with its real port."""
    env = {
        "SVERTKA_MODEL_REPOSITORY": str(make_repository(tmp_path / "repo", {"tiny": [1]})),
        "SVERTKA_HOST": "127.0.0.1",
        "SVERTKA_GRPC_PORT": "0",
        "SVERTKA_METRICS_PORT": "0",
        **settings,
    }
    server = ServerProcess(None, tmp_path / "server.log", env=env).start()
    return server, {**env, "SVERTKA_GRPC_PORT": str(server.grpc_port)}


def test_certificate_names_are_read_from_the_pem(pki):
    assert certificate_names((pki / "server.pem").read_bytes()) == ["svertka.test"]
    assert certificate_names((pki / "ca.pem").read_bytes()) == ["svertka-test-ca"]  # no SAN: the CN


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_healthcheck_speaks_tls_to_a_tls_server(tmp_path, pki, mutual):
    settings = {"SVERTKA_TLS_CERT": str(pki / "server.pem"), "SVERTKA_TLS_KEY": str(pki / "server.key")}
    if mutual:
        settings["SVERTKA_TLS_CLIENT_CA"] = str(pki / "ca.pem")
    server, env = serve(tmp_path, settings)
    try:
        wait_until(lambda: healthcheck(env).returncode == 0, timeout_s=60, what="healthy")
        assert healthcheck(env, "--service", LIVENESS_SERVICE).returncode == 0
        unknown = healthcheck(env, "--service", "no-such-model")
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
        if mutual:
            # Another client certificate from the CA, instead of the server's own.
            client = ("--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key"))
            assert healthcheck(env, *client).returncode == 0
        # The former HEALTHCHECK spoke plaintext whatever the server did: never healthy here.
        plaintext = {k: v for k, v in env.items() if not k.startswith("SVERTKA_TLS_")}
        refused = healthcheck(plaintext)
        assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr, refused.stderr
    finally:
        assert server.stop() == 0, server.log()


def test_healthcheck_without_tls_and_before_a_model_is_ready(tmp_path):
    """Plaintext as before; unhealthy (1) while no model is ready, the liveness service healthy."""
    (tmp_path / "empty").mkdir()
    server, env = serve(tmp_path, {"SVERTKA_MODEL_REPOSITORY": str(tmp_path / "empty")})
    try:
        wait_until(
            lambda: healthcheck(env, "--service", LIVENESS_SERVICE).returncode == 0, timeout_s=60, what="live"
        )
        result = healthcheck(env)
        assert result.returncode == 1 and "NOT_SERVING" in result.stderr, result.stderr
    finally:
        assert server.stop() == 0, server.log()
    gone = healthcheck(env, "--service", LIVENESS_SERVICE)
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr
