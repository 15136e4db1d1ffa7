"""Structured logs: one line per event, as `key=value` text or JSON, with fields passed via `extra={"fields": ...}`.

Only values that code chose to log appear: no request bodies, no headers, so no secret can leak through a log line.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import msgspec


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class TextFormatter(logging.Formatter):
    """`2026-11-22T10:00:00.123Z INFO request rid=qg-1 model=coder status=200`."""

    def __init__(self) -> None:
        super().__init__()
        # (second, its stamp): made once a second, as a line per request is hot; one tuple, so threads agree
        self._second_stamp = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        second, stamp = self._second_stamp
        if int(record.created) != second:
            second = int(record.created)
            self._second_stamp = (second, stamp := time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        parts = [f"{stamp}.{int(record.msecs):03d}Z", record.levelname, record.getMessage()]
        parts.extend(f"{key}={_text_value(value)}" for key, value in _fields(record).items() if value is not None)
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        doc.update((k, v) for k, v in _fields(record).items() if v is not None)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(doc).decode()


_NEEDS_QUOTES = re.compile(r'[ "=\n]')


def _text_value(value: Any) -> str:
    text = value if type(value) is str else str(value)
    if not text or _NEEDS_QUOTES.search(text):
        return msgspec.json.encode(text).decode()
    return text


def configure_logging(fmt: str, level: str) -> None:
    """Send QueueGate's logs to stderr in the chosen format; keep library chatter at warning level."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("queuegate")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
