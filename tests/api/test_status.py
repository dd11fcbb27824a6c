"""The one error table: every domain error has its code; anything else is INTERNAL, logged, not leaked."""

from __future__ import annotations

import logging

import grpc
import pytest

from service import errors
from service.api import error_codes


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidInput, "INVALID_ARGUMENT"),
        (errors.ModelNotFound, "NOT_FOUND"),
        (errors.ModelNotReady, "UNAVAILABLE"),
        (errors.Overloaded, "RESOURCE_EXHAUSTED"),
        (errors.DeadlineExceeded, "DEADLINE_EXCEEDED"),
        (errors.Cancelled, "CANCELLED"),
        (errors.Draining, "UNAVAILABLE"),
        (errors.InferenceFailed, "INTERNAL"),
        (errors.Unimplemented, "UNIMPLEMENTED"),
        (errors.Unauthenticated, "UNAUTHENTICATED"),
        (errors.PermissionDenied, "PERMISSION_DENIED"),
    ],
)
def test_domain_errors_keep_their_message(error, code):
    exc = error("what was wrong and what was expected")
    assert error_codes.status_for(exc) == (
        getattr(grpc.StatusCode, code),
        "what was wrong and what was expected",
    )
    assert error_codes.code_name(exc) == code


def test_every_domain_error_is_in_the_table():
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    unmapped = [c.__name__ for c in subclasses(errors.SvertkaError) if c.__module__ == "service.errors"]
    unmapped = [name for name in unmapped if getattr(errors, name) not in error_codes.STATUS_BY_ERROR]
    assert not unmapped


def test_unexpected_exceptions_are_internal_with_a_generic_message_and_a_logged_traceback(caplog):
    with caplog.at_level(logging.ERROR, logger="service.api.error_codes"):
        code, message = error_codes.status_for(KeyError("/secret/path/in/the/server"))
    assert (code, message) == (grpc.StatusCode.INTERNAL, "internal error")
    assert "/secret/path" not in message
    assert caplog.records and caplog.records[0].exc_info is not None
    assert error_codes.code_name(ValueError()) == "INTERNAL"
