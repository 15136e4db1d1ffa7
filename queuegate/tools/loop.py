"""One chat request's tool handling: which mode it gets, and the rounds it takes to answer.

Modes (`ToolPolicy.plan`, from the route, then the model's `tools`, then `[tools].mode`):
- execute: the tool servers' tools are offered with the client's own; calls to them run here, their results go back
  as `role: "tool"` messages, and the model is asked again until it answers without calling one of them.
- passthrough: tool calls go back to the client (text-form ones made structured).
- suppress: no tools go upstream, and any tool call in the answer is dropped (`finish_reason` becomes `stop`).
A request that needs none of this (no tools anywhere, nothing to convert) takes the plain way, at no cost.

The client sees ONE assistant message: content streams live in every round, the server tools' calls and every
intermediate `finish_reason` stay here, and exactly one `finish_reason` ends it. Between rounds the request holds no
upstream slot; its next round keeps its place in the queue and prefers the same upstream (its KV cache).

A round that calls both server tools and client tools hands only the client's calls back, and runs none of the
server's: the client's next request carries the conversation on (the model may call them again then), and a tool
never runs whose result the model would not see.

Bounds (`max_rounds`, `max_calls`, `loop_timeout_s`, a call repeated with the same arguments): one last round without
tools lets the model answer with what it has; the log line and the answer's `queuegate` metadata say which bound.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import trio

from queuegate.config import ToolsConfig
from queuegate.errors import GatewayError, InternalError, UpstreamError
from queuegate.fleet.catalog import ModelSpec
from queuegate.proxy._convert import DONE_EVENT, AnswerFromEvents
from queuegate.proxy._record import CLIENT_CLOSED, RequestRecord, Usage, tokens_in
from queuegate.proxy._reply import SSE_HEADERS, Reply
from queuegate.proxy._request import ParsedRequest, prompt_chars
from queuegate.scheduler import Ticket
from queuegate.tools.servers import ToolResult, ToolServers
from queuegate.tools.textcalls import TextToolCallFilter, parse_text_tool_calls

log = logging.getLogger("queuegate.tools")

TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call")
ARGUMENTS_SHOWN = 120  # characters of a call's arguments a progress line shows
_ID = re.compile(rb'"id"\s*:\s*"([^"\\]*)"')
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]*)"')
# An event with none of these is content or reasoning only, relayed as it is (unless text-form calls are read).
_NOT_PLAIN = (b'"tool_calls"', b'"usage"', b'"error"', b'"finish_reason":"', b'"finish_reason": "')
Send = Callable[[bytes], Awaitable[None]]


class ToolMetrics(Protocol):
    def observe_tool_call(self, tool: str, outcome: str, duration_s: float) -> None: ...


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one request's tool calls are handled."""

    mode: str  # execute | passthrough | suppress
    server_tools: list[dict[str, Any]]  # offered to the model (execute)
    client_tools: list[dict[str, Any]]
    text_calls: bool  # read text-form tool calls out of the content
    limits: ToolsConfig

    @property
    def client_names(self) -> frozenset[str]:
        return frozenset(_tool_name(t) for t in self.client_tools) - {""}


