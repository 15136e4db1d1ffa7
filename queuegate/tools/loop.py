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
import math
import re
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import trio

from queuegate.config import ToolsConfig
from queuegate.errors import GatewayError, InternalError, UpstreamError
from queuegate.fleet.catalog import ModelSpec
from queuegate.proxy._convert import DONE_EVENT, AnswerFromEvents
from queuegate.proxy._notices import error_message
from queuegate.proxy._pipeline import TOOL_FIELDS
from queuegate.proxy._record import CLIENT_CLOSED, RequestRecord, Usage, tokens_in
from queuegate.proxy._relay import FINISH_REASON
from queuegate.proxy._reply import SSE_HEADERS, Reply
from queuegate.proxy._request import ParsedRequest, prompt_chars
from queuegate.scheduler import Ticket
from queuegate.tools.gateway import GATEWAY, GatewayTool
from queuegate.tools.servers import ToolResult, ToolServers
from queuegate.tools.textcalls import TextToolCallFilter, parse_text_tool_calls

log = logging.getLogger("queuegate.tools")

ARGUMENTS_SHOWN = 120  # characters of a call's arguments a progress line shows
_EVENT_END = re.compile(rb"\r?\n\r?\n")
_MARKER_STARTS = (b"[", b"<", b"\\u003c", b"\\u003C", b"\\u005b", b"\\u005B")  # as JSON may spell them
_ID = re.compile(rb'"id"\s*:\s*"([^"\\]*)"')
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]*)"')
# An event with none of these is content or reasoning only, relayed as it is (unless text-form calls are read).
_NOT_PLAIN = (b'"tool_calls"', b'"usage"', b'"error"')  # (and a finish reason: `FINISH_REASON`)
KEEPALIVE = b": tools running\n\n"


class ToolMetrics(Protocol):
    def observe_tool_call(self, tool: str, outcome: str, duration_s: float) -> None: ...


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one request's tool calls are handled."""

    mode: str  # execute | passthrough | suppress
    server_tools: list[dict[str, Any]]  # offered to the model (execute): the tool servers' and the gateway's
    client_tools: list[dict[str, Any]]
    text_calls: bool  # read text-form tool calls out of the content
    limits: ToolsConfig
    gateway_tools: dict[str, GatewayTool] = field(default_factory=dict)  # by name: those QueueGate answers itself


class ToolPolicy:
    """Decides each request's mode (see the module); owns the `[tools]` settings, which a reload may change."""

    def __init__(self, config: ToolsConfig, servers: ToolServers, metrics: ToolMetrics | None = None) -> None:
        self.config = config
        self.servers = servers
        self._metrics = metrics

    def mode_for(self, route_mode: str | None, model_mode: str | None) -> str:
        mode = route_mode or model_mode or self.config.mode
        if mode == "auto":
            return "execute" if self.servers.configured else "passthrough"
        return mode

    def suppresses(self, route_mode: str | None, spec: ModelSpec) -> bool:
        """Whether tools are kept from the upstream (also on the plain way)."""
        return self.mode_for(route_mode, spec.tools) == "suppress"

    def offers(self, name: str, route_mode: str | None, spec: ModelSpec, body: dict[str, Any]) -> bool:
        """Whether a gateway tool of this name would be offered to the request: its tool calls run here, and
        neither the client nor a tool server offers a tool of that name (theirs win)."""
        mode = self.mode_for(route_mode, spec.tools)
        if mode != "execute" or not _loop_answers(mode, body):
            return False
        tools = body.get("tools")
        client = {_tool_name(t) for t in tools if isinstance(t, dict)} if isinstance(tools, list) else set()
        return name not in client and self.servers.server_of(name) is None

    def loop_for(
        self,
        rounds: Rounds,
        route_mode: str | None,
        spec: ModelSpec,
        record: RequestRecord,
        request: ParsedRequest,
        affinity: str | None,
        gateway_tools: Sequence[GatewayTool] = (),
    ) -> ToolLoop | None:
        """A chat request's tool loop, or None: the plain way (nothing to do about tools). `gateway_tools`: the
        request's own, offered in execute mode."""
        plan = self.plan(route_mode, spec, request.body, gateway_tools)
        if plan is None:
            return None
        return ToolLoop(rounds, self.servers, self._metrics, plan, spec, record, request, affinity)

    def plan(
        self, route_mode: str | None, spec: ModelSpec, body: dict[str, Any], gateway_tools: Sequence[GatewayTool] = ()
    ) -> ToolPlan | None:
        """The request's plan, or None for the plain way. The loop answers one choice in OpenAI's current tool
        format: a request for several choices (`n`) or with the legacy `functions` takes the plain way."""
        mode = self.mode_for(route_mode, spec.tools)
        if not _loop_answers(mode, body):
            return None
        tools = body.get("tools")
        client_tools = [t for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []
        if mode == "suppress":
            if not any(name in body for name in TOOL_FIELDS):
                return None
            return ToolPlan(mode, [], client_tools, True, self.config)
        server_tools: list[dict[str, Any]] = []
        own: dict[str, GatewayTool] = {}
        if mode == "execute":
            server_tools = self.servers.definitions(frozenset(_tool_name(t) for t in client_tools))
            taken = {_tool_name(t) for t in client_tools + server_tools}  # (a name offered already keeps its tool)
            own = {tool.name: tool for tool in gateway_tools if tool.name not in taken}
            server_tools = [*server_tools, *(tool.definition for tool in own.values())]  # (a new list)
        if not server_tools and not (client_tools and self.config.text_tool_calls):
            return None
        return ToolPlan(mode, server_tools, client_tools, self.config.text_tool_calls, self.config, own)


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

    @property
    def max_answer_bytes(self) -> int: ...


class _RoundFailed(Exception):
    """A round ended in an error after bytes reached the client: `event` is the error event it ends with. The
    status is its round's, once that round's record is finished (`status_of`), else `status`."""

    def __init__(self, event: bytes, status: int, message: str, *, status_of: RequestRecord | None = None) -> None:
        super().__init__(message)
        self.event, self.message = event, message
        self._status, self._status_of = status, status_of

    @property
    def status(self) -> int:
        ended = self._status_of.ended_with if self._status_of is not None else None
        return ended if ended is not None and ended >= 400 else self._status


@dataclass(slots=True)
class _Round:
    """What one round of the model said."""

    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)  # every tool call, structured or read from text
    finish_reason: str | None = None
    saw_calls: bool = False  # an event carried structured tool calls
    size: int = 0  # bytes of its events (bounded as a whole answer is: `max_answer_bytes`)
    id_field: bytes | None = None  # `"id":"..."` as its events spell it, to give them the message's (b"": keep)
    held_text: str = ""  # text held back as a possible tool call that was not one (to send as content)


