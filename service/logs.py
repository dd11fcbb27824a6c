"""Logging setup: text for people, JSON lines for log pipelines, and the access log.

``setup_logging`` is called once from ``main`` (never at import). Every record
logged while a request is being handled carries that request's id (a
context variable the API sets with ``bind_request_id``), so an error line can
be joined to its access line. Byte strings are never written out: a
``bytes`` argument or field is rendered as ``<N bytes>``, so a careless
``log.debug("%s", request)`` cannot dump an image into the logs.

The access log is one line per finished request on the ``svertka.access``
logger: at INFO when enabled (``--access-log``), otherwise at DEBUG, so it
shows with ``--log-level debug`` and costs nothing otherwise.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import json
import logging
import sys
import uuid
from typing import IO, Any

ACCESS_LOGGER = "svertka.access"
LEVELS = ("debug", "info", "warning", "error", "critical")

#: The id of the request being handled in this task/context ("" outside requests).
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("svertka_request_id", default="")

_access_enabled = False

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is emitted as a field.
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "request_id"}


def new_request_id() -> str:
    """A short random id for requests that arrive without one (16 hex chars)."""
    return uuid.uuid4().hex[:16]


def bind_request_id(request_id: str) -> contextvars.Token[str]:
    """Attach ``request_id`` to every log record of the current task; ``reset_request_id`` undoes it."""
    return request_id_var.set(request_id)


def reset_request_id(token: contextvars.Token[str]) -> None:
    request_id_var.reset(token)


def _safe(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    return value


class _ContextFilter(logging.Filter):
    """Adds ``request_id`` and redacts bytes in the message arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = request_id_var.get()
        if record.args:
            if isinstance(record.args, dict):
                record.args = {k: _safe(v) for k, v in record.args.items()}
            else:
                record.args = tuple(_safe(a) for a in record.args)
        if isinstance(record.msg, bytes | bytearray | memoryview):
            record.msg = _safe(record.msg)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, any ``extra`` fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", "")
        if rid:
            out["request_id"] = rid
        for key, val in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = _safe(val)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


#: Control characters as escapes: a value from a request (an id, a name) with a newline in it
#: must not start a line of its own in a text log, where it could pass for another record.
_ESCAPES = str.maketrans({i: f"\\x{i:02x}" for i in (*range(32), 127)})


def one_line(value: Any) -> str:
    """``value`` as text with every control character escaped (``\\n`` becomes ``\\x0a``)."""
    return str(_safe(value)).translate(_ESCAPES)


class TextFormatter(logging.Formatter):
    """``time level logger [request_id] message key=value ...`` for people reading a terminal.

    The first line (message and fields) never contains a line break, whatever a request put
    into them; only a traceback follows on lines of its own.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        head = f"{record.asctime} {record.levelname:<7} {record.name} {one_line(record.message)}"
        rid = getattr(record, "request_id", "")
        fields = [
            f"{k}={one_line(v)}"
            for k, v in record.__dict__.items()
            if k not in _RESERVED and not k.startswith("_")
        ]
        if rid:
            fields.insert(0, f"request_id={one_line(rid)}")
        if fields:
            head = f"{head} " + " ".join(fields)
        tail = []
        if record.exc_info:
            tail.append(self.formatException(record.exc_info))
        if record.stack_info:
            tail.append(self.formatStack(record.stack_info))
        return "\n".join([head, *tail])


def setup_logging(
    fmt: str = "text", level: str = "info", *, access_log: bool = False, stream: IO[str] | None = None
) -> logging.Handler:
    """Configure the root logger once; returns the handler (tests read or remove it)."""
    global _access_enabled
    if fmt not in ("text", "json"):
        raise ValueError(f"log format: expected 'text' or 'json', got {fmt!r}")
    lvl = str(level).lower()
    if lvl not in LEVELS:
        raise ValueError(f"log level: expected one of {LEVELS}, got {level!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_svertka", False):
            root.removeHandler(old)
    handler._svertka = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(lvl.upper())
    _access_enabled = bool(access_log)
    # The access logger follows the root level unless enabled, then INFO lines pass even at warning.
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO if access_log else logging.NOTSET)
    # grpc's own chatter at debug drowns everything else.
    logging.getLogger("grpc").setLevel(max(logging.INFO, root.level))
    return handler


def access_log(
    *,
    request_id: str,
    model: str,
    version: int | str | None,
    api: str,
    method: str,
    code: str,
    duration_ms: float,
    images: int | None = None,
    peer: str | None = None,
    sha256: str | None = None,
) -> None:
    """One line per finished request. Only scalars: never a payload.

    ``sha256``: the served model file's fingerprint (which weights answered under that version).
    """
    logger = logging.getLogger(ACCESS_LOGGER)
    level = logging.INFO if _access_enabled else logging.DEBUG
    if not logger.isEnabledFor(level):
        return
    extra: dict[str, Any] = {
        "request_id": request_id,
        "model": model,
        "version": "" if version is None else str(version),
        "api": api,
        "method": method,
        "code": code,
        "duration_ms": round(float(duration_ms), 3),
    }
    if images is not None:
        extra["images"] = int(images)
    if peer:
        extra["peer"] = peer
    if sha256:
        extra["sha256"] = sha256
    logger.log(level, "%s %s %s %.3fms", method, model, code, duration_ms, extra=extra)
