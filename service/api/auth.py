"""Bearer-token authentication for both APIs, as a gRPC server interceptor.

Clients send ``authorization: Bearer <token>`` metadata. The comparison is
constant-time (``hmac.compare_digest``) so response timing does not leak how
much of a guessed token matched. Health checking and server reflection stay
open: Kubernetes probes cannot send tokens, and reflection reveals only the
public schema.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc
import grpc.aio

from service import errors
from service.api.interception import refusing

#: Method prefixes that never need a token.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

_MESSAGE = "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'"


def read_token(path: Path) -> bytes:
    """The token in ``path`` (surrounding whitespace removed); an empty file is a config error."""
    token = Path(path).read_bytes().strip()
    if not token:
        raise ValueError(f"auth token file {path} is empty")
    return token


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the right token with UNAUTHENTICATED before any handler runs.

    The token is checked on the call's headers, before its message is parsed: a refused call's
    message is received (gRPC reads it up to the size limit) but never deserialized, so an
    unauthenticated client cannot make the server build a large message.
    """

    def __init__(self, token: bytes) -> None:
        if not token:
            raise ValueError("token must not be empty")
        self._expected = b"Bearer " + token

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)
        # Compare anyway so a missing header costs the same as a wrong one.
        hmac.compare_digest(b"", self._expected)
        return False

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(OPEN_PREFIXES) or self._authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED as usual
            return None
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """UNAUTHENTICATED for the call; its message is never parsed: its cost ends at receiving it."""
    return refusing(handler, errors.Unauthenticated(_MESSAGE))
