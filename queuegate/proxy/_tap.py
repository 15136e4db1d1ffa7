"""An answer's text as it goes to the client, for whoever needs it once the answer is whole (chat memory).

A whole answer is read at once; a stream is read event by event as it passes (the content of its first choice), and
its text is handed on only if the stream reached `[DONE]` without an error event: a client that left mid-answer, or
an upstream that failed half-way, leaves no half answer behind.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec

from queuegate.errors import GatewayError
from queuegate.proxy._convert import AnswerFromEvents
from queuegate.proxy._reply import Reply, StreamBody


def answer_text(reply: Reply, streamed: bool) -> str | None:
    """The text of a whole 200 answer (JSON, or events made from one), else None."""
    if reply.status != 200 or not isinstance(reply.body, bytes):
        return None
    try:
        if streamed:
            folded = AnswerFromEvents(chat=True)
            folded.feed(reply.body)
            answer: Any = folded.answer()
        else:
            answer = msgspec.json.decode(reply.body)
        content = answer["choices"][0]["message"].get("content")
    except (msgspec.DecodeError, KeyError, IndexError, TypeError, AttributeError):
        return None
    return content if isinstance(content, str) else None


_ERROR_EVENT = re.compile(rb'(?m)^data:\s*\{\s*"error"')


class TappedStream:
    """A StreamBody that passes `inner` through and hands the answer's text to `done` when it ended whole."""

    def __init__(self, inner: StreamBody, done: Callable[[str], None]) -> None:
        self._inner = inner
        self._events = AnswerFromEvents(chat=True)
        self._pending = b""
        self._done = done
        self._broken = False
        self._handed = False

    def __aiter__(self) -> TappedStream:
        return self

    async def __anext__(self) -> bytes:
        block = await self._inner.__anext__()
        if not self._broken:
            complete, _, self._pending = (self._pending + block.replace(b"\r\n", b"\n")).rpartition(b"\n\n")
            self._take(complete)
        return block

    def _take(self, events: bytes) -> None:
        """Fold whole events; an error event or anything unreadable means there is nothing to hand on."""
        if _ERROR_EVENT.search(events):
            self._broken = True
            return
        try:
            self._events.feed(events)
        except Exception:  # garbage, or nesting too deep to read: the client still gets it, memory does not
            self._broken = True

    def stop(self, error: GatewayError) -> None:
        self._inner.stop(error)

    async def aclose(self) -> None:
        """Close the inner stream; hand the text on, once (closing may happen more than once)."""
        await self._inner.aclose()
        if self._pending and not self._broken:
            self._take(self._pending)  # (a last event without its blank line)
            self._pending = b""
        if self._events.done and not self._broken and not self._handed:
            self._handed = True
            choices = self._events.answer()["choices"]
            content = choices[0].get("message", {}).get("content") if choices else None
            if isinstance(content, str):
                self._done(content)
