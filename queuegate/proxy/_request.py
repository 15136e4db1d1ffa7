"""A client's request body, parsed once: the fields QueueGate itself reads are checked, everything else passes
through untouched to the upstream.

What QueueGate reads: `model`, the endpoint's required field, `stream` and `stream_options` (streaming and usage),
`max_tokens` / `max_completion_tokens` (tokens-per-minute limits), the prompt's text (`messages[].content`,
`prompt`, `input`; token estimates), and `tools` (tool calling). A wrong type there is a 400 naming the field, as
OpenAI answers, never a 500.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import msgspec

from queuegate.errors import BadRequest
from queuegate.proxy._record import tokens_in
from queuegate.vocabulary import ENDPOINTS

ECHO_LIMIT = 200  # characters of client input an error message repeats at most


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A request body, parsed once: what the rest of the way reads."""

    body: dict[str, Any]  # as the client sent it (everything QueueGate does not read passes through)
    model: str  # the name asked for (a model or an alias)
    stream: bool
    wants_usage: bool  # it asked for the stream's usage chunk
    prompt_chars: int  # characters of prompt text, for token estimates
    tokens: int  # its estimated size, for tokens-per-minute limits


def parse_request(raw: bytes, endpoint: str) -> ParsedRequest:
    """Decode and check a request body (BadRequest naming the field when it is wrong)."""
    body = parse_body(raw, endpoint)
    chars = prompt_chars(body)
    return ParsedRequest(
        body=body,
        model=body["model"],
        stream=body.get("stream") is True,
        wants_usage=asks_usage(body),
        prompt_chars=chars,
        tokens=request_tokens(body, chars),
    )


def forwarding(request: ParsedRequest, body: dict[str, Any]) -> ParsedRequest:
    """The request with the body QueueGate forwards instead (memory's messages): its estimates follow the body."""
    chars = prompt_chars(body)
    return replace(request, body=body, prompt_chars=chars, tokens=request_tokens(body, chars))


def parse_body(raw: bytes, endpoint: str) -> dict[str, Any]:
    """Decode and check the request body (see the module). BadRequest says which field is wrong and why."""
    if not raw.strip():
        raise BadRequest("the request body is empty: expected a JSON object with `model` and the request")
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {echo(str(exc))}") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", param="model")
    required = ENDPOINTS[endpoint].required_field
    if required not in body:
        raise BadRequest(f"missing required parameter: {required!r}", param=required)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise BadRequest("`stream` must be true or false", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("`stream_options` must be an object", param="stream_options")
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise BadRequest(f"`{name}` must be a whole number of at least 0", param=name)
    if endpoint == "chat":
        _check_messages(body["messages"])
        _check_tools(body.get("tools"))
    elif endpoint == "messages":  # (Anthropic's: its tools have another shape, which QueueGate does not read)
        _check_messages(body["messages"])
    else:
        _check_text_input(body[required], required)
    return body


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise BadRequest("`messages` must be an array of message objects", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"`messages[{i}]` must be an object", param=f"messages[{i}]")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise BadRequest(
                f"`messages[{i}].content` must be a string or an array of content parts", param=f"messages[{i}].content"
            )
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict):
                raise BadRequest(f"`{where}` must be an object", param=where)
            if "text" in part and not isinstance(part["text"], str):
                raise BadRequest(f"`{where}.text` must be a string", param=f"{where}.text")


def _check_tools(tools: Any) -> None:
    """`tools`: an array of tool objects, each naming its function (QueueGate reads them: tool calling)."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise BadRequest("`tools` must be an array of tool objects", param="tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(
                f'`tools[{i}]` must be an object such as {{"type": "function", "function": {{"name": ...}}}}',
                param=f"tools[{i}]",
            )


def _check_text_input(value: Any, name: str) -> None:
    """`prompt` or `input`: a string or an array (of strings, or of token ids, which QueueGate does not read)."""
    if not isinstance(value, str | list):
        raise BadRequest(f"`{name}` must be a string or an array", param=name)


def prompt_chars(body: dict[str, Any]) -> int:
    """Characters of prompt text in a checked chat, completion or embeddings request (for a token estimate). Only
    the endpoint's own field was checked: the others are read only when they have the right shape."""
    prompt = body.get("prompt")
    if prompt is None:
        prompt = body.get("input")
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list):
        return sum(len(p) for p in prompt if isinstance(p, str))
    total = 0
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return total


def request_tokens(body: dict[str, Any], chars: int) -> int:
    """A request's likely size for tokens-per-minute limits: its prompt's estimate plus the completion it allows
    (`max_completion_tokens` or `max_tokens`; nothing when it sets neither). Corrected by its usage when it ends."""
    allowed = body.get("max_completion_tokens", body.get("max_tokens", body.get("max_output_tokens")))
    completion = allowed if isinstance(allowed, int) and allowed > 0 else 0
    return tokens_in(chars) + completion


def asks_usage(body: dict[str, Any]) -> bool:
    """Whether the client asked for a stream's usage chunk (`stream_options.include_usage`)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def echo(text: str) -> str:
    """Client input as an error message may repeat it: at most ECHO_LIMIT characters."""
    return text if len(text) <= ECHO_LIMIT else text[:ECHO_LIMIT] + f"... ({len(text)} characters)"
