"""``svertka health``: ask a server's grpc.health.v1 for one service; exit 0 only if SERVING.

Made for health checks that run next to the server (the images' HEALTHCHECK,
a Kubernetes exec probe when the server speaks TLS, which the kubelet's gRPC
probes cannot): with no arguments it reads the server's own ``SVERTKA_*``
settings, so it reaches the server the same environment configures. The
address is ``SVERTKA_HOST`` (loopback when it is a wildcard) and
``SVERTKA_GRPC_PORT``. With ``SVERTKA_TLS_CERT`` set it speaks TLS and trusts
exactly that certificate, checking a name the certificate carries (the
server listens on loopback, whatever names its certificate has); with
``SVERTKA_TLS_CLIENT_CA`` set too it presents the server's own certificate and
key as its client certificate, unless ``--tls-cert``/``--tls-key`` say otherwise.

Exit status: 0 SERVING; 1 anything else (NOT_SERVING, an unknown service, no
answer), with one line on stderr saying which. Docker reads 0 as healthy and
1 as unhealthy (it reserves 2, which only a usage error gives).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import ssl
import sys
from pathlib import Path

from service import config as cfg
from service.server_cli import env_name

#: Addresses that mean "every interface": a health check reaches those on loopback.
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}
_SUBJECT_ALT_NAME = bytes.fromhex("551d11")  # OID 2.5.29.17
_COMMON_NAME = bytes.fromhex("550403")  # OID 2.5.4.3


def _tlv(data: bytes, i: int) -> tuple[int, bytes, int]:
    """One DER element at ``i``: its tag, its content and where the next one starts."""
    tag, length = data[i], data[i + 1]
    i += 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(data[i : i + size], "big")
        i += size
    return tag, data[i : i + length], i + length


def _children(data: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i < len(data):
        tag, value, i = _tlv(data, i)
        out.append((tag, value))
    return out


def certificate_names(pem: bytes) -> list[str]:
    """The names the first certificate of a PEM file is valid for, as TLS checks them.

    The DNS names and IP addresses of its subjectAltName, else its subject's
    common name. (The standard library decodes only certificates that a live
    connection presented, so this reads the DER itself: X.509's
    TBSCertificate, RFC 5280 section 4.1.)
    """
    match = re.search(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.DOTALL)
    if match is None:
        raise ValueError("no PEM certificate in it")
    ((_, certificate),) = _children(ssl.PEM_cert_to_DER_cert(match.group(0).decode("ascii")))
    fields = _children(_children(certificate)[0][1])
    first = 1 if fields[0][0] == 0xA0 else 0  # an explicit version comes first
    subject = fields[first + 4][1]
    names: list[str] = []
    for tag, value in fields:
        if tag != 0xA3:  # extensions
            continue
        for _, extension in _children(_children(value)[0][1]):
            parts = _children(extension)
            if parts[0][1] != _SUBJECT_ALT_NAME:
                continue
            for kind, name in _children(_children(parts[-1][1])[0][1]):
                if kind == 0x82:  # dNSName
                    names.append(name.decode("ascii"))
                elif kind == 0x87:  # iPAddress
                    names.append(str(ipaddress.ip_address(name)))
    if names:
        return names
    return [
        value.decode()
        for _, rdn in _children(subject)
        for _, attribute in _children(rdn)
        for (_, oid), (_, value) in [_children(attribute)]
        if oid == _COMMON_NAME
    ]


def _checkable_name(names: list[str]) -> str | None:
    """A name to check the server's certificate against: a DNS name (a wildcard made concrete) first."""
    dns = [n for n in names if not _is_ip(n)]
    if dns:
        return dns[0].replace("*.", "health.", 1)
    return names[0] if names else None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _setting(environ: dict[str, str], field: str) -> str | None:
    value = environ.get(env_name(field), "").strip()
    return value or None