class ToolPolicy:
    """Decides each request's mode (see the module); owns the `[tools]` settings, which a reload may change."""

    def __init__(self, config: ToolsConfig, servers: ToolServers) -> None:
        self.config = config
        self.servers = servers

    def mode_for(self, route_mode: str | None, model_mode: str | None) -> str:
        mode = route_mode or model_mode or self.config.mode
        if mode == "auto":
            return "execute" if self.servers.configured else "passthrough"
        return mode

    def plan(self, route_mode: str | None, spec: ModelSpec, body: dict[str, Any]) -> ToolPlan | None:
        """The request's plan, or None for the plain way (nothing to do about tools)."""
        mode = self.mode_for(route_mode, spec.tools)
        tools = body.get("tools")
        client_tools = [t for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []
        if mode == "suppress":
            if not any(name in body for name in TOOL_FIELDS):
                return None
            return ToolPlan(mode, [], client_tools, True, self.config)
        server_tools: list[dict[str, Any]] = []
        if mode == "execute":
            server_tools = self.servers.definitions(frozenset(_tool_name(t) for t in client_tools))
        if not server_tools and not (client_tools and self.config.text_tool_calls):
            return None
        return ToolPlan(mode, server_tools, client_tools, self.config.text_tool_calls, self.config)


class Rounds(Protocol):
    """What the loop needs of the proxy (`_pipeline.Proxy`): a place in the queue for each round, and the round's
    reply."""

    def enqueue(
        self,
        spec: ModelSpec,
        record: RequestRecord,
        tokens: int,
        *,
        affinity: str | None = None,
        since: float | None = None,
        prefer: str | None = None,
    ) -> Ticket: ...

    async def start(self, spec: ModelSpec, record: RequestRecord, payload: bytes, ticket: Ticket) -> Reply: ...

    def notices_apply(self, record: RequestRecord) -> bool: ...

    @property
    def keepalive_s(self) -> float: ...


class _RoundFailed(Exception):
    """A round ended in an error after bytes reached the client: `event` is the error event it ends with."""

    def __init__(self, event: bytes, status: int, message: str) -> None:
        super().__init__(message)
        self.event, self.status, self.message = event, status, message


@dataclass(slots=True)
class _Round:
    """What one round of the model said."""

    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)  # every tool call, structured or read from text
    finish_reason: str | None = None
    saw_calls: bool = False  # an event carried structured tool calls
    id_field: bytes | None = None  # `"id":"..."` as its events spell it, to give them the message's (b"": keep)
    held_text: str = ""  # text held back as a possible tool call that was not one (to send as content)


