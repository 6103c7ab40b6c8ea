"""Log output of the server: readable text for people, JSON lines for log collectors.

Fields passed through ``extra=`` (model, version, images, status, latency_ms,
request_id...) become keys of the JSON object, or ``key=value`` pairs after a text line,
so one logging call serves both formats. Every record logged while a call is served
carries that call's ``request_id`` (from :data:`request_id`, set by the server's
interceptor), so a warning deep in the pipeline names the call it came from.

A text line is one line: control characters in its message and fields are escaped, so
text a caller chose cannot forge a line (tracebacks still follow on their own lines).
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
from typing import Literal

from .client_text import one_line

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
ACCESS_LOGGER = "visionrpc.access"
_HANDLER_NAME = "visionrpc"

# The id of the call being served in this task; None outside calls.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "visionrpc_request_id", default=None
)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName"}


def _extra_fields(record: logging.LogRecord) -> dict[str, object]:
    return {key: value for key, value in record.__dict__.items() if key not in _RECORD_ATTRIBUTES}


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "timestamp": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_extra_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # default=str keeps a log line from failing on an odd extra (a Path, an enum).
        return json.dumps(entry, default=str, ensure_ascii=False)


class RequestIdFilter(logging.Filter):
    """Adds the current call's ``request_id`` to records that do not carry one."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = request_id.get()
        if current is not None and not hasattr(record, "request_id"):
            record.request_id = current
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...`` on one line (tracebacks follow)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The message is escaped whole, so an argument with a newline stays on the line.
        line = super().formatMessage(record)
        line = one_line(line)
        if record.args:
            # A message formatted from arguments already reads as a sentence with those
            # values; its extra fields are there for JSON and would only repeat them here.
            return line
        pairs = " ".join(
            f"{key}={_text_value(value)}" for key, value in _extra_fields(record).items()
        )
        return f"{line} {pairs}" if pairs else line


def _text_value(value: object) -> str:
    """A field value that reads as one token: escaped, and quoted when it has a space."""
    text = one_line(str(value))
    if text == "" or " " in text or '"' in text:
        return '"' + text.replace('"', '\\"') + '"'
    return text


def configure_logging(level: str = "INFO", fmt: LogFormat = "text") -> None:
    """Sends every log record at ``level`` or above to stderr in ``fmt``.

    Calling it again replaces the handler it installed before instead of doubling every
    line; handlers others installed (pytest's log capture) stay.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)


def request_log(
    logger: logging.Logger,
    *,
    method: str,
    status: str,
    latency_seconds: float,
    request_id: str,
    **fields: object,
) -> None:
    """Writes the one access-log line of a finished call.

    ``fields`` are the call's own (model, version, images, failed_images...); text in them
    that the caller chose must already be cut with :func:`client_text.printable`.
    """
    logger.info(
        "call",
        extra={
            "method": method,
            "status": status,
            "latency_ms": round(latency_seconds * 1000.0, 3),
            "request_id": request_id,
            **fields,
        },
    )