def default_address(environ: dict[str, str]) -> str:
    """Where the server that ``environ`` configures listens, as seen from its own host."""
    from service.server import address

    host = _setting(environ, "host") or "127.0.0.1"
    if host in _WILDCARDS:
        host = "127.0.0.1"
    port = _setting(environ, "grpc_port") or str(cfg.DEFAULT_GRPC_PORT)
    return address(host.strip("[]"), int(port))


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise _Unhealthy(f"{what} {path}: {exc.strerror or exc}") from None


class _Unhealthy(Exception):
    """Why the check did not see SERVING: one line for stderr, exit status 1."""


def channel_for(args: argparse.Namespace, environ: dict[str, str]):
    """A channel to the server, TLS when ``--tls-ca`` is given or the server's settings enable TLS."""
    import grpc

    target = args.server or default_address(environ)
    server_cert = _setting(environ, "tls_cert")
    root_path = args.tls_ca or server_cert
    if root_path is None:
        return grpc.insecure_channel(target)
    root = _read(root_path, "--tls-ca" if args.tls_ca else env_name("tls_cert"))
    cert_path, key_path = args.tls_cert, args.tls_key
    if cert_path is None and _setting(environ, "tls_client_ca") is not None:
        cert_path, key_path = server_cert, _setting(environ, "tls_key")
    if (cert_path is None) != (key_path is None):
        raise _Unhealthy("--tls-cert and --tls-key: give both")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=_read(key_path, "client key") if key_path else None,
        certificate_chain=_read(cert_path, "client certificate") if cert_path else None,
    )
    name = args.tls_server_name
    if name is None and not args.tls_ca:
        try:
            name = _checkable_name(certificate_names(root))
        except (ValueError, IndexError) as exc:
            raise _Unhealthy(f"{root_path}: cannot read the names it is valid for ({exc})") from None
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(target, credentials, options=options)


def check(args: argparse.Namespace, environ: dict[str, str]) -> str:
    """The service's status name; raises _Unhealthy when there is no answer."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with channel_for(args, environ) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s
            )
        except grpc.RpcError as exc:
            raise _Unhealthy(f"{exc.code().name}: {exc.details()}") from None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def run_health(args: argparse.Namespace) -> int:
    what = f"health of {args.service!r}"
    try:
        status = check(args, dict(os.environ))
    except _Unhealthy as exc:
        print(f"svertka health: {what}: {exc}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"svertka health: {what}: {status}", file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    health = subparsers.add_parser(
        "health",
        help="check a server's grpc.health.v1 status (exit 0 only if SERVING)",
        description=__doc__.split("\n\n")[1].replace("``", ""),
    )
    health.add_argument(
        "--server",
        default=None,
        help=f"HOST:PORT (default: from {env_name('host')} and {env_name('grpc_port')}, "
        f"loopback for a wildcard host, port {cfg.DEFAULT_GRPC_PORT})",
    )
    health.add_argument(
        "--service",
        default=cfg.SERVER_HEALTH_SERVICE,
        help="health service name (default '': the whole server, ready to take traffic; "
        "docs/api.md lists the others, the liveness service among them)",
    )
    health.add_argument("--timeout-s", type=float, default=2.0, help="deadline (default %(default)s)")
    health.add_argument(
        "--tls-ca",
        default=None,
        help=f"PEM CA of the server's certificate (enables TLS; default with TLS: {env_name('tls_cert')})",
    )
    health.add_argument(
        "--tls-cert",
        default=None,
        help=f"client certificate for mutual TLS (default with {env_name('tls_client_ca')} set: "
        f"{env_name('tls_cert')})",
    )
    health.add_argument(
        "--tls-key",
        default=None,
        help=f"client key for mutual TLS (default: {env_name('tls_key')}, as above)",
    )
    health.add_argument(
        "--tls-server-name",
        default=None,
        help="name to check the server's certificate against (default: one it carries, "
        "when trusting the server's own certificate)",
    )
    health.set_defaults(handler=run_health)
