"""The one mapping from svertka's domain errors to gRPC status codes.

Servicers raise :mod:`service.errors` exceptions and never pick a status code
themselves; this table is the only place that does, so the API's error
contract (docs/api.md) can be read off it. Anything that is not a
:class:`~service.errors.SvertkaError` is a bug or an environment failure on
our side: the client gets ``INTERNAL`` with a generic message (no internals
leak out) and the traceback goes to the log. KServe's mistake to avoid is the
opposite: reporting a server-side failure as ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import logging

import grpc
import grpc.aio

from service import errors

log = logging.getLogger(__name__)

#: Domain error -> gRPC status. Looked up along the exception's MRO, so a
#: subclass of a listed error maps like its parent.
STATUS_BY_ERROR: dict[type[errors.SvertkaError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.Draining: grpc.StatusCode.UNAVAILABLE,
    errors.InferenceFailed: grpc.StatusCode.INTERNAL,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}

#: What a client sees for an exception we did not raise on purpose.
INTERNAL_MESSAGE = "internal error"

#: The longest status message sent. A status travels in a response header (grpc-message,
#: percent-encoded: up to 9 bytes per non-ASCII character), and a client refuses headers over its
#: metadata limit (8 KiB by default) with a RESOURCE_EXHAUSTED that hides the real error. Values
#: quoted from requests are bounded where they are quoted (service.errors.shown); this is the
#: last line of defence for a message that grew some other way (a long list of models).
MAX_MESSAGE_CHARS = 800


def _bounded(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 40] + f"... ({len(message)} characters, truncated)"


def _mapped(exc: errors.SvertkaError) -> grpc.StatusCode | None:
    """The table's code for ``exc``, looked up along its MRO; None when unmapped."""
    for cls in type(exc).__mro__:
        code = STATUS_BY_ERROR.get(cls)  # type: ignore[arg-type]
        if code is not None:
            return code
    return None


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-visible message for ``exc``.

    Unexpected exceptions are logged here, with their traceback, exactly once.
    """
    if isinstance(exc, errors.SvertkaError):
        code = _mapped(exc)
        if code is not None:
            return code, _bounded(exc.message)
        # A SvertkaError subclass nobody mapped is a bug in this table: fail closed.
        log.error("unmapped domain error %s: %s", type(exc).__name__, exc.message)
        return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
    log.error("unexpected error while handling a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def code_name(exc: BaseException | None) -> str:
    """The status name ("OK", "INVALID_ARGUMENT", ...) for metrics, without logging."""
    if exc is None:
        return "OK"
    code = _mapped(exc) if isinstance(exc, errors.SvertkaError) else None
    return (code or grpc.StatusCode.INTERNAL).name


def fail(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Set the status that ``exc`` maps to on the call; the handler then returns (or stops yielding).

    Not ``context.abort``: that raises an AbortError while ``exc`` is being handled, and grpc.aio
    keeps the pair in a reference cycle with the frames that handled the call, so the request
    (up to the message-size limit) stayed in memory until the cycle collector next ran: six
    refused 48 MB requests in a row held 630 MB. A status set on the context leaves no exception
    behind. An AbortError raised further in (by grpc itself) keeps its own status.
    """
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    code, message = status_for(exc)
    context.set_code(code)
    context.set_details(message)