class ToolLoop:
    """One request's rounds (see the module). `reply` runs it: inline for a whole answer, or as the producer of the
    client's event stream."""

    def __init__(
        self,
        rounds: Rounds,
        servers: ToolServers,
        metrics: ToolMetrics | None,
        plan: ToolPlan,
        spec: ModelSpec,
        record: RequestRecord,
        request: ParsedRequest,
        affinity: str | None,
    ) -> None:
        self._rounds = rounds
        self._affinity = affinity  # round 1's sticky chat (later rounds prefer their previous upstream)
        self._servers = servers
        self._metrics = metrics
        self._plan = plan
        self._spec = spec
        self._record = record
        self._request = request
        body = {**spec.defaults, **request.body, "model": spec.upstream_model}
        self._messages: list[Any] = list(body.pop("messages"))
        for name in TOOL_FIELDS:
            body.pop(name, None)
        if plan.mode != "suppress":
            if tools := plan.client_tools + plan.server_tools:
                body["tools"] = tools
            for name in ("tool_choice", "parallel_tool_calls"):
                if name in request.body:
                    body[name] = request.body[name]
        if record.stream and spec.kind.stream_usage:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        self._body = body
        self._usage = Usage()
        self._usage_estimated = False
        self._seen_calls: set[tuple[str, str]] = set()
        self._arrived_at: float | None = None  # when round 1 was queued (later rounds keep that place)
        self._last_upstream: str | None = None
        self._deadline = trio.current_time() + plan.limits.loop_timeout_s
        # The one message's id and model: round 1's (later rounds' events are given its id).
        self._chunk_id = f"chatcmpl-{record.request_id}"
        self._model_name = spec.upstream_model
        self._created = int(time.time())
        self._id_field = b""  # `"id":"<the message's id>"`, once round 1's first event set it

    # -- the whole answer -----------------------------------------------------------------------------------------

    async def answer(self) -> Reply:
        """Run every round inline (a client that did not ask to stream) and give the one final answer."""
        contents: list[str] = []
        while True:
            final = self._record.tool_bound is not None
            reply, record = await self._run_round(final)
            self._round_done(record)
            if reply.status != 200 or not isinstance(reply.body, bytes):
                return reply  # an error before anything was sent: the client gets it as it is
            try:
                answer = msgspec.json.decode(reply.body)
                message = answer["choices"][0]["message"]
            except (msgspec.DecodeError, KeyError, IndexError, TypeError):
                raise UpstreamError(f"upstream {self._record.upstream} sent an answer without a message") from None
            said = self._whole_round(message, answer["choices"][0].get("finish_reason"))
            if said.content:
                contents.append(said.content)
            server_calls, client_calls = self._split(said.calls, final)
            if server_calls and not client_calls:
                if self._within_bounds(server_calls):
                    self._remember_round(said, server_calls)
                    await self._run_calls(server_calls, progress=None)
                continue  # (past a bound: one last round, without tools)
            return self._final_answer(answer, message, contents, client_calls, said.finish_reason)

    def _whole_round(self, message: dict[str, Any], finish_reason: Any) -> _Round:
        content = message.get("content") if isinstance(message.get("content"), str) else ""
        calls = [c for c in message.get("tool_calls") or [] if isinstance(c, dict)]
        if not calls and self._plan.text_calls and content:
            found = parse_text_tool_calls(content)
            if found is not None:
                content, calls = found.text, found.calls
        return _Round(content, calls, finish_reason if isinstance(finish_reason, str) else None)

    def _final_answer(
        self,
        answer: dict[str, Any],
        message: dict[str, Any],
        contents: list[str],
        client_calls: list[dict[str, Any]],
        finish_reason: str | None,
    ) -> Reply:
        message = {k: v for k, v in message.items() if k != "tool_calls"}
        message["content"] = "".join(contents) or (None if client_calls else "")
        if client_calls:
            message["tool_calls"] = client_calls
        finish = self._finish_reason(client_calls, finish_reason)
        answer = {**answer, "choices": [{**answer["choices"][0], "message": message, "finish_reason": finish}]}
        answer["usage"] = self._usage_doc()
        if meta := self._metadata():
            answer["queuegate"] = meta
        self._note_end()
        return Reply(200, {"content-type": "application/json"}, msgspec.json.encode(answer))

    # -- the event stream -----------------------------------------------------------------------------------------

    async def stream(self, tasks: trio.Nursery) -> Reply:
        """Start the loop as the producer of the client's event stream, in the request's nursery `tasks`. Round 1's
        failures before its first byte are the reply (a real HTTP status); after that the stream carries everything,
        errors as error events."""
        body = LoopStream(self._record)
        return await tasks.start(body.produce, self._produce)

    async def _produce(self, send: Send, started: Callable[[Reply | None], None]) -> None:
        """Every round, streamed. `started(None)` once the stream begins, or `started(reply)`: round 1's answer
        was an error, which the client gets as it is."""
        first = True
        while True:
            final = self._record.tool_bound is not None
            reply, record = await self._run_round(final)
            if first:
                first = False
                if reply.status != 200:
                    started(reply)
                    return
                started(None)
            elif reply.status != 200:
                raise _RoundFailed(*_error_event(reply))
            said = await self._stream_round(reply, record, send)
            server_calls, client_calls = self._split(said.calls, final)
            if server_calls and not client_calls:
                if self._within_bounds(server_calls):
                    self._remember_round(said, server_calls)
                    await self._run_calls(server_calls, progress=send)
                continue  # (past a bound: one last round, without tools)
            if said.held_text:
                await send(self._chunk({"content": said.held_text}))
            if client_calls:
                await send(self._chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(client_calls)]}))
            await send(self._chunk({}, finish_reason=self._finish_reason(client_calls, said.finish_reason)))
            if self._record.wants_usage:
                usage = {"id": self._chunk_id, "object": "chat.completion.chunk", "created": self._created}
                usage |= {"model": self._model_name, "choices": [], "usage": self._usage_doc()}
                await send(b"data: " + msgspec.json.encode(usage) + b"\n\n")
            self._note_end()
            await self._record.finish_before_last_byte(200)
            await send(DONE_EVENT)
            return

    async def _stream_round(self, reply: Reply, record: RequestRecord, send: Send) -> _Round:
        """Relay one round's events: content as it comes; tool calls, finish reasons and usage held back."""
        text = TextToolCallFilter() if self._plan.text_calls else None
        events: list[bytes] = []  # the round's data events, folded at the end when it called tools
        said = _Round()
        source = reply.body
        try:
            if isinstance(source, bytes):
                await self._relay_block(source, text, events, said, send)
            else:
                async for block in source:
                    await self._relay_block(block, text, events, said, send)
        finally:
            if not isinstance(source, bytes):
                await source.aclose()  # closes the upstream, gives back the slot, settles the round's usage
            self._round_done(record)
        if said.saw_calls or (text is not None and text.seen_marker):
            folded = AnswerFromEvents(chat=True)
            folded.feed(b"".join(b"data: " + e + b"\n\n" for e in events))
            choices = folded.answer()["choices"]
            message = choices[0].get("message") or {} if choices else {}
            said.calls = [c for c in message.get("tool_calls") or [] if isinstance(c, dict)]
            said.content = message.get("content") or ""
        if text is not None:
            found = text.finish()
            if found is None:
                said.held_text = text.held()  # it was not a tool call after all: it goes out as text
            elif not said.calls:
                said.calls = found.calls
                said.content = (parse_text_tool_calls(said.content) or found).text
        return said

    async def _relay_block(
        self, block: bytes, text: TextToolCallFilter | None, events: list[bytes], said: _Round, send: Send
    ) -> None:
        for event in block.replace(b"\r\n", b"\n").split(b"\n\n"):
            event = event.strip(b"\n")
            if event and (out := self._take_event(event, text, events, said)):
                await send(out)

    def _take_event(self, event: bytes, text: TextToolCallFilter | None, events: list[bytes], said: _Round) -> bytes:
        """What of one upstream event goes to the client now (b"": nothing)."""
        if not event.startswith(b"data:"):
            return event + b"\n\n" if event.startswith(b":") else b""  # comments (keep-alives) pass
        payload = event[5:].strip()
        if payload == b"[DONE]":
            return b""
        events.append(payload)
        if said.id_field is None:
            self._adopt_id(payload, said)
        if said.id_field:
            event = event.replace(said.id_field, self._id_field, 1)  # one message: one id
        plain = not any(mark in payload for mark in _NOT_PLAIN)
        if plain and text is None:
            return event + b"\n\n"  # most events: content or reasoning, relayed as they are
        try:
            chunk = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            raise _RoundFailed(*_failure(502, f"upstream {self._record.upstream} sent malformed JSON")) from None
        if not isinstance(chunk, dict):
            return b""
        if "error" in chunk and not chunk.get("choices"):
            error = chunk["error"] if isinstance(chunk["error"], dict) else {}
            raise _RoundFailed(b"data: " + payload + b"\n\n", 502, str(error.get("message", "upstream error")))
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return b""  # the usage chunk: the loop sends its own, summed over every round
        choice = choices[0]
        if isinstance(choice.get("finish_reason"), str):
            said.finish_reason = choice["finish_reason"]
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        if delta.get("tool_calls"):
            said.saw_calls = True
        content = delta.get("content")
        released = text.feed(content) if text is not None and isinstance(content, str) and content else content
        if plain and released == content:
            return event + b"\n\n"
        keep = {k: v for k, v in delta.items() if k in ("role", "reasoning_content") and v is not None}
        if released:
            keep["content"] = released
        return self._chunk(keep) if "content" in keep or "reasoning_content" in keep else b""

    def _adopt_id(self, payload: bytes, said: _Round) -> None:
        """Note the id a round's events carry (b"": one to leave alone); round 1's becomes the message's."""
        found = _ID.search(payload)
        if self._id_field == b"":
            if found is not None:
                self._chunk_id = found.group(1).decode("utf-8", "replace")
            model = _MODEL.search(payload)
            if model is not None:
                self._model_name = model.group(1).decode("utf-8", "replace")
            self._id_field = msgspec.json.encode({"id": self._chunk_id})[1:-1]
        said.id_field = b"" if found is None or found.group(0) == self._id_field else found.group(0)

    # -- rounds and calls -----------------------------------------------------------------------------------------

    async def _run_round(self, final: bool) -> tuple[Reply, RequestRecord]:
        """Queue for a slot (round 1 as any request; later rounds keep its place) and send this round."""
        body = {**self._body, "messages": self._messages}
        if final:
            for name in TOOL_FIELDS:
                body.pop(name, None)
        record = self._round_record()
        tokens = self._request.tokens if self._arrived_at is None else tokens_in(record.prompt_chars)
        ticket = self._rounds.enqueue(
            self._spec, record, tokens, affinity=self._affinity, since=self._arrived_at, prefer=self._last_upstream
        )
        if self._arrived_at is None:
            self._arrived_at = ticket.enqueued_at
        self._record.tool_rounds += 1
        self._record.tool_step = f"round {self._record.tool_rounds}"
        return await self._rounds.start(self._spec, record, msgspec.json.encode(body), ticket), record

    def _round_record(self) -> RequestRecord:
        """A round's own record: the proxy fills it in as for any request; the request's record sums them up."""
        parent = self._record
        return RequestRecord(
            parent.request_id,
            parent.endpoint,
            client=parent.client,
            key=parent.key,
            klass=parent.klass,
            flow=parent.flow,
            session=parent.session,
            model=parent.model,
            stream=parent.stream,
            wants_usage=True,
            prompt_chars=prompt_chars({"messages": self._messages}),
            quiet=True,
        )

    def _round_done(self, record: RequestRecord) -> None:
        """A round is over (its upstream closed): add what it did to the request's record."""
        parent = self._record
        if record.upstream is not None:
            parent.upstream = self._last_upstream = record.upstream
        parent.first_token_at = parent.first_token_at or record.first_token_at
        parent.upstream_started_at = parent.upstream_started_at or record.upstream_started_at
        parent.queue_s += record.queue_s
        parent.retries += record.retries
        parent.chunks += record.chunks
        if record.usage is not None:
            u = self._usage
            self._usage = parent.usage = Usage(
                u.prompt_tokens + record.usage.prompt_tokens,
                u.completion_tokens + record.usage.completion_tokens,
                u.total_tokens + record.usage.total_tokens,
                estimated=u.estimated or record.usage.estimated,
            )

    def _split(self, calls: list[dict[str, Any]], final: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(calls QueueGate runs, calls that go back to the client): none of either in a final round or suppress."""
        if final or self._plan.mode == "suppress":
            return [], []
        server = [c for c in calls if self._plan.mode == "execute" and _call_name(c) in self._server_names]
        client = [c for c in calls if c not in server]
        return server, client

    @property
    def _server_names(self) -> frozenset[str]:
        return frozenset(_tool_name(t) for t in self._plan.server_tools)

    def _within_bounds(self, calls: list[dict[str, Any]]) -> bool:
        """Whether these calls may run; if not, the bound that stops the loop is noted (the next round is final)."""
        limits = self._plan.limits
        repeated = any((_call_name(c), _canonical(c)) in self._seen_calls for c in calls)
        if self._record.tool_rounds > limits.max_rounds:
            self._record.tool_bound = "max_rounds"
        elif self._record.tool_calls + len(calls) > limits.max_calls:
            self._record.tool_bound = "max_calls"
        elif repeated:
            self._record.tool_bound = "repeated_call"
        elif trio.current_time() >= self._deadline:
            self._record.tool_bound = "loop_timeout"
        if self._record.tool_bound is not None:
            log.info(
                "tool loop bound",
                extra={
                    "fields": {
                        "rid": self._record.request_id,
                        "bound": self._record.tool_bound,
                        "round": self._record.tool_rounds,
                    }
                },
            )
        return self._record.tool_bound is None

    def _remember_round(self, said: _Round, calls: list[dict[str, Any]]) -> None:
        self._messages.append({"role": "assistant", "content": said.content or None, "tool_calls": calls})
        for call in calls:
            self._seen_calls.add((_call_name(call), _canonical(call)))

    async def _run_calls(self, calls: list[dict[str, Any]], progress: Send | None) -> None:
        """Run one round's calls concurrently (each bounded; the loop's deadline cuts them all), then add their
        results in the order called. `progress` (streamed): where progress lines and keep-alives go meanwhile."""
        results: list[ToolResult | None] = [None] * len(calls)
        self._record.tool_step = f"round {self._record.tool_rounds}: {', '.join(_call_name(c) for c in calls)}"
        shows = progress is not None and self._rounds.notices_apply(self._record)
        if shows:
            assert progress is not None
            await progress(self._chunk({"reasoning_content": "".join(_call_line(c) for c in calls)}))

        async def run(i: int, call: dict[str, Any]) -> None:
            timeout = min(self._plan.limits.call_timeout_s, max(0.0, self._deadline - trio.current_time()))
            function = call.get("function") if isinstance(call.get("function"), dict) else {}
            arguments = function.get("arguments") if isinstance(function.get("arguments"), str) else "{}"
            results[i] = result = await self._servers.call(_call_name(call), arguments, timeout)
            self._observe(call, result)
            if shows:
                assert progress is not None
                await progress(self._chunk({"reasoning_content": _result_line(call, result)}))

        async with trio.open_nursery() as waiting:
            if progress is not None:
                waiting.start_soon(self._keep_alive, progress)
            async with trio.open_nursery() as running:
                for i, call in enumerate(calls):
                    running.start_soon(run, i, call)
            waiting.cancel_scope.cancel()  # the calls are done: no more keep-alives
        self._record.tool_calls += len(calls)
        for call, result in zip(calls, results, strict=True):
            text = result.text if result is not None else "error: the call did not finish"
            self._messages.append({"role": "tool", "tool_call_id": call.get("id") or "", "content": text})

    async def _keep_alive(self, send: Send) -> None:
        while True:
            await trio.sleep(self._rounds.keepalive_s)
            await send(b": tools running\n\n")

    def _observe(self, call: dict[str, Any], result: ToolResult) -> None:
        name = _call_name(call)
        log.info(
            "tool call",
            extra={
                "fields": {
                    "rid": self._record.request_id,
                    "tool": name,
                    "server": self._servers.server_of(name),
                    "round": self._record.tool_rounds,
                    "outcome": result.outcome,
                    "status": result.status,
                    "duration_ms": round(result.duration_s * 1000, 1),
                }
            },
        )
        if self._metrics is not None:
            self._metrics.observe_tool_call(name, result.outcome, result.duration_s)

    # -- what the client is told ----------------------------------------------------------------------------------

    def _finish_reason(self, client_calls: list[dict[str, Any]], said: str | None) -> str:
        if client_calls:
            return "tool_calls"
        return "stop" if said in (None, "tool_calls", "function_call") else said

    def _usage_doc(self) -> dict[str, int]:
        u = self._usage
        return {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
        }

    def _metadata(self) -> dict[str, Any]:
        if self._record.tool_rounds <= 1 and self._record.tool_bound is None:
            return {}
        return {
            "tool_rounds": self._record.tool_rounds,
            "tool_calls": self._record.tool_calls,
            "bound": self._record.tool_bound,
        }

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self._chunk_id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        if finish_reason is not None and (meta := self._metadata()):
            chunk["queuegate"] = meta
        return b"data: " + msgspec.json.encode(chunk) + b"\n\n"

    def _note_end(self) -> None:
        """The loop is over: the status shows no step any more."""
        self._record.tool_step = None


class LoopStream:
    """The client's event stream of a tool loop (a StreamBody). The loop produces it in the request's nursery, so
    its tool calls and upstream streams live and die with the request; this hands the bytes to the HTTP layer.
    `stop` (operator, shutdown) cancels the loop and ends the stream with its error event."""

    def __init__(self, record: RequestRecord) -> None:
        self._record = record
        self._send, self._receive = trio.open_memory_channel[bytes](8)
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._stop: GatewayError | None = None
        self._stop_sent = False

    async def produce(
        self,
        loop: Callable[[Send, Callable[[Reply | None], None]], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[Reply] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the loop (see `ToolLoop._produce`); what it raises before the stream began is the caller's."""
        began = False

        def started(reply: Reply | None) -> None:
            nonlocal began
            began = reply is None
            task_status.started(Reply(200, dict(SSE_HEADERS), self) if reply is None else reply)

        try:
            with self._scope:
                async with self._send:
                    try:
                        await loop(self._send.send, started)
                    except _RoundFailed as failed:
                        await self._end_with(failed.event, failed.status, failed.message)
                    except GatewayError as exc:
                        if not began:
                            raise
                        await self._end_with(b"data: " + exc.body() + b"\n\n", exc.status, exc.message)
                    except Exception:
                        if not began:
                            raise
                        rid = self._record.request_id
                        log.exception("unexpected error in a tool loop", extra={"fields": {"rid": rid}})
                        error = InternalError("QueueGate failed while running the tool loop")
                        await self._end_with(b"data: " + error.body() + b"\n\n", error.status, error.message)
        finally:
            self._done.set()

    async def _end_with(self, event: bytes, status: int, message: str) -> None:
        self._record.tool_step = None
        await self._record.finish_before_last_byte(status, error=message)
        await self._send.send(event)

    def __aiter__(self) -> LoopStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._stop is not None and not self._stop_sent and not self._record.finished:
                self._stop_sent = True
                await self._record.finish_before_last_byte(self._stop.status, error=self._stop.message)
                return b"data: " + self._stop.body() + b"\n\n"
            raise StopAsyncIteration from None

    def stop(self, error: GatewayError) -> None:
        if self._stop is None and not self._record.finished:
            self._stop = error
            self._scope.cancel()

    async def aclose(self) -> None:
        """End the loop (tool calls and upstream closed) and log the request if nothing else did."""
        self._scope.cancel()
        await self._done.wait()
        self._receive.close()
        if self._stop is not None:
            self._record.finish(self._stop.status, error=self._stop.message)
        self._record.finish(CLIENT_CLOSED, error="client closed the stream")


