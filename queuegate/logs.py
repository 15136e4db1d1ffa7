"""Structured logs: one line per event, as `key=value` text or JSON, with fields passed via `extra={"fields": ...}`.

Only values that code chose to log appear: no request bodies, no headers, so no secret can leak through a log line.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class TextFormatter(logging.Formatter):
    """`2026-11-22T10:00:00.123Z INFO request rid=qg-1 model=coder status=200`."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [stamp, record.levelname, record.getMessage()]
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


def _text_value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
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
