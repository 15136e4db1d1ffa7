"""Embeddings for chat memory from one of the fleet's own models (`[memory].embed_model`), through QueueGate's own
queue: the model is scheduled, loaded and swapped like any other, and its requests are logged and counted (usage
rows without a key, client `memory`).

Two uses, two rules. A recall embeds the user's question on the request path: only when the model is serving now
(a recall never waits for a load, and never makes the planner swap a chat model out), in the asking request's class.
Remembered turns are embedded later (`BuiltinBackend`'s filler), in the lowest class: they may load the model, in
the idle time batch work uses.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import msgspec

from queuegate.errors import GatewayError
from queuegate.proxy import CLIENT_CLOSED, Reply, RequestRecord

EMBED_MAX_CHARS = 1200  # of a text, embedded (its start: a turn's question and the start of its answer)


class EmbeddingFailed(Exception):
    """The model did not embed the texts. `rejected`: it refused them (a 4xx other than 429); trying again will
    not help."""

    def __init__(self, message: str, *, rejected: bool = False) -> None:
        super().__init__(message)
        self.rejected = rejected


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
        body = msgspec.json.encode({"model": self.model, "input": [t[:EMBED_MAX_CHARS] for t in texts]})
        try:
            reply = await self._proxy.handle(record, body, {})
        except GatewayError as exc:
            record.finish(exc.status, error=exc.message)
            rejected = 400 <= exc.status < 500 and exc.status != 429
            raise EmbeddingFailed(f"{self.model}: {exc.message}", rejected=rejected) from None
        except BaseException:
            record.finish(CLIENT_CLOSED, error="memory stopped waiting")
            raise
        record.finish(reply.status)
        if reply.status != 200 or not isinstance(reply.body, bytes):
            rejected = 400 <= reply.status < 500 and reply.status != 429
            raise EmbeddingFailed(f"{self.model} answered {reply.status}", rejected=rejected)
        return _vectors(reply.body, len(texts), self.model)


def _vectors(body: bytes, count: int, model: str) -> list[list[float]]:
    """The vectors of an OpenAI embeddings answer, by `index`."""
    try:
        answer: Any = msgspec.json.decode(body)
        items = sorted(answer["data"], key=lambda item: item["index"])
        vectors = [[float(x) for x in item["embedding"]] for item in items]
    except (msgspec.DecodeError, KeyError, TypeError, ValueError):
        raise EmbeddingFailed(f"{model} answered no embeddings") from None
    if len(vectors) != count or not all(vectors):
        raise EmbeddingFailed(f"{model} answered {len(vectors)} embeddings for {count} texts")
    return vectors
