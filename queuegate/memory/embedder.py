"""Embeddings for chat memory from one of the fleet's own models (`[memory].embed_model`), through QueueGate's own
queue: the model is scheduled, loaded and swapped like any other, and its requests are logged and counted (usage
rows without a key, client `memory`).

Two uses, two rules. A recall embeds the user's question on the request path: only when the model is serving now
(a recall never waits for a load, and never makes the planner swap a chat model out), in the asking request's class.
Remembered turns are embedded later (`BuiltinBackend`'s filler), in the lowest class: they may load the model, in
the idle time batch work uses.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import msgspec

from queuegate.errors import GatewayError
from queuegate.proxy import CLIENT_CLOSED, Reply, RequestRecord

# Of a text, what is embedded: its start (a turn's question and the start of its answer), in UTF-8 bytes, so that
# a text in any script stays within what a server takes in one batch (llama-server: 512 tokens by default).
EMBED_MAX_BYTES = 1000


class EmbeddingFailed(Exception):
    """The model did not embed the texts (the message says how)."""


class Handles(Protocol):
    """What the embedder needs of the proxy (`proxy.Proxy`)."""

    async def handle(self, record: RequestRecord, raw_body: bytes, headers: Mapping[str, str]) -> Reply: ...


class FleetEmbedder:
    def __init__(
        self,
        proxy: Handles,
        model: str,
        serving: Callable[[str], bool],
        on_finish: Callable[[RequestRecord, int], None] | None = None,
    ) -> None:
        """`serving(model)`: whether the model has an upstream taking requests now; `on_finish`: every finished
        embedding request (metrics, usage), as the API's."""
        self.model = model
        self._proxy = proxy
        self._serving = serving
        self._on_finish = on_finish

    def ready(self) -> bool:
        """Whether a recall may embed now (the model is serving: no load to wait for)."""
        return self._serving(self.model)

    async def embed(self, texts: list[str], klass: str) -> list[list[float]]:
        """One vector per text, in order. Raises EmbeddingFailed; a caller's cancel withdraws the request."""
        request_id = "mem-" + secrets.token_hex(6)
        record = RequestRecord(
            request_id, "embeddings", client="memory", klass=klass, flow="memory", on_finish=self._on_finish
        )
        body = msgspec.json.encode({"model": self.model, "input": [_start_of(t) for t in texts]})
        try:
            reply = await self._proxy.handle(record, body, {})
        except GatewayError as exc:
            record.finish(exc.status, error=exc.message)
            raise EmbeddingFailed(f"{self.model}: {exc.message}") from None
        except BaseException:
            record.finish(CLIENT_CLOSED, error="memory stopped waiting")
            raise
        record.finish(reply.status)
        if reply.status != 200 or not isinstance(reply.body, bytes):
            raise EmbeddingFailed(f"{self.model} answered {reply.status}")
        return _vectors(reply.body, len(texts), self.model)


def _vectors(body: bytes, count: int, model: str) -> list[list[float]]:
    """The vectors of an OpenAI embeddings answer, by `index`."""
    try:
        answer: Any = msgspec.json.decode(body)
        items = sorted(answer["data"], key=lambda item: item["index"])
        vectors = [[float(x) for x in item["embedding"]] for item in items]
    except (msgspec.DecodeError, KeyError, TypeError, ValueError):
        raise EmbeddingFailed(f"{model} answered no embeddings") from None
    if len(vectors) != count:
        raise EmbeddingFailed(f"{model} answered {len(vectors)} embeddings for {count} texts")
    if not all(v and all(map(math.isfinite, v)) and any(v) for v in vectors):
        raise EmbeddingFailed(f"{model} answered an empty, zero or not finite embedding")
    return vectors


def _start_of(text: str) -> str:
    return text.encode()[:EMBED_MAX_BYTES].decode(errors="ignore")
