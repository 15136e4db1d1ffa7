"""What a simulated model says: deterministic tokens, OpenAI-shaped bodies and chunks, embeddings."""

from __future__ import annotations

import hashlib
import math
import struct
import time
from typing import Any

from queuegate.sim._tools import ToolAnswer

WORDS = (
    "Hello",
    " from",
    " the",
    " simulated",
    " model",
    ",",
    " streaming",
    " one",
    " token",
    " at",
    " a",
    " time",
    ".",
)


def tokens(count: int) -> list[str]:
    return [WORDS[i % len(WORDS)] for i in range(count)]


def prompt_tokens(body: dict[str, Any]) -> int:
    """A rough token count of the prompt: words in every text part."""
    texts: list[str] = []
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        texts.append(prompt)
    elif isinstance(prompt, list):
        texts.extend(p for p in prompt if isinstance(p, str))
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p.get("text", "") for p in content if isinstance(p, dict))
    return sum(len(t.split()) for t in texts) or 1


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Completion:
    """One chat or text completion being generated, rendered in OpenAI's shapes."""

    def __init__(
        self,
        chat: bool,
        model: str,
        n_tokens: int,
        limited: bool,
        prompt: int,
        served_by: str,
        tool_answer: ToolAnswer | None = None,
    ) -> None:
        self.chat = chat
        self.model = model
        self.served_by = served_by  # the simulator's own model name, as `system_fingerprint`: which server answered
        self.tokens = tokens(n_tokens)
        self.finish_reason = "length" if limited else "stop"
        self.calls: list[dict[str, Any]] = []  # structured tool calls, sent after the text
        if tool_answer is not None:
            self.tokens = [tool_answer.text[i : i + 4] for i in range(0, len(tool_answer.text), 4)]
            self.calls = tool_answer.calls if tool_answer.form == "structured" else []
            self.finish_reason = "tool_calls" if self.calls else "stop"
        self.prompt = prompt
        self.id = ("chatcmpl-" if chat else "cmpl-") + hashlib.sha1(str(time.monotonic_ns()).encode()).hexdigest()[:24]
        self.created = int(time.time())

    def whole(self) -> dict[str, Any]:
        text = "".join(self.tokens)
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text or (None if self.calls else "")}
            if self.calls:
                choice["message"]["tool_calls"] = self.calls
        else:
            choice["text"] = text
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.served_by,
            "choices": [choice],
            "usage": usage(self.prompt, len(self.tokens)),
        }

    def chunk(self, index: int) -> dict[str, Any]:
        token = self.tokens[index]
        if self.chat:
            delta = {"role": "assistant", "content": token} if index == 0 else {"content": token}
            return self._chunk({"index": 0, "delta": delta, "finish_reason": None})
        return self._chunk({"index": 0, "text": token, "finish_reason": None})

    def call_chunks(self) -> list[dict[str, Any]]:
        """The tool calls as a stream sends them: each call's name first, its arguments in a second delta."""
        chunks = []
        for i, call in enumerate(self.calls):
            head = {"index": i, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"]}}
            head["function"]["arguments"] = ""
            rest = {"index": i, "function": {"arguments": call["function"]["arguments"]}}
            for part in (head, rest):
                chunks.append(self._chunk({"index": 0, "delta": {"tool_calls": [part]}, "finish_reason": None}))
        return chunks

    def final_chunk(self) -> dict[str, Any]:
        if self.chat:
            return self._chunk({"index": 0, "delta": {}, "finish_reason": self.finish_reason})
        return self._chunk({"index": 0, "text": "", "finish_reason": self.finish_reason})

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._chunk(None), "choices": [], "usage": usage(self.prompt, len(self.tokens))}

    def _chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.served_by,
            "choices": [choice] if choice else [],
        }


def embedding(text: str, dim: int) -> list[float]:
    """A deterministic unit vector for `text`."""
    raw = hashlib.shake_256(text.encode()).digest(4 * dim)
    values = [v / 2**31 - 1.0 for v in struct.unpack(f"<{dim}I", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


def embeddings_body(inputs: list[str], model: str, dim: int) -> dict[str, Any]:
    return {
        "object": "list",
        "model": model,
        "data": [{"object": "embedding", "index": i, "embedding": embedding(t, dim)} for i, t in enumerate(inputs)],
        "usage": {
            "prompt_tokens": sum(len(t.split()) for t in inputs),
            "total_tokens": sum(len(t.split()) for t in inputs),
        },
    }