def _tool_name(tool: Any) -> str:
    function = tool.get("function") if isinstance(tool, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else ""


_call_name = _tool_name  # a call names its function as a tool does: {"function": {"name": ...}}


def _canonical(call: dict[str, Any]) -> str:
    """A call's arguments in one spelling, to see a call repeated with the same arguments."""
    function = call.get("function") if isinstance(call.get("function"), dict) else {}
    arguments = function.get("arguments")
    try:
        decoded = msgspec.json.decode(arguments) if isinstance(arguments, str) else arguments
        return msgspec.json.encode(decoded, order="sorted").decode()
    except (msgspec.DecodeError, TypeError):
        return str(arguments)


def _call_line(call: dict[str, Any]) -> str:
    """`→ get_current_time(timezone="Europe/Berlin")`: a progress line for a call starting."""
    function = call.get("function") if isinstance(call.get("function"), dict) else {}
    try:
        arguments = msgspec.json.decode(function.get("arguments") or "{}")
    except msgspec.DecodeError:
        arguments = None
    if isinstance(arguments, dict):
        shown = ", ".join(f"{k}={msgspec.json.encode(v).decode()}" for k, v in arguments.items())
    else:
        shown = "…"
    if len(shown) > ARGUMENTS_SHOWN:
        shown = shown[:ARGUMENTS_SHOWN] + "…"
    return f"→ {_call_name(call)}({shown})\n"


def _result_line(call: dict[str, Any], result: ToolResult) -> str:
    """`← get_current_time 0.2 s`: a progress line for a call that ended (and how, unless it went well)."""
    how = "" if result.outcome == "ok" else f" ({result.outcome})"
    return f"← {_call_name(call)}{how} {result.duration_s:.1f} s\n"


def _failure(status: int, message: str) -> tuple[bytes, int, str]:
    error = UpstreamError(message, status=status)
    return b"data: " + error.body() + b"\n\n", status, message


def _error_event(reply: Reply) -> tuple[bytes, int, str]:
    """A later round's error answer (nothing of it sent yet) as the stream's error event."""
    message = "upstream refused the request"
    if isinstance(reply.body, bytes):
        try:
            error = msgspec.json.decode(reply.body).get("error")
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                message = error["message"]
        except (msgspec.DecodeError, AttributeError):
            pass
    return _failure(reply.status, message)
