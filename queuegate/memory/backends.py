"""Where memory lives: the built-in SQLite store, or a tool server's `memory_query` / `memory_upsert` operations.

Both answer the same few async calls (`Backend`); `Memory` bounds how long a request waits for them and survives
their failures. The built-in store's calls run in a worker thread (SQLite blocks). A tool server is called like any
tool (`ToolServers.call`): `memory_query` gets `{"namespace", "query", "k"}` and answers a list of snippets (strings,
or objects with a `text`, `document` or `content` field; or an object whose `results` is such a list), and
`memory_upsert` gets `{"namespace", "text"}`. Listing, showing and forgetting chats are for the built-in store.

With an embedding model (`embedder`), the built-in store also ranks by meaning: a recall embeds the question when
the model is serving now, within a share of the recall's time (else it ranks by words alone), and `upkeep` embeds
remembered turns in batches as they come (`MemoryStore.pending`), backing off while the model fails.
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

import msgspec
import trio

from queuegate.memory.embedder import EmbeddingFailed, FleetEmbedder
from queuegate.memory.outcomes import Outcomes
from queuegate.memory.store import MemoryStore
from queuegate.tools.servers import ToolServers

SNIPPET_FIELDS = ("text", "document", "content")
BUILTIN_ONLY = "memory list|show|forget work with the built-in store; this memory is in a tool server"
EMBED_SHARE = 0.7  # of a recall's time, what embedding the question may take (the rest is the store's)
FILL_BATCH = 32  # remembered turns read from the store at a time (each is embedded in a request of its own)
FILL_RETRY_S = (1.0, 60.0)  # while the embedding model fails: first wait, doubling up to the last
LOAD_TRY_EVERY_S = 300.0  # while the embedding model is not loaded, turns owed a vector may load it this often
READY_POLL_S = 1.0


class BackendError(Exception):
    """The backend failed; the message says how (for the log, once per outage)."""


class Backend(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def recall(
        self, namespace: str, question: str, k: int, timeout_s: float, klass: str
    ) -> tuple[list[str], int | None]:
        """The `k` snippets most relevant to `question`, and how many turns the chat remembers (None: unknown).
        `klass`: the asking request's (for work the recall queues, such as embedding the question)."""

    async def remember(self, turns: list[tuple[str, str]]) -> None: ...

    async def expire(self) -> int: ...

    async def namespaces(self) -> list[tuple[str, int, float]]: ...

    async def turns(self, namespace: str) -> list[tuple[float, str]]: ...

    async def forget(self, namespace: str) -> int: ...

    async def upkeep(self) -> None:
        """The backend's own work for the daemon's life (returns when it has none)."""


