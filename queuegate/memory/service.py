"""Memory for chat requests: recall before a turn is sent, remember after it was answered, never in the way.

`prepare` (on the request path, bounded by `timeout_ms`): recall the namespace's snippets for the latest user
message, cut the history to its last turns, and put the snippets in. A store that is slow or failing is skipped:
the request goes on with its messages untouched (a cut without recall would lose what the chat said), the outage is
logged once, and counted. `remember` (off the request path): the answered turn is queued, and the writer task
(`run`) stores it; a full queue drops it (counted), never the client's answer.

The namespace is the chat (its sticky-chat key: header, Open WebUI's chat id, body fields, or the hash of its
start), scoped by API key and by session, so one key never recalls another key's memory.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from queuegate.config import MemoryConfig
from queuegate.memory.backends import Backend
from queuegate.memory.context import (
    cut_at,
    inject,
    latest_user_text,
    query_text,
    recalled_block,
    truncate,
    turn_text,
)
from queuegate.memory.outcomes import Outcomes
from queuegate.tools.gateway import GatewayTool
from queuegate.tools.servers import ToolResult

log = logging.getLogger("queuegate.memory")
QUEUE_SIZE = 1000  # answered turns waiting to be stored
WRITE_BATCH = 100  # turns stored in one transaction at most
SHOW_LIMIT = 40_000  # characters `memory show` prints at most (the admin protocol's lines are bounded)
LIST_LIMIT = 300  # chats `memory list` prints at most
EXPIRE_EVERY_S = 3600.0
MEMORY_TOOL = "memory_query"  # the tool a model gets (hint) to recall more of its own chat
MAX_TOOL_K = 20  # snippets one memory_query call answers at most
TOOL_RECALL_FACTOR = 5  # a memory_query call may take this many times [memory].timeout_ms
_MEMORY_TOOL_DEFINITION = {
    "type": "function",
    "function": {
        "name": MEMORY_TOOL,
        "description": "Search earlier parts of this conversation that are no longer shown (what the user said, "
        "and what was answered). Returns the most relevant remembered turns.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to look for: a topic, a name, a question."},
                "k": {"type": "integer", "description": f"How many turns at most (1-{MAX_TOOL_K}, default 5)."},
            },
            "required": ["query"],
        },
    },
}


@dataclass(frozen=True, slots=True)
class Recall:
    """A chat request's memory: its namespace, its messages as forwarded, the user's latest words, and whether the
    model is offered `memory_query` (the recall worked, the chat remembers something, and `hint` asked for it)."""

    namespace: str
    messages: list[Any]
    user_text: str
    offers_tool: bool = False


class Memory:
    tool_name = MEMORY_TOOL

    def __init__(self, config: MemoryConfig, backend: Backend, outcomes: Outcomes) -> None:
        """`outcomes`: shared with the backend, which counts its own (embeddings)."""
        self.config = config
        self.backend = backend
        self._send, self._receive = trio.open_memory_channel[tuple[str, str]](QUEUE_SIZE)
        self.outcomes = outcomes
        self.counts = outcomes.counts  # outcome -> how many (recalls, remembers, embeddings), for /metrics

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the store, then store answered turns as they come; close it on the way out."""
        try:
            await self.backend.open()
        except Exception as exc:  # a store that cannot open: chats go on without memory (every recall fails fast)
            self.outcomes.failed("open", "open_failed", exc)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._expire_old_turns)
                nursery.start_soon(self.backend.upkeep)
                async for turn in self._receive:
                    turns = [turn]
                    with contextlib.suppress(trio.WouldBlock):
                        while len(turns) < WRITE_BATCH:
                            turns.append(self._receive.receive_nowait())  # the ones waiting: one transaction
                    try:
                        await self.backend.remember(turns)
                        self.outcomes.ok("remember", "remembered", len(turns))
                    except Exception as exc:  # a failing disk must not stop the writer
                        self.outcomes.failed("remember", "remember_failed", exc, len(turns))
        finally:
            with trio.CancelScope(shield=True):
                await self.backend.close()

    async def _expire_old_turns(self) -> None:
        """`retention_days`: old turns are deleted at start and every hour."""
        while True:
            try:
                await self.backend.expire()
            except Exception as exc:  # (the next hour tries again)
                self.outcomes.failed("expire", "expire_failed", exc)
            await trio.sleep(EXPIRE_EVERY_S)

    def applies(self, klass: str, model_memory: bool) -> bool:
        return self.config.enabled and model_memory and (klass != "agent" or self.config.for_agents)

    @staticmethod
    def namespace(key: str | None, session: str | None, chat: str, scope: str | None = None) -> str:
        """A chat's memory: its key's and session's; `scope` narrows it further (who asks, for a chat known only
        by its start)."""
        who = f" by={scope}" if scope else ""
        return f"key={key or '-'} session={session or '-'}{who} {chat}"

    async def prepare(self, namespace: str, messages: list[Any], klass: str, *, hint: bool = False) -> Recall:
        """The messages to forward (see the module); `klass`: the request's (for what the recall queues); `hint`:
        the model may be offered `recall_tool` (execute mode, the name free): one line tells it so."""
        user = latest_user_text(messages)
        question = query_text(messages)
        if not question:
            return Recall(namespace, messages, user)
        recalled: tuple[list[str], int | None] | None = None
        timeout_s = self.config.timeout_ms / 1000
        with trio.move_on_after(timeout_s) as waiting:
            try:
                recalled = await self.backend.recall(namespace, question, self.config.query_k, timeout_s, klass)
                self.outcomes.ok("recall", "recalled")
            except Exception as exc:  # memory never breaks a chat
                self.outcomes.failed("recall", "recall_failed", exc)
        if waiting.cancelled_caught:
            late = TimeoutError(f"no answer within {self.config.timeout_ms:g} ms")
            self.outcomes.failed("recall", "recall_timeout", late)
        if recalled is None:
            return Recall(namespace, messages, user)  # no recall: nothing is cut either
        snippets, remembered = recalled
        forwarded = messages
        if self.config.truncate_history:
            cut = cut_at(messages, self.config.keep_last)
            # Never cut turns that were never remembered (memory just turned on, or turns it could not store).
            cut_turns = sum(1 for m in messages[:cut] if isinstance(m, dict) and m.get("role") == "user")
            if remembered is None or remembered >= cut_turns:
                forwarded = truncate(messages, cut)
        offers_tool = hint and remembered != 0
        messages = inject(forwarded, snippets, self.config.inject_role, MEMORY_TOOL if offers_tool else "")
        return Recall(namespace, messages, user, offers_tool)

    def recall_tool(self, namespace: str, klass: str) -> GatewayTool:
        """`memory_query` for one chat: the model searches that chat's memory (and no other)."""

        async def run(arguments: str, timeout_s: float) -> ToolResult:
            started = trio.current_time()
            text, outcome = await self._tool_recall(namespace, klass, arguments, timeout_s)
            return ToolResult(text, outcome, 200 if outcome == "ok" else None, trio.current_time() - started)

        return GatewayTool(_MEMORY_TOOL_DEFINITION, run)

    def remember(self, recall: Recall, answer: str) -> None:
        """Queue an answered turn for the store (dropped, and counted, when the queue is full)."""
        if not self.config.upsert or not (recall.user_text or answer):
            return
        try:
            turn = turn_text(recall.user_text, answer, self.config.max_upsert_chars)
            self._send.send_nowait((recall.namespace, turn))
        except trio.WouldBlock:
            self.outcomes.count("remember_dropped")

    async def _tool_recall(self, namespace: str, klass: str, arguments: str, timeout_s: float) -> tuple[str, str]:
        """(what the model reads, outcome) of one `memory_query` call."""
        try:
            given = msgspec.json.decode(arguments or "{}")
            query, k = given["query"], given.get("k", 5)
            if not isinstance(query, str) or not query.strip() or not isinstance(k, int):
                raise TypeError
        except (msgspec.DecodeError, KeyError, TypeError, AttributeError):
            return 'error: expected {"query": "what to look for", "k": 5}', "invalid"
        # Bounded like a recall, if more loosely (a model waits for it), not by the tool call's timeout: it shares the
        # store with every chat's recalls.
        timeout_s = min(timeout_s, TOOL_RECALL_FACTOR * self.config.timeout_ms / 1000)
        with trio.move_on_after(timeout_s):
            try:
                snippets, _ = await self.backend.recall(namespace, query, max(1, min(k, MAX_TOOL_K)), timeout_s, klass)
            except Exception as exc:  # (the model is told; the chat goes on)
                self.outcomes.failed("recall", "tool_recall_failed", exc)
                return "error: memory is not answering", "error"
            self.outcomes.ok("recall", "tool_recalled")
            return (recalled_block(snippets) if snippets else "nothing found"), "ok"
        self.outcomes.failed("recall", "tool_recall_timeout", TimeoutError("memory_query: no answer in time"))
        return "error: memory did not answer in time", "timeout"

    async def answer(self, action: str, namespace: str) -> str:
        """An operator's look at the store (`queuegate admin memory list|show|forget`), as text."""
        if action == "list":
            rows = await self.backend.namespaces()
            lines = [f"{count:6} turns, last {_when(at)}  {ns}" for ns, count, at in rows if namespace in ns]
            if len(lines) > LIST_LIMIT:
                lines = [*lines[:LIST_LIMIT], f"... and {len(lines) - LIST_LIMIT} more (narrow it: memory list TEXT)"]
            return "\n".join(lines) or "no chat remembered" + (f" matching {namespace!r}" if namespace else "")
        if not namespace:
            raise ValueError(f"memory {action}: name the chat (a namespace, as `queuegate admin memory list` shows)")
        if action == "show":
            turns = await self.backend.turns(namespace)
            shown = "\n\n".join(f"[{_when(at)}]\n{text}" for at, text in turns)
            if len(shown) > SHOW_LIMIT:  # (an answer is one line of the admin protocol, which is bounded)
                shown = f"... ({len(turns)} turns; the last {SHOW_LIMIT} characters)\n" + shown[-SHOW_LIMIT:]
            return shown or f"nothing remembered for {namespace!r}"
        forgotten = await self.backend.forget(namespace)
        log.info("memory forgotten", extra={"fields": {"namespace": namespace, "turns": forgotten}})
        return f"forgot {forgotten} turns of {namespace!r}"


def _when(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
