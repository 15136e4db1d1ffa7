"""Tool calls a model wrote as text in its answer's `content`, turned into OpenAI's structured `tool_calls`.

Some models write their tool calls as plain text: the Mistral family (`[TOOL_CALLS]`), and Hermes/Qwen chat
templates on a server without a tool-call parser (`<tool_call>`). A client that gave tools expects `tool_calls`, so
QueueGate reads them out of the text, for a whole answer (`parse_text_tool_calls`) and while streaming
(`TextToolCallFilter`). The forms read:

- Mistral v3: `[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]` (a string "id" of a call is kept)
- Mistral tokenizer v11+: `[TOOL_CALLS]f[ARGS]{...}`, repeated for more calls, with an optional `[CALL_ID]abc123`
  before `[ARGS]` (kept as the call's id)
- Hermes/Qwen: `<tool_call>{"name": "f", "arguments": {...}}</tool_call>`, several separated by whitespace; the last
  closing tag may be missing (the model stopped at its stop token) when the JSON is whole

Arguments may be an object or a JSON string of one; "parameters" is read when "arguments" is missing, and neither
means no arguments. Anything malformed leaves the whole content as text, unchanged: a wrong guess must not lose what
the model wrote. Text before the calls is content; text after them (other than whitespace) is kept as content too.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

import msgspec

MARKERS: tuple[str, ...] = ("[TOOL_CALLS]", "<tool_call>")  # where text-form tool calls start
_MISTRAL, _HERMES = MARKERS
_HERMES_END = "</tool_call>"
_ARGS = "[ARGS]"
_CALL_ID = "[CALL_ID]"
_NAME = re.compile(r"[^\s\[\]{}<>]+")  # a function's name or a call's id between Mistral's tags


@dataclass(frozen=True, slots=True)
class TextToolCalls:
    """Tool calls read out of an answer's text, and the text that is not tool calls: the text before the first
    marker (trailing whitespace stripped), then any text after the calls (stripped) on a new line; "" when none."""

    text: str  # content that is not tool calls
    calls: list[dict[str, Any]]  # OpenAI tool calls, in the order written


def parse_text_tool_calls(content: str) -> TextToolCalls | None:
    """The tool calls written as text in `content`, or None when it has none or they are malformed (then the content
    stays text, unchanged)."""
    start = _first_marker(content)
    if start < 0:
        return None
    calls: list[dict[str, Any]] = []
    end = start  # where the calls read so far end
    while True:
        at = _skip_space(content, end)
        if content.startswith(_MISTRAL, at):
            read = _read_mistral(content, at + len(_MISTRAL), calls)
        elif content.startswith(_HERMES, at):
            read = _read_hermes(content, at + len(_HERMES), calls)
        else:
            break
        if read is None:
            return None
        end = read
    if not calls:
        return None
    parts = (content[:start].rstrip(), content[end:].strip())
    return TextToolCalls(text="\n".join(part for part in parts if part), calls=calls)


class TextToolCallFilter:
    """Streaming: feed content deltas as they arrive; text that cannot be the start of a tool call is released at
    once, text that might be is held until it is clear. Everything from a whole marker on is held until `finish`."""

    __slots__ = ("_after", "_pending", "_seen")

    def __init__(self) -> None:
        self._pending = ""  # before a marker: the end of the text so far that could start one
        self._after: list[str] = []  # from a marker on: everything (pieces, joined when read)
        self._seen = False

    def feed(self, delta: str) -> str:
        """The text that may go to the client now ("" while holding)."""
        if self._seen:
            self._after.append(delta)
            return ""
        text = self._pending + delta
        start = _first_marker(text)
        if start >= 0:
            self._seen = True
            self._pending = ""
            self._after.append(text[start:])
        else:
            start = len(text) - _marker_prefix(text)
            self._pending = text[start:]
        return text[:start]

    def finish(self) -> TextToolCalls | None:
        """At the end of the answer: the calls found, their `.text` being what still needs sending (text after the
        calls, normally ""); or None when there were none, and then `held()` must be released unchanged."""
        return parse_text_tool_calls(self.held()) if self._seen else None

    def held(self) -> str:
        """The text held back so far, not released by `feed`."""
        return self._pending + "".join(self._after)

    @property
    def seen_marker(self) -> bool:
        """Whether a whole marker was seen (everything since is held)."""
        return self._seen


def _first_marker(text: str) -> int:
    """Where the first marker in `text` starts, -1 when there is none."""
    found = [at for at in (text.find(marker) for marker in MARKERS) if at >= 0]
    return min(found, default=-1)


def _marker_prefix(text: str) -> int:
    """How many characters at the end of `text` could be the start of a marker (0 when none)."""
    return max((k for marker in MARKERS for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0)


def _read_mistral(content: str, at: int, calls: list[dict[str, Any]]) -> int | None:
    """Read the calls after a `[TOOL_CALLS]` (a JSON array, or `name[CALL_ID]id[ARGS]{...}`) into `calls`: where
    they end, None when malformed."""
    at = _skip_space(content, at)
    if content.startswith("[", at):
        end = _json_end(content, at)
        items = None if end is None else _decode(content[at:end])
        if not isinstance(items, list):
            return None
        for item in items:
            call = _call(item)
            if call is None:
                return None
            calls.append(call)
        return end
    args_at = content.find(_ARGS, at)
    if args_at < 0:
        return None
    name, has_id, call_id = content[at:args_at].partition(_CALL_ID)
    name, call_id = name.strip(), call_id.strip()
    if not _NAME.fullmatch(name) or (has_id and not _NAME.fullmatch(call_id)):
        return None
    at = _skip_space(content, args_at + len(_ARGS))
    end = _json_end(content, at) if content.startswith("{", at) else None
    arguments = None if end is None else _decode(content[at:end])
    if not isinstance(arguments, dict):
        return None
    calls.append(_openai_call(name, arguments, call_id or None))
    return end


def _read_hermes(content: str, at: int, calls: list[dict[str, Any]]) -> int | None:
    """Read the call after a `<tool_call>` into `calls`: where it ends (past `</tool_call>`, or the end of the content
    when the tag is missing there), None when malformed."""
    at = _skip_space(content, at)
    end = _json_end(content, at) if content.startswith("{", at) else None
    call = None if end is None else _call(_decode(content[at:end]))
    if end is None or call is None:
        return None
    calls.append(call)
    end = _skip_space(content, end)
    if content.startswith(_HERMES_END, end):
        return end + len(_HERMES_END)
    return end if end == len(content) else None


def _call(item: Any) -> dict[str, Any] | None:
    """An OpenAI tool call from a call written as a JSON object, None when it is malformed."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
        return None
    arguments = item["arguments"] if "arguments" in item else item.get("parameters", {})
    if isinstance(arguments, str):
        arguments = _decode(arguments)
    if not isinstance(arguments, dict):
        return None
    call_id = item.get("id")
    return _openai_call(item["name"], arguments, call_id if isinstance(call_id, str) and call_id else None)


def _openai_call(name: str, arguments: dict[str, Any], call_id: str | None) -> dict[str, Any]:
    """A tool call as OpenAI writes it, with the model's id or a new one."""
    return {
        "id": call_id or f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": name, "arguments": msgspec.json.encode(arguments).decode()},
    }


def _skip_space(text: str, at: int) -> int:
    """Where the whitespace from `at` on ends."""
    while at < len(text) and text[at].isspace():
        at += 1
    return at


def _json_end(text: str, start: int) -> int | None:
    """Just past the bracket closing the JSON object or array opening at `start`, None when it is not closed."""
    depth = 0
    in_string = escaped = False
    for i in range(start, len(text)):
        char = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _decode(text: str) -> Any:
    """JSON text decoded, None when it is not valid JSON."""
    try:
        return msgspec.json.decode(text)
    except (ValueError, RecursionError):  # malformed, a lone surrogate, or nested too deeply
        return None
