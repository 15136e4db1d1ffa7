"""A batch's input file checked up front, and its output and error file lines, in OpenAI's formats.

An input line is `{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}`. The whole file
is checked before anything runs (JSON per line, a unique `custom_id`, the batch's endpoint, a known model the key
may use, no streaming); a file with errors fails its batch with the line numbers, and nothing runs.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import msgspec

# The batch endpoint -> the proxy's name of it.
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings"}
MAX_CUSTOM_ID = 512
MAX_ERRORS = 100  # reported of a bad file (the first ones)


class InputLine(msgspec.Struct, forbid_unknown_fields=True):
    custom_id: str
    method: str
    url: str
    body: dict[str, Any]


def check_input(
    content: bytes, endpoint: str, max_lines: int, resolve_model: Callable[[str], str]
) -> tuple[list[tuple[int, str, str, bytes]], list[dict[str, Any]]]:
    """The lines to run (line number, custom_id, model, body as JSON) and the errors (OpenAI's `errors.data`:
    code, message, line). `resolve_model(name)`: the model's canonical name; ValueError: the batch's key may not
    use it for the endpoint (the message says why)."""
    lines: list[tuple[int, str, str, bytes]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()

    def error(number: int | None, code: str, message: str, param: str | None = None) -> None:
        if len(errors) < MAX_ERRORS:
            errors.append({"code": code, "message": message, "param": param, "line": number})

    for number, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            line = msgspec.json.decode(raw, type=InputLine)
        except msgspec.DecodeError as exc:
            error(number, "invalid_json_line", f"line {number} is not a batch request line: {exc}")
            continue
        if not line.custom_id or len(line.custom_id) > MAX_CUSTOM_ID:
            error(number, "invalid_custom_id", f"custom_id must be 1 to {MAX_CUSTOM_ID} characters", "custom_id")
        elif line.custom_id in seen:
            error(number, "duplicate_custom_id", f"custom_id {line.custom_id!r} is used twice", "custom_id")
        seen.add(line.custom_id)
        if line.method.upper() != "POST":
            error(number, "invalid_method", f"method must be POST, not {line.method!r}", "method")
        if line.url != endpoint:
            error(number, "mismatched_endpoint", f"url {line.url!r} is not the batch's endpoint {endpoint}", "url")
        model = line.body.get("model")
        if not isinstance(model, str) or not model:
            error(number, "missing_required_parameter", "the body has no model", "body.model")
        else:
            try:
                model = resolve_model(model)
            except ValueError as exc:
                error(number, "model_not_found", str(exc), "body.model")
        if line.body.get("stream"):
            error(number, "invalid_request", "a batch line cannot stream", "body.stream")
        lines.append((number, line.custom_id, str(model), msgspec.json.encode(line.body)))
        if len(lines) > max_lines:
            error(None, "too_many_lines", f"a batch may have at most {max_lines} lines ([batches].max_lines)")
            break
    if not lines and not errors:
        error(None, "empty_file", "the input file has no lines")
    return lines, errors


def output_line(custom_id: str, status: int, request_id: str, body: Any) -> bytes:
    """A line that got an answer (the output file's, or the error file's when it is not a 2xx)."""
    response = {"status_code": status, "request_id": request_id, "body": body}
    return msgspec.json.encode({"id": _line_id(), "custom_id": custom_id, "response": response, "error": None})


def error_line(custom_id: str, code: str, message: str) -> bytes:
    """A line that got no answer (expired, cancelled, or every attempt failed before one came)."""
    error = {"code": code, "message": message}
    return msgspec.json.encode({"id": _line_id(), "custom_id": custom_id, "response": None, "error": error})


def _line_id() -> str:
    return "batch_req_" + secrets.token_hex(12)