class BuiltinBackend:
    """The built-in store (`store.MemoryStore`), its calls in a worker thread; vectors from `embedder` (None:
    ranked by words alone), remembered turns embedded in `fill_class`."""

    def __init__(
        self,
        store: MemoryStore,
        outcomes: Outcomes,
        embedder: FleetEmbedder | None = None,
        fill_class: str = "batch",
    ) -> None:
        self.store = store
        self._outcomes = outcomes
        self._embedder = embedder
        self._fill_class = fill_class
        self._stored = trio.Event()  # turns were stored (that may be owed their vectors)
        self._last_load_try = -math.inf  # when embedding turns last ran while the model was not loaded
        # Recalls have their own thread: one a request stopped waiting for never holds trio's shared threads.
        self._recalling = trio.CapacityLimiter(1)

    async def open(self) -> None:
        await trio.to_thread.run_sync(self.store.open)

    async def close(self) -> None:
        await trio.to_thread.run_sync(self.store.close)

    async def recall(
        self, namespace: str, question: str, k: int, timeout_s: float, klass: str
    ) -> tuple[list[str], int | None]:
        # A request that stops waiting leaves the thread behind; SQLite stops the query itself at the deadline.
        deadline = time.monotonic() + timeout_s
        vector = await self._question_vector(question, klass, timeout_s * EMBED_SHARE)

        def both() -> tuple[list[str], int]:
            return self.store.recall(namespace, question, k, deadline, vector), self.store.count(namespace)

        return await trio.to_thread.run_sync(both, abandon_on_cancel=True, limiter=self._recalling)

    async def _question_vector(self, question: str, klass: str, timeout_s: float) -> list[float] | None:
        """The question's embedding, or None (no model, not serving now, failing or late: words alone rank)."""
        embedder = self._embedder
        if embedder is None or not self.store.has_vectors:  # (no turn has a vector yet: it would find nothing)
            return None
        if not embedder.ready():
            self._outcomes.count("question_not_embedded")  # (its model is not loaded: a recall never loads it)
            return None
        with trio.move_on_after(timeout_s):
            try:
                [vector] = await embedder.embed([question], klass)
            except EmbeddingFailed as exc:
                self._outcomes.failed("embed_question", "question_embed_failed", exc)
                return None
            self._outcomes.ok("embed_question", "question_embedded")
            return vector
        self._outcomes.failed("embed_question", "question_embed_timeout", TimeoutError(f"{embedder.model}: late"))
        return None

    async def remember(self, turns: list[tuple[str, str]]) -> None:
        await trio.to_thread.run_sync(self.store.remember, turns)
        self._stored.set()

    async def upkeep(self) -> None:
        """Embed remembered turns that have no vector yet (those of before a restart too), in batches, as they
        come, while the embedding model is loaded (see `_until_it_may_embed`); while it fails, back off (the turns
        wait, found by their words meanwhile)."""
        if self._embedder is None:
            return
        first, most = FILL_RETRY_S
        delay = first
        while True:
            try:
                filled = await self._fill_some(self._embedder)
            except Exception as exc:  # the model or the disk failing: try again later, never stop
                self._outcomes.failed("embed_turns", "turn_embed_failed", exc)
                await trio.sleep(delay)
                delay = min(most, delay * 2)
                continue
            delay = first
            if not filled:
                await self._stored.wait()
                self._stored = trio.Event()

    async def _fill_some(self, embedder: FleetEmbedder) -> bool:
        """Embed one batch of the turns still owed a vector; False when none is."""
        rows = await trio.to_thread.run_sync(self.store.pending, FILL_BATCH)
        if not rows:
            return False
        await self._until_it_may_embed(embedder)
        vectors = await self._embed_rows(embedder, [text for _, text in rows])
        done = [(turn, text, vector) for (turn, text), vector in zip(rows, vectors, strict=True)]
        await trio.to_thread.run_sync(self.store.add_vectors, done)
        self._outcomes.ok("embed_turns", "turn_embedded", sum(v is not None for v in vectors))
        if skipped := sum(v is None for v in vectors):
            self._outcomes.count("turn_not_embeddable", skipped)
        return True

    async def _until_it_may_embed(self, embedder: FleetEmbedder) -> None:
        """Until the embedding model is serving (embedding costs no load then: on a GPU it shares with a chat
        model, the chat model is not swapped out after every turn), or LOAD_TRY_EVERY_S has passed since the last
        try that could load it (turns are owed their vectors: one batch may load it, in the lowest class)."""
        while not embedder.ready() and trio.current_time() < self._last_load_try + LOAD_TRY_EVERY_S:
            await trio.sleep(READY_POLL_S)
        if not embedder.ready():
            self._last_load_try = trio.current_time()

    async def _embed_rows(self, embedder: FleetEmbedder, texts: list[str]) -> list[list[float] | None]:
        """The texts' vectors, each text in a request of its own: a server may embed a text differently inside a
        batch (llama-server does), and a question is embedded alone. A text the model fails while it serves gets
        None (the model cannot embed that text: it must not hold the others back). EmbeddingFailed (the texts
        wait) when the model fails one and is not serving, or fails them all."""
        vectors: list[list[float] | None] = []
        for text in texts:
            try:
                [vector] = await embedder.embed([text], self._fill_class)
            except EmbeddingFailed:
                if not embedder.ready():
                    raise
                vectors.append(None)
            else:
                vectors.append(vector)
        if not any(vectors):
            raise EmbeddingFailed(f"{embedder.model} embedded none of {len(texts)} texts")
        return vectors

    async def expire(self) -> int:
        return await trio.to_thread.run_sync(self.store.expire)

    async def namespaces(self) -> list[tuple[str, int, float]]:
        return await trio.to_thread.run_sync(self.store.namespaces)

    async def turns(self, namespace: str) -> list[tuple[float, str]]:
        return await trio.to_thread.run_sync(self.store.turns, namespace)

    async def forget(self, namespace: str) -> int:
        return await trio.to_thread.run_sync(self.store.forget, namespace)


class ToolServerBackend:
    """A tool server's memory operations (see the module). Each call is bounded by `timeout_s`."""

    def __init__(self, tools: ToolServers, server: str, query_tool: str, upsert_tool: str, timeout_s: float) -> None:
        self._tools = tools
        self._server = server  # its memory operations are for QueueGate only: never offered to a model
        self._query = query_tool
        self._upsert = upsert_tool
        self._timeout_s = timeout_s

    async def open(self) -> None:
        """(The tool servers are read by their own task; a memory tool that is missing fails its calls.)"""

    async def close(self) -> None:
        """(Nothing to close: the tool servers' connections are theirs.)"""

    async def recall(
        self, namespace: str, question: str, k: int, timeout_s: float, klass: str
    ) -> tuple[list[str], int | None]:
        answer = await self._call(self._query, {"namespace": namespace, "query": question, "k": k})
        try:
            found = msgspec.json.decode(answer)
        except msgspec.DecodeError:
            raise BackendError(f"{self._query} answered something that is not JSON") from None
        if isinstance(found, dict):
            found = found.get("results")
        if not isinstance(found, list):
            raise BackendError(f"{self._query} answered no list of snippets")
        return [text for item in found[:k] if (text := _snippet(item))], None

    async def remember(self, turns: list[tuple[str, str]]) -> None:
        for namespace, text in turns:
            await self._call(self._upsert, {"namespace": namespace, "text": text})

    async def expire(self) -> int:
        return 0  # (the tool server keeps its own retention)

    async def namespaces(self) -> list[tuple[str, int, float]]:
        raise ValueError(BUILTIN_ONLY)

    async def turns(self, namespace: str) -> list[tuple[float, str]]:
        raise ValueError(BUILTIN_ONLY)

    async def forget(self, namespace: str) -> int:
        raise ValueError(BUILTIN_ONLY)

    async def upkeep(self) -> None:
        """(The tool server keeps its own index.)"""

    async def _call(self, tool: str, arguments: dict[str, Any]) -> str:
        result = await self._tools.call_reserved(
            self._server, tool, msgspec.json.encode(arguments).decode(), self._timeout_s
        )
        if result.outcome != "ok":  # (what it answered may hold what users said: it is not logged)
            raise BackendError(f"{self._server}/{tool}: {result.outcome} (status {result.status})")
        return result.text


def _snippet(item: Any) -> str | None:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return next((item[f] for f in SNIPPET_FIELDS if isinstance(item.get(f), str)), None)
    return None
