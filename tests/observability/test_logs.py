"""Structured logging and the access log, as an operator reads them."""

from __future__ import annotations

import io
import json
import logging

import pytest

from service import logs


@pytest.fixture
def capture():
    """Configure logging into a buffer; restore the root logger afterwards."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    buf = io.StringIO()

    def setup(fmt: str, level: str, access: bool = False) -> io.StringIO:
        buf.seek(0)
        buf.truncate()
        logs.setup_logging(fmt, level, access_log=access, stream=buf)
        return buf

    yield setup
    for h in list(root.handlers):
        if getattr(h, "_svertka", False):
            root.removeHandler(h)
    root.setLevel(saved[0])
    logging.getLogger(logs.ACCESS_LOGGER).setLevel(logging.NOTSET)


def _access(**kw):
    args = dict(
        request_id="abc123",
        model="digits",
        version=1,
        api="image",
        method="/svertka.v1.ImageClassifier/Classify",
        code="OK",
        duration_ms=4.25,
    )
    args.update(kw)
    logs.access_log(**args)


def test_json_access_line_has_request_id_model_status_and_ms(capture) -> None:
    buf = capture("json", "info", access=True)
    _access(images=3, sha256="0123456789ab")
    (line,) = buf.getvalue().splitlines()
    rec = json.loads(line)
    assert rec["logger"] == "svertka.access" and rec["level"] == "info"
    assert rec["request_id"] == "abc123"
    assert (rec["model"], rec["version"], rec["code"], rec["images"]) == ("digits", "1", "OK", 3)
    assert rec["sha256"] == "0123456789ab"  # which weights answered under that version
    assert rec["duration_ms"] == 4.25
    assert rec["ts"].endswith("+00:00")


def test_access_line_only_at_debug_or_when_enabled(capture) -> None:
    buf = capture("text", "info", access=False)
    _access()
    assert buf.getvalue() == ""
    buf = capture("text", "debug", access=False)
    _access()
    assert "request_id=abc123" in buf.getvalue() and "duration_ms=4.25" in buf.getvalue()
    buf = capture("text", "warning", access=True)
    _access(code="INVALID_ARGUMENT")
    assert buf.getvalue().count("\n") == 1 and "code=INVALID_ARGUMENT" in buf.getvalue()


def test_errors_inside_a_request_carry_its_id_and_traceback(capture) -> None:
    buf = capture("json", "info")
    token = logs.bind_request_id("req-42")
    try:
        try:
            raise RuntimeError("runtime failed")
        except RuntimeError:
            logging.getLogger("service.api").exception("internal error")
    finally:
        logs.reset_request_id(token)
    logging.getLogger("service.api").error("outside any request")
    first, second = (json.loads(x) for x in buf.getvalue().splitlines())
    assert first["request_id"] == "req-42" and "RuntimeError: runtime failed" in first["exc"]
    assert "request_id" not in second


def test_no_image_bytes_in_logs(capture) -> None:
    payload = b"\xff\xd8\xff\xe0" + b"JFIF-SECRET-PIXELS" * 100
    for fmt in ("text", "json"):
        buf = capture(fmt, "debug")
        log = logging.getLogger("service.api")
        log.debug("request %s", payload)
        log.debug("request %(body)s", {"body": payload})
        log.debug("extra", extra={"image": payload})
        log.debug(payload)
        out = buf.getvalue()
        assert "JFIF-SECRET-PIXELS" not in out and "\\xff" not in out
        assert out.count(f"<{len(payload)} bytes>") == 4


def test_text_format_is_one_line_per_record_with_traceback_below(capture) -> None:
    buf = capture("text", "info")
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        logging.getLogger("x").exception("failed")
    lines = buf.getvalue().splitlines()
    assert " ERROR " in lines[0] and lines[0].endswith("failed")
    assert lines[-1].startswith("ZeroDivisionError")


def test_setup_is_repeatable_and_validates(capture) -> None:
    capture("text", "info")
    capture("json", "info")
    assert sum(getattr(h, "_svertka", False) for h in logging.getLogger().handlers) == 1
    with pytest.raises(ValueError):
        logs.setup_logging("xml", "info")
    with pytest.raises(ValueError):
        logs.setup_logging("json", "loud")


def test_new_request_ids_are_unique() -> None:
    ids = {logs.new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