class ToolLoop:
    """One request's rounds (see the module): `answer` runs them inline for a whole answer; `stream` sends round 1
    and gives the client's event stream, which runs the rest as it is read."""

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
        self._seen_calls: set[tuple[str, str]] = set()
        self._arrived_at: float | None = None  # when round 1 was queued (later rounds keep that place)
        self._last_upstream: str | None = None
        self._deadline = trio.current_time() + plan.limits.loop_timeout_s
        # The one message's id and model: round 1's (later rounds' events are given its id).
        self._chunk_id = f"chatcmpl-{record.request_id}"
        self._model_name = spec.upstream_model
        self._created = int(time.time())
        self._id_field = b""  # `"id":"<the message's id>"`, once round 1's first event set it
        # An operator's stop: what it ended with, and what it interrupts (the round's body, its wait, its calls).
        self.stopped: GatewayError | None = None
        self._body_now: Any = None
        self._record_now: RequestRecord | None = None  # the round streaming now
        self._interruptible: trio.CancelScope | None = None

    # -- the whole answer -----------------------------------------------------------------------------------------

    async def answer(self) -> Reply:
        """Run every round inline (a client that did not ask to stream) and give the one final answer."""
        contents: list[str] = []
        while True:
            reply, record = await self._run_round()
            self._round_done(record)
            if reply.status != 200:
                return reply  # an error before anything was sent: the client gets it as it is
            try:
                answer = msgspec.json.decode(reply.body)  # type: ignore[arg-type]  # a whole answer
                message = answer["choices"][0]["message"]
            except (msgspec.DecodeError, KeyError, IndexError, TypeError):
                raise UpstreamError(f"upstream {self._record.upstream} sent an answer without a message") from None
            said = self._whole_round(message, answer["choices"][0].get("finish_reason"))
            if said.content:
                contents.append(said.content)
            server_calls, client_calls = self._split(said.calls)
            if server_calls and not client_calls:
                if self._within_bounds(server_calls):
                    self._remember_round(said, server_calls)
                    results: list[ToolResult | None] = [None] * len(server_calls)
                    await self._run_calls(server_calls, results, None, trio.CancelScope())
                    self._add_results(server_calls, results)
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
        """Send round 1 here, in the request's own scope: an answer that is not a stream (a refusal, an error
        before any byte) is the client's reply as it is. The client's event stream then relays round 1 and runs the
        rounds after; their tool calls run in the request's nursery `tasks`, so they end with the request."""
        reply, record = await self._run_round()
        if reply.status != 200:
            self._round_done(record)
            return reply
        return Reply(200, dict(SSE_HEADERS), LoopStream(self._record, self, self._events(reply, record, tasks)))

    async def _events(self, reply: Reply, record: RequestRecord, tasks: trio.Nursery) -> AsyncGenerator[bytes, None]:
        """The client's stream: every round's events, progress while tools run, and the one end (see the module).
        No cancel scope or nursery is open across a `yield` (the tool calls run in `tasks`)."""
        while True:
            text = TextToolCallFilter() if self._plan.text_calls else None
            events: list[bytes] = []  # the round's data events, folded at its end when it called tools
            said = _Round()
            source = self._body_now = reply.body
            self._record_now = record
            try:
                if isinstance(source, bytes):  # a whole answer, already made into events
                    if out := self._relay_block(source, text, events, said):
                        yield out
                else:
                    async for block in source:
                        if out := self._relay_block(block, text, events, said):
                            yield out
            finally:
                self._body_now = None
                if not isinstance(source, bytes):
                    await source.aclose()  # closes the upstream, gives back the slot, settles the round's usage
                self._round_done(record)
            self._settle(said, text, events)
            if said.held_text:
                yield self._chunk({"content": said.held_text})
            server_calls, client_calls = self._split(said.calls)
            if server_calls and not client_calls:
                if self._within_bounds(server_calls):
                    self._remember_round(said, server_calls)
                    async with aclosing(self._calls_streamed(server_calls, tasks)) as progress:
                        async for out in progress:
                            yield out
                    if self.stopped is not None:
                        raise self.stopped
                reply, record = await self._run_round()  # (past a bound: one last round, without tools)
                if reply.status != 200:
                    self._round_done(record)
                    raise _RoundFailed(*_error_event(reply), status_of=record)
                continue
            if client_calls:
                yield self._chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(client_calls)]})
            yield self._chunk({}, finish_reason=self._finish_reason(client_calls, said.finish_reason))
            if self._record.wants_usage:
                usage = {"id": self._chunk_id, "object": "chat.completion.chunk", "created": self._created}
                usage |= {"model": self._model_name, "choices": [], "usage": self._usage_doc()}
                yield b"data: " + msgspec.json.encode(usage) + b"\n\n"
            self._note_end()
            await self._record.finish_before_last_byte(200)
            yield DONE_EVENT
            return

    def _settle(self, said: _Round, text: TextToolCallFilter | None, events: list[bytes]) -> None:
        """What a streamed round said, once it ended: its calls and content (folded only when it called tools)."""
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
                said.held_text = found.text  # text after the calls (what came before them is sent already)

    def _relay_block(self, block: bytes, text: TextToolCallFilter | None, events: list[bytes], said: _Round) -> bytes:
        """What of a block of events goes to the client (one write for all of it)."""
        return b"".join([self._take_event(event.strip(b"\n"), text, events, said) for event in _EVENT_END.split(block)])

    def _take_event(self, event: bytes, text: TextToolCallFilter | None, events: list[bytes], said: _Round) -> bytes:
        """What of one upstream event goes to the client now (b"": nothing)."""
        if not event:
            return b""
        if not event.startswith(b"data:"):
            return event + b"\n\n" if event.startswith(b":") else b""  # comments (keep-alives) pass
        payload = event[5:].strip()
        if payload == b"[DONE]":
            return b""
        events.append(payload)
        said.size += len(payload)
        if said.size > self._rounds.max_answer_bytes:
            limit = self._rounds.max_answer_bytes / 2**20
            raise _RoundFailed(*_failure(502, f"upstream {self._record.upstream} streamed more than {limit:g} MB"))
        if said.id_field is None:
            self._adopt_id(payload, said)
        if said.id_field:
            event = event.replace(said.id_field, self._id_field, 1)  # one message: one id
        plain = not any(mark in payload for mark in _NOT_PLAIN) and not FINISH_REASON.search(payload)
        if plain and (text is None or (not text.held() and not _may_start_a_call(payload))):
            return event + b"\n\n"  # most events: content or reasoning, relayed as they are
        try:
            chunk = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            raise _RoundFailed(*_failure(502, f"upstream {self._record.upstream} sent malformed JSON")) from None
        if not isinstance(chunk, dict):
            return b""
        if "error" in chunk and not chunk.get("choices"):
            error = chunk["error"] if isinstance(chunk["error"], dict) else {}
            message = str(error.get("message", "upstream error"))
            raise _RoundFailed(b"data: " + payload + b"\n\n", 502, message, status_of=self._record_now)
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

    async def _run_round(self) -> tuple[Reply, RequestRecord]:
        """Queue for a slot (round 1 as any request; later rounds keep its place) and send this round (without
        tools once a bound stopped the loop)."""
        self._bound_before_round()
        body = {**self._body, "messages": self._messages}
        if self._record.tool_bound is not None:
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
        reply: Reply | None = None
        with trio.CancelScope() as self._interruptible:
            reply = await self._rounds.start(self._spec, record, msgspec.json.encode(body), ticket)
        self._interruptible = None
        if self.stopped is not None:  # stopped while it waited, or just as its answer came
            if reply is not None and not isinstance(reply.body, bytes):
                await reply.body.aclose()
            self._round_done(record)
            raise self.stopped
        assert reply is not None
        return reply, record

    def stop(self, error: GatewayError) -> None:
        """An operator's stop (or the end of a shutdown): interrupt what the loop waits on; its stream ends with
        `error`."""
        self.stopped = error
        if self._interruptible is not None:
            self._interruptible.cancel()
        if self._body_now is not None and not isinstance(self._body_now, bytes):
            self._body_now.stop(error)

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
            parent.usage = record.usage if parent.usage is None else parent.usage + record.usage

    def _split(self, calls: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(calls QueueGate runs, calls that go back to the client): none of either in the last round (past a
        bound) or with suppress."""
        if self._record.tool_bound is not None or self._plan.mode == "suppress":
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
        if self._record.tool_calls + len(calls) > limits.max_calls:
            self._note_bound("max_calls")
        elif repeated:
            self._note_bound("repeated_call")
        return self._record.tool_bound is None

    def _bound_before_round(self) -> None:
        """Before a round is sent: past `max_rounds` rounds of calls, or the loop's deadline, it offers no tools."""
        if self._record.tool_bound is not None:
            return
        if self._record.tool_rounds >= self._plan.limits.max_rounds:
            self._note_bound("max_rounds")
        elif trio.current_time() >= self._deadline:
            self._note_bound("loop_timeout")

    def _note_bound(self, bound: str) -> None:
        """A bound stops the loop: the next round is its last, without tools."""
        self._record.tool_bound = bound
        fields = {"rid": self._record.request_id, "bound": bound, "round": self._record.tool_rounds}
        log.info("tool loop bound", extra={"fields": fields})

    def _remember_round(self, said: _Round, calls: list[dict[str, Any]]) -> None:
        self._messages.append({"role": "assistant", "content": said.content or None, "tool_calls": calls})
        for call in calls:
            self._seen_calls.add((_call_name(call), _canonical(call)))

    async def _calls_streamed(self, calls: list[dict[str, Any]], tasks: trio.Nursery) -> AsyncGenerator[bytes, None]:
        """Run one round's calls in the request's nursery; meanwhile the stream carries their progress lines (under
        the queue-notice rules) and keep-alives. Closing this (the client left, an operator's stop) cancels them."""
        shows = self._rounds.notices_apply(self._record)
        results: list[ToolResult | None] = [None] * len(calls)
        lines, progress = trio.open_memory_channel[bytes](math.inf)
        scope = self._interruptible = trio.CancelScope()
        tasks.start_soon(self._run_calls, calls, results, lines if shows else None, scope)
        try:
            if shows:
                yield self._chunk({"role": "assistant", "reasoning_content": "".join(_call_line(c) for c in calls)})
            while True:
                with trio.move_on_after(self._rounds.keepalive_s) as waiting:
                    try:
                        line = await progress.receive()
                    except trio.EndOfChannel:
                        break  # every call is done
                yield KEEPALIVE if waiting.cancelled_caught else line
        finally:
            scope.cancel()
            lines.close()
            self._interruptible = None
        self._add_results(calls, results)

    async def _run_calls(
        self,
        calls: list[dict[str, Any]],
        results: list[ToolResult | None],
        progress: trio.MemorySendChannel[bytes] | None,
        scope: trio.CancelScope,
    ) -> None:
        """Run one round's calls concurrently (each bounded; the loop's deadline cuts them all) into `results`;
        `progress` gets a line as each ends (and is closed when all did)."""
        self._record.tool_step = f"round {self._record.tool_rounds}: {', '.join(_call_name(c) for c in calls)}"

        async def run(i: int, call: dict[str, Any]) -> None:
            timeout = min(self._plan.limits.call_timeout_s, max(0.0, self._deadline - trio.current_time()))
            function = call.get("function") if isinstance(call.get("function"), dict) else {}
            arguments = function.get("arguments") if isinstance(function.get("arguments"), str) else "{}"
            if (own := self._plan.gateway_tools.get(_call_name(call))) is not None:
                results[i] = result = await own.run(arguments, timeout)
            else:
                results[i] = result = await self._servers.call(_call_name(call), arguments, timeout)
            self._observe(call, result)
            if progress is not None:
                progress.send_nowait(self._chunk({"reasoning_content": _result_line(call, result)}))

        try:
            with scope:
                async with trio.open_nursery() as running:
                    for i, call in enumerate(calls):
                        running.start_soon(run, i, call)
        finally:
            if progress is not None:
                progress.close()

    def _add_results(self, calls: list[dict[str, Any]], results: list[ToolResult | None]) -> None:
        """The round's results, as tool messages in the order called (the model reads them next round)."""
        self._record.tool_calls += len(calls)
        for call, result in zip(calls, results, strict=True):
            text = result.text if result is not None else "error: the call did not finish"
            self._messages.append({"role": "tool", "tool_call_id": call.get("id") or "", "content": text})

    def _observe(self, call: dict[str, Any], result: ToolResult) -> None:
        name = _call_name(call)
        log.info(
            "tool call",
            extra={
                "fields": {
                    "rid": self._record.request_id,
                    "tool": name,
                    "server": GATEWAY if name in self._plan.gateway_tools else self._servers.server_of(name),
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
        """Every round's usage together (the request's record sums them: `_round_done`)."""
        u = self._record.usage or Usage()
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
    """The client's event stream of a tool loop (a StreamBody): the HTTP layer iterates it in the request's task,
    and each step runs the loop's event generator on to its next bytes. `stop` (operator, shutdown) interrupts what
    the loop waits on (`ToolLoop.stop`) and ends the stream with its error event."""

    def __init__(self, record: RequestRecord, loop: ToolLoop, events: AsyncGenerator[bytes, None]) -> None:
        self._record = record
        self._loop = loop
        self._events = events
        self._ended = False

    def __aiter__(self) -> LoopStream:
        return self

    async def __anext__(self) -> bytes:
        if self._ended:
            raise StopAsyncIteration
        if self._loop.stopped is None:
            try:
                return await self._events.__anext__()
            except StopAsyncIteration:
                self._ended = True
                raise
            except _RoundFailed as failed:
                if self._loop.stopped is None:
                    return await self._end_with(failed.event, failed.status, failed.message)
            except GatewayError as exc:
                if self._loop.stopped is None:
                    return await self._end_with(b"data: " + exc.body() + b"\n\n", exc.status, exc.message)
            except Exception:
                log.exception("unexpected error in a tool loop", extra={"fields": {"rid": self._record.request_id}})
                error = InternalError("QueueGate failed while running the tool loop")
                return await self._end_with(b"data: " + error.body() + b"\n\n", error.status, error.message)
        stop = self._loop.stopped
        assert stop is not None
        await self._events.aclose()
        return await self._end_with(b"data: " + stop.body() + b"\n\n", stop.status, stop.message)

    async def _end_with(self, event: bytes, status: int, message: str) -> bytes:
        self._ended = True
        self._record.tool_step = None
        await self._record.finish_before_last_byte(status, error=message)
        return event

    def stop(self, error: GatewayError) -> None:
        if not self._ended and self._loop.stopped is None:
            self._loop.stop(error)

    async def aclose(self) -> None:
        """End the loop (its round's upstream closed, its calls cancelled) and log the request if nothing did."""
        await self._events.aclose()
        stop = self._loop.stopped
        if stop is not None:
            self._record.finish(stop.status, error=stop.message)
        self._record.finish(CLIENT_CLOSED, error="client closed the stream")


def _loop_answers(mode: str, body: dict[str, Any]) -> bool:
    """Whether the loop can answer the request: one choice (`n`), and (but to suppress them) tools in OpenAI's
    current format, not the legacy `functions`."""
    n = body.get("n")
    return not (isinstance(n, int) and n > 1) and (mode == "suppress" or "functions" not in body)


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
    """A later round's refusal (nothing of it sent yet) as the stream's error event."""
    return _failure(reply.status, error_message(reply.body))


def _may_start_a_call(payload: bytes) -> bool:
    """Whether an event's text may hold (the start of) a text-form tool call: a `[` or `<` after its content key
    (the keys before it never hold one). Events without are relayed without being decoded."""
    at = payload.find(b'"content"')
    return at >= 0 and any(payload.find(mark, at) >= 0 for mark in _MARKER_STARTS)
