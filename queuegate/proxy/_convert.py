"""Giving the client the shape it asked for when the upstream answered in the other one.

A streamed request answered with one JSON body becomes an event stream (one chunk per choice, then [DONE]); a
request that did not ask to stream but was answered with an event stream gets the events folded into one answer.
Without this the `openai` client sees an empty stream, or fails on an SSE body it cannot parse.
"""

from __future__ import annotations

from typing import Any

import msgspec

DONE_EVENT = b"data: [DONE]\n\n"
_HEADER_FIELDS = ("id", "created", "model", "system_fingerprint")


def answer_as_events(answer: dict[str, Any], *, chat: bool, include_usage: bool) -> bytes:
    """A whole chat or text completion as the event stream the client asked for (usage only when it asked)."""
    header = {k: answer[k] for k in _HEADER_FIELDS if k in answer}
    kind = "chat.completion.chunk" if chat else "text_completion"
    events = []
    choices = answer.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        if chat:
            message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
            delta = {k: v for k, v in message.items() if v is not None}
            if isinstance(delta.get("tool_calls"), list):
                calls = [call for call in delta["tool_calls"] if isinstance(call, dict)]
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
            part: dict[str, Any] = {"index": choice.get("index", 0), "delta": delta}
        else:
            part = {"index": choice.get("index", 0), "text": choice.get("text", "")}
        part["finish_reason"] = choice.get("finish_reason") or "stop"
        events.append({**header, "object": kind, "choices": [part]})
    if include_usage and answer.get("usage") is not None:
        events.append({**header, "object": kind, "choices": [], "usage": answer["usage"]})
    return b"".join(b"data: " + msgspec.json.encode(e) + b"\n\n" for e in events) + DONE_EVENT


class AnswerFromEvents:
    """Folds a chat or text completion's stream events into the one answer a non-streamed request expects."""

    def __init__(self, *, chat: bool) -> None:
        self._chat = chat
        self._header: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._usage: Any = None
        self.done = False  # [DONE] arrived

    def feed(self, block: bytes) -> None:
        """Take a block of complete events; malformed ones raise msgspec.DecodeError."""
        for raw in block.replace(b"\r\n", b"\n").split(b"\n"):
            if not raw.startswith(b"data:"):
                continue  # comments, event names, blank lines
            payload = raw[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                continue
            chunk = msgspec.json.decode(payload)
            if isinstance(chunk, dict):
                self._take(chunk)

    @property
    def finished(self) -> bool:
        """Every choice seen so far has a finish reason (a stream may end without [DONE])."""
        return bool(self._choices) and all(c.get("finish_reason") for c in self._choices.values())

    def _take(self, chunk: dict[str, Any]) -> None:
        for name in _HEADER_FIELDS:
            if name in chunk and name not in self._header:
                self._header[name] = chunk[name]
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        choices = chunk.get("choices")
        for part in choices if isinstance(choices, list) else []:
            if not isinstance(part, dict):
                continue
            index = part.get("index")
            choice = self._choices.setdefault(index if isinstance(index, int) else 0, {"finish_reason": None})
            if part.get("finish_reason"):
                choice["finish_reason"] = part["finish_reason"]
            if self._chat:
                delta = part.get("delta")
                self._take_delta(choice, delta if isinstance(delta, dict) else {})
            elif isinstance(part.get("text"), str):
                choice["text"] = choice.get("text", "") + part["text"]

    @staticmethod
    def _take_delta(choice: dict[str, Any], delta: dict[str, Any]) -> None:
        message = choice.setdefault("message", {"role": "assistant", "content": None})
        for name in ("content", "reasoning_content"):
            if isinstance(delta.get(name), str):
                message[name] = (message.get(name) or "") + delta[name]
        calls_delta = delta.get("tool_calls")
        for call in calls_delta if isinstance(calls_delta, list) else []:
            if not isinstance(call, dict):
                continue
            calls = message.setdefault("tool_calls", [])
            index = call.get("index")
            if not isinstance(index, int) or not 0 <= index <= len(calls):
                index = len(calls)  # a call is continued by its index, or is the next one: never a gap
            if index == len(calls):
                calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            merged = calls[index]
            if isinstance(call.get("id"), str):
                merged["id"] = call["id"]
            function = call.get("function") if isinstance(call.get("function"), dict) else {}
            for name in ("name", "arguments"):
                if isinstance(function.get(name), str):
                    merged["function"][name] += function[name]

    def answer(self) -> dict[str, Any]:
        kind = "chat.completion" if self._chat else "text_completion"
        choices = [{"index": i, **c, "logprobs": None} for i, c in sorted(self._choices.items())]
        doc: dict[str, Any] = {**self._header, "object": kind, "choices": choices}
        if self._usage is not None:
            doc["usage"] = self._usage
        return doc
