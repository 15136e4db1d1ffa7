"""Where memory lives: the built-in SQLite store, or a tool server's `memory_query` / `memory_upsert` operations.

Both answer the same few async calls (`Backend`); `Memory` bounds how long a request waits for them and survives
their failures. The built-in store's calls run in a worker thread (SQLite blocks). A tool server is called like any
tool (`ToolServers.call`): `memory_query` gets `{"namespace", "query", "k"}` and answers a list of snippets (strings,
or objects with a `text`, `document` or `content` field; or an object whose `results` is such a list), and
`memory_upsert` gets `{"namespace", "text"}`. Listing, showing and forgetting chats are for the built-in store.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import msgspec
import trio

from queuegate.memory.store import MemoryStore
from queuegate.tools.servers import ToolServers

SNIPPET_FIELDS = ("text", "document", "content")
BUILTIN_ONLY = "memory list|show|forget work with the built-in store; this memory is in a tool server"


class BackendError(Exception):
    """The backend failed; the message says how (for the log, once per outage)."""


class Backend(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def recall(self, namespace: str, question: str, k: int, timeout_s: float) -> tuple[list[str], int | None]:
        """The `k` snippets most relevant to `question`, and how many turns the chat remembers (None: unknown)."""

    async def remember(self, turns: list[tuple[str, str]]) -> None: ...

    async def expire(self) -> int: ...

    async def namespaces(self) -> list[tuple[str, int, float]]: ...

    async def turns(self, namespace: str) -> list[tuple[float, str]]: ...

    async def forget(self, namespace: str) -> int: ...


class BuiltinBackend:
    """The built-in store (`store.MemoryStore`), its calls in a worker thread."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        # Recalls have their own thread: one a request stopped waiting for never holds trio's shared threads.
        self._recalling = trio.CapacityLimiter(1)

    async def open(self) -> None:
        await trio.to_thread.run_sync(self.store.open)

    async def close(self) -> None:
        await trio.to_thread.run_sync(self.store.close)

    async def recall(self, namespace: str, question: str, k: int, timeout_s: float) -> tuple[list[str], int | None]:
        # A request that stops waiting leaves the thread behind; SQLite stops the query itself at the deadline.
        deadline = time.monotonic() + timeout_s

        def both() -> tuple[list[str], int]:
            return self.store.recall(namespace, question, k, deadline), self.store.count(namespace)

        return await trio.to_thread.run_sync(both, abandon_on_cancel=True, limiter=self._recalling)

    async def remember(self, turns: list[tuple[str, str]]) -> None:
        await trio.to_thread.run_sync(self.store.remember, turns)

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

    async def recall(self, namespace: str, question: str, k: int, timeout_s: float) -> tuple[list[str], int | None]:
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
