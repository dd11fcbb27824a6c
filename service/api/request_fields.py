"""The rules for a request's common fields: model name, version string, id, deadline.

Shared by both APIs; each raises :class:`service.errors.InvalidInput` saying
what was expected, quoting the client's value bounded (``errors.shown``).
"""

from __future__ import annotations

import time

import grpc

from service import errors, layout, logs

#: The longest request id accepted (the ``id`` field, or an ``x-request-id`` header). The id is
#: echoed in the response and written to the access log; UUIDs (36) and W3C trace ids (55) fit.
MAX_REQUEST_ID_CHARS = 256
#: What an in-band stream error echoes of other request fields (a model name is at most 128).
MAX_ECHOED_CHARS = 128


def validate_model_name(name: str) -> str:
    """Reject names that could not be a repository directory (and could escape one): service.layout's rule."""
    if not layout.is_valid_name(name):
        raise errors.InvalidInput(f"model name {errors.shown(name)} is invalid: expected {layout.NAME_RULE}")
    return name


def parse_version(text: str) -> int | None:
    """A KServe version string: "" means the newest ready version; else service.layout's version rule."""
    if text == "":
        return None
    version = layout.parse_version(text)
    if version is None:
        raise errors.InvalidInput(
            f"model version: expected a positive integer or empty, got {errors.shown(text)} "
            f"(a version is {layout.VERSION_RULE})"
        )
    return version


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's gRPC deadline as an absolute ``time.monotonic()`` value (None: no deadline)."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + remaining


def check_request_id(explicit: str) -> str:
    """The request's own ``id`` field, refused when longer than MAX_REQUEST_ID_CHARS."""
    if len(explicit) > MAX_REQUEST_ID_CHARS:
        raise errors.InvalidInput(f"id: {len(explicit)} characters; expected at most {MAX_REQUEST_ID_CHARS}")
    return explicit


def request_id(explicit: str, context: grpc.aio.ServicerContext | None) -> str:
    """The request's id: its own ``id`` field, else an ``x-request-id`` header, else a fresh one.

    An ``id`` field over the limit is refused (the client chose it and gets it back); a header
    over the limit is ignored for a fresh id (a proxy may have set it).
    """
    if explicit:
        return check_request_id(explicit)
    if context is not None:
        for key, value in context.invocation_metadata() or ():
            if key == "x-request-id" and value and len(value) <= MAX_REQUEST_ID_CHARS:
                return str(value)
    return logs.new_request_id()
