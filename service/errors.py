"""Domain errors of the serving path.

These do not import grpc: the one mapping to status codes lives in
``service.api.error_codes``. Messages are shown to clients verbatim, so each says
what was wrong and what was expected.
"""

from __future__ import annotations


class SvertkaError(Exception):
    """Base of every error the server reports to a client on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(SvertkaError):
    """The request itself is wrong (bad image, shape, datatype, ...)."""


class ModelNotFound(SvertkaError):
    """No such model or version in the repository."""


class NotFound(SvertkaError):
    """A named thing other than a model (e.g. a shared memory region) does not exist."""


class AlreadyExists(SvertkaError):
    """A name that must be unique is taken (e.g. a shared memory region)."""


class ModelNotReady(SvertkaError):
    """The model exists but is not loaded (failed, loading or unloading)."""


class FailedPrecondition(SvertkaError):
    """The model cannot do what the request asks of it as it is (e.g. images, without preprocessing metadata)."""


class Overloaded(SvertkaError):
    """The model's queue is full, or a message exceeds a size limit."""


class DeadlineExceeded(SvertkaError):
    """The caller's deadline passed before the request was computed."""


class Cancelled(SvertkaError):
    """The caller went away before the request was computed."""


class Draining(SvertkaError):
    """The server is shutting down and accepts no new work."""


class InferenceFailed(SvertkaError):
    """The runtime failed while computing a batch (a server-side failure)."""


class Unimplemented(SvertkaError):
    """An RPC or feature svertka does not support."""


class Unauthenticated(SvertkaError):
    """Missing or wrong credentials."""


class PermissionDenied(SvertkaError):
    """The operation is disabled on this server (e.g. model control)."""


#: The most characters of a client-supplied value that a message echoes back.
SHOWN_CHARS = 64


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """A client-supplied value as an error message or log line may quote it: repr, bounded, one line.

    A request can carry a 60 MiB model name or an id with a newline in it;
    quoting it whole would make the error bigger than gRPC lets a status
    message be (the client then sees RESOURCE_EXHAUSTED instead of the real
    error) and could forge lines in a text log. The bound applies *before* the
    repr is built, so the cost does not grow with the value.
    """
    if isinstance(value, str | bytes | bytearray) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
    text = repr(value)
    return text if len(text) <= limit + 16 else text[: limit + 16] + "..."
