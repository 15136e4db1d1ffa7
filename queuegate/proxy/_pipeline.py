"""One request's way through QueueGate: parse once → resolve the model → queue for a slot → forward → reply.

All of it runs in the request's own task and cancel scope: if the client leaves, the queue entry is withdrawn and
the upstream response closed on the way out. `forward` is the retry loop: each attempt (`_attempt.py`) says what its
upstream's answer was, and the loop decides: before any byte reached the client, an upstream that cannot be reached,
answers a 5xx or drops its answer half-way is left for another upstream of the model; one that answers 503 (still
loading, overloaded) or 429 is waited out, bounded. After the first byte, never.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import trio

from queuegate.errors import GatewayError, ModelNotFound, NotSupported
from queuegate.fleet.catalog import Catalog, ModelSpec, Upstream
from queuegate.proxy._attempt import Attempts, UpstreamBusy, UpstreamNotReady
from queuegate.proxy._dialects import OPENAI_STREAMS
from queuegate.proxy._forwarder import Forwarder, RetryableFailure
from queuegate.proxy._notices import NoticePolicy, QueuedStream, strip_notices
from queuegate.proxy._record import RequestRecord
from queuegate.proxy._reply import SSE_HEADERS, Reply
from queuegate.proxy._request import ParsedRequest, echo, forwarding, parse_request
from queuegate.proxy._routing import chat_key
from queuegate.proxy._tap import TappedStream, answer_text
from queuegate.scheduler import Admission, ModelUnavailable, NoUpstreamLeft, QueuePosition, Ticket
from queuegate.statistics import LoadOutlook
from queuegate.vocabulary import ENDPOINTS

if TYPE_CHECKING:
    from queuegate.memory.service import Memory
    from queuegate.tools.gateway import GatewayTool
    from queuegate.tools.loop import ToolLoop
    from queuegate.tools.servers import ToolServers

# The request fields that offer the model tools (`suppress` keeps them from the upstream).
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call")
# An upstream's own rate limit (429) is waited out, before any byte reached the client, at most this many times.
UPSTREAM_BUSY_RETRIES = 3
# An upstream's 503 is waited out: after its Retry-After, else after a backoff doubling from the first to the last.
NOT_READY_BACKOFF_S = (0.25, 2.0)
LAST_CHECK_S = 0.5


class UpstreamReports(Protocol):
    """Who watches an upstream's health (the fleet for launched models, else the health monitor) hears from
    requests what they saw."""

    def report_failure(self, upstream: Upstream, reason: str) -> None:
        """It could not be reached: take it out and check it now."""

    def report_not_ready(self, upstream: Upstream, reason: str, retry_in_s: float) -> None:
        """It answered 503, or dropped a connection: send it nothing new until it is checked again, `retry_in_s`
        from now."""


class ToolHandling(Protocol):
    """Who decides a chat request's tool handling (`tools.loop.ToolPolicy`), and makes its loop."""

    servers: ToolServers

    def loop_for(
        self,
        rounds: Any,
        route_mode: str | None,
        spec: ModelSpec,
        record: RequestRecord,
        request: ParsedRequest,
        affinity: str | None,
        gateway_tools: Sequence[GatewayTool] = (),
    ) -> ToolLoop | None: ...

    def suppresses(self, route_mode: str | None, spec: ModelSpec) -> bool: ...

    def offers(self, name: str, route_mode: str | None, spec: ModelSpec, body: dict[str, Any]) -> bool: ...


class Proxy:
    def __init__(
        self,
        catalog: Catalog,
        admission: Admission,
        forwarder: Forwarder,
        reports: UpstreamReports,
        notices: NoticePolicy | None = None,
        chat_header: str = "X-Chat-Id",
        max_answer_bytes: int = 64 * 2**20,
        tools: ToolHandling | None = None,
        memory: Memory | None = None,
        load_outlook: Callable[[str], LoadOutlook | None] | None = None,
    ) -> None:
        """`load_outlook(model)`: what a queued request for a launched model waits for besides the queue (its swap
        or load; `Fleet.load_outlook`), for the queue notices."""
        self._catalog = catalog
        self._load_outlook = load_outlook
        self._admission = admission
        self._attempts = Attempts(forwarder, admission.release, max_answer_bytes)
        self._reports = reports
        self.notices = notices or NoticePolicy()
        self._chat_header = chat_header  # names the sticky chat (see `chat_key`)
        self.tools = tools  # decides each chat request's tool mode (None: tools are passed through untouched)
        self.memory = memory  # chat memory (None: off)

    async def handle(
        self,
        record: RequestRecord,
        raw_body: bytes,
        headers: Mapping[str, str],
        *,
        tool_mode: str | None = None,
        tasks: trio.Nursery | None = None,
    ) -> Reply:
        """Serve one OpenAI request. Raises GatewayError for anything the client should see as an error.
        `tool_mode`: the route's (None: the model's or `[tools].mode`); `tasks`: the request's own nursery, where
        a streamed tool loop runs."""
        request = parse_request(raw_body, record.endpoint)
        if record.endpoint == "chat" and (kept := strip_notices(request.body)) is not request.body:
            request = forwarding(request, kept)  # (its own queue notices, sent back as the model's thinking)
        spec = self._resolve(request.model, record)
        record.model = spec.name
        record.stream = request.stream
        record.wants_usage = request.wants_usage
        memory = self.memory
        # (a batch line is one prompt of many, not a turn of someone's chat: nothing to recall or remember)
        if memory is None or record.endpoint != "chat" or record.batch or not memory.applies(record.klass, spec.memory):
            record.prompt_chars = request.prompt_chars
            return await self._serve(record, request, spec, headers, tool_mode, tasks)  # (no memory)
        # Chat memory: recall before the turn is sent, remember it once it was answered whole.
        chat = chat_key(headers, self._chat_header, request.body)  # (from the chat as the client sent it)
        key = record.key.name if record.key else None
        # A chat known only by its start (the same "hi" opens many) is also scoped by who asks.
        scope = record.flow if chat.startswith("hash:") else None
        namespace = memory.namespace(key, record.session, chat, scope)
        # In execute mode the model may also search the chat's memory itself (`hint`), unless the name is taken.
        tools, body = self.tools, request.body
        hint = memory.config.hint and tools is not None and tools.offers(memory.tool_name, tool_mode, spec, body)
        recall = await memory.prepare(namespace, request.body["messages"], record.klass, hint=hint)
        request = forwarding(request, {**request.body, "messages": recall.messages})
        record.prompt_chars = request.prompt_chars
        own_tools = [memory.recall_tool(namespace, record.klass)] if recall.offers_tool else []
        reply = await self._serve(record, request, spec, headers, tool_mode, tasks, chat, own_tools)
        if isinstance(reply.body, bytes):
            if (text := answer_text(reply, record.stream)) is not None:
                memory.remember(recall, text)
            return reply
        return Reply(reply.status, reply.headers, TappedStream(reply.body, lambda text: memory.remember(recall, text)))

    async def _serve(
        self,
        record: RequestRecord,
        request: ParsedRequest,
        spec: ModelSpec,
        headers: Mapping[str, str],
        tool_mode: str | None,
        tasks: trio.Nursery | None,
        chat: str | None = None,
        gateway_tools: Sequence[GatewayTool] = (),
    ) -> Reply:
        """The request as it goes upstream: through its tool loop, or the plain way. `chat`: its sticky-chat key,
        when it is known already (memory cuts the body it would be computed from); `gateway_tools`: tools
        QueueGate answers itself for this request (execute mode)."""
        sticky = None
        if len(spec.upstreams) > 1:
            sticky = chat or chat_key(headers, self._chat_header, request.body)
        tools = self.tools if record.endpoint == "chat" else None  # (tools are for chats)
        loop = tools.loop_for(self, tool_mode, spec, record, request, sticky, gateway_tools) if tools else None
        if loop is not None:
            if not record.stream:
                return await loop.answer()
            assert tasks is not None, "a streamed tool loop runs in the request's nursery"
            return await loop.stream(tasks)
        upstream_body = {**spec.defaults, **request.body, "model": spec.upstream_model}
        if tools is not None and tools.suppresses(tool_mode, spec):
            upstream_body = {k: v for k, v in upstream_body.items() if k not in TOOL_FIELDS}
        if record.stream and spec.kind.stream_usage and record.endpoint in OPENAI_STREAMS and not record.wants_usage:
            # Count the tokens of every stream: ask for the usage chunk, and keep it from the client who did not.
            options = request.body.get("stream_options") or {}
            upstream_body["stream_options"] = {**options, "include_usage": True}
            record.usage_injected = True
        payload = msgspec.json.encode(upstream_body)
        ticket = self.enqueue(spec, record, request.tokens, affinity=sticky)
        return await self.start(spec, record, payload, ticket)

    def enqueue(
        self,
        spec: ModelSpec,
        record: RequestRecord,
        tokens: int,
        *,
        affinity: str | None = None,
        since: float | None = None,
        prefer: str | None = None,
    ) -> Ticket:
        """A place in the model's queue. A tool loop's later rounds give `since` and `prefer` (they keep the
        request's place; their tokens count against the key's tpm, but they are not new requests for its rpm)."""
        key = record.key.name if record.key else None
        return self._admission.enqueue(
            spec.name,
            klass=record.klass,
            flow=record.flow,
            affinity=affinity,
            key=key,
            tokens=tokens,
            since=since,
            prefer=prefer,
        )

    async def start(self, spec: ModelSpec, record: RequestRecord, payload: bytes, ticket: Ticket) -> Reply:
        """Wait for the ticket's slot and send (see `forward`); a streamed request that waits long enough gets
        queue notices while it waits."""
        if self.notices.applies(record):
            deadline = ticket.enqueued_at + self.notices.min_wait_s
            if not await self.wait_for_slot(ticket, record, until=deadline):
                # Still queued: answer now with an event stream that carries notices until the slot comes.
                return Reply(200, dict(SSE_HEADERS), QueuedStream(self, spec, record, payload, ticket))
        return await self.forward(spec, record, payload, ticket)

    def notices_apply(self, record: RequestRecord) -> bool:
        return self.notices.applies(record)

    @property
    def keepalive_s(self) -> float:
        return self.notices.keepalive_s

    @property
    def max_answer_bytes(self) -> int:
        return self._attempts.max_answer_bytes

    async def wait_for_slot(self, ticket: Ticket, record: RequestRecord, *, until: float | None = None) -> bool:
        """Wait in the queue (see `Admission.wait`), counting the time in the request's record."""
        try:
            return await self._admission.wait(ticket, until=until)
        finally:
            end = ticket.granted_at if ticket.upstream_id is not None else trio.current_time()
            record.queue_s = record.queued_before_s + (end - ticket.enqueued_at)

    def position(self, ticket: Ticket) -> QueuePosition | None:
        return self._admission.position(ticket)

    def load_outlook(self, model: str) -> LoadOutlook | None:
        return self._load_outlook(model) if self._load_outlook is not None else None

    def withdraw(self, ticket: Ticket) -> None:
        self._admission.withdraw(ticket)

    def _resolve(self, name: str, record: RequestRecord) -> ModelSpec:
        """The model asked for. A model that does not exist and one the caller's key may not use get the same
        answer, as OpenAI's (so a key cannot learn other models' names by guessing), listing what it may use."""
        key = record.key
        spec = self._catalog.resolve(name)
        if spec is None or (key is not None and not key.may_use(spec.name)):
            names = [n for n in self._catalog.public_names() if key is None or key.may_use(self._catalog.canonical(n))]
            message = (
                f"The model {echo(name)!r} does not exist or you do not have access to it. "
                f"Available models: {', '.join(names) or 'none'}"
            )
            raise ModelNotFound(message, param="model")
        if record.endpoint not in spec.endpoints:
            served = ", ".join(f"/v1{ENDPOINTS[e].upstream_path}" for e in ENDPOINTS if e in spec.endpoints)
            asked = f"/v1{ENDPOINTS[record.endpoint].upstream_path}"
            raise NotSupported(
                f"model {spec.name!r} (kind {spec.kind.name}) does not serve {asked}; it serves {served} "
                "(a model's `endpoints` in the config says what its server serves)",
                param="model",
            )
        return spec

    async def forward(self, spec: ModelSpec, record: RequestRecord, payload: bytes, ticket: Ticket) -> Reply:
        """Wait for the ticket's slot and send; on a failure before any byte, queue again (see the module)."""
        tried: set[str] = set()
        last_failure: GatewayError | None = None
        busy_retries = 0
        not_ready = _NotReadyWait(spec.launch.startup_timeout_s if spec.launch else self._admission.max_wait_s)
        while True:
            try:
                granted = await self.wait_for_slot(ticket, record, until=not_ready.wait_until)
            except NoUpstreamLeft:
                assert last_failure is not None
                raise last_failure from None
            if not granted:
                self.withdraw(ticket)  # still waiting for an upstream to be ready when the bound ran out
                raise not_ready.gave_up()
            upstream = self._catalog.upstreams.get(ticket.upstream_id)  # type: ignore[arg-type]
            if upstream is None:  # it left (its node is gone) as it was granted: queue again
                self._admission.release(ticket)
                ticket = self._enqueue_again(spec, record, ticket, frozenset(tried))
                continue
            record.upstream = upstream.id
            try:
                return await self._attempts.once(upstream, ticket, record, payload)
            except UpstreamBusy as busy:
                if busy.delay_s is None or busy_retries >= UPSTREAM_BUSY_RETRIES:
                    return busy.reply
                busy_retries += 1
                await trio.sleep(busy.delay_s)  # the slot is free meanwhile; a client leaving cancels this
            except UpstreamNotReady as answer:
                # Taken out until re-checked; this request queues again for it (or another upstream) meanwhile.
                self._reports.report_not_ready(upstream, answer.message, not_ready.next_delay(answer))
            except RetryableFailure as failure:
                if failure.unreachable:
                    self._reports.report_failure(upstream, failure.message)
                elif failure.dropped:
                    self._reports.report_not_ready(upstream, failure.message, 0.0)  # held until a check passes
                tried.add(upstream.id)
                last_failure = failure
            record.retries += 1
            ticket = self._enqueue_again(spec, record, ticket, frozenset(tried))

    def _enqueue_again(self, spec: ModelSpec, record: RequestRecord, ticket: Ticket, exclude: frozenset[str]) -> Ticket:
        """Queue the request again (the key's limits were charged once, for the client's request; the upstream's
        are not)."""
        record.queued_before_s = record.queue_s
        return self._admission.enqueue(
            spec.name,
            klass=record.klass,
            flow=record.flow,
            affinity=ticket.affinity,
            exclude=exclude,
            tokens=ticket.tokens,
            since=ticket.since,  # a tool loop's later round keeps its place when it is retried
        )


class _NotReadyWait:
    """How long one request keeps waiting for upstreams that answer 503: from the first 503, `bound_s` at most
    (a launched model's startup timeout, else the queue's max wait)."""

    def __init__(self, bound_s: float) -> None:
        self.bound_s = bound_s
        self.deadline: float | None = None
        self.since = 0.0
        self.answers = 0
        self.last = ""

    @property
    def wait_until(self) -> float | None:
        """How long a request may wait in the queue for a not-ready upstream: the bound, and a moment for the
        last check (due at the bound) to let it in."""
        return None if self.deadline is None else self.deadline + LAST_CHECK_S

    def next_delay(self, answer: UpstreamNotReady) -> float:
        """How long until the upstream is tried again. Raises ModelUnavailable when that passes the bound."""
        now = trio.current_time()
        if self.deadline is None:
            self.since, self.deadline = now, now + self.bound_s
        self.answers += 1
        self.last = answer.message
        left = self.deadline - now
        if answer.delay_s is not None and answer.delay_s > left:
            raise self.gave_up(retry_after_s=answer.delay_s)  # it says it needs longer than we may wait
        first, most = NOT_READY_BACKOFF_S
        if left <= 0:
            raise self.gave_up()
        if answer.delay_s is not None:
            return max(first, answer.delay_s)  # `Retry-After: 0` is no reason for a hot loop
        return min(most, first * 2 ** (self.answers - 1), left)

    def gave_up(self, retry_after_s: float = 5.0) -> ModelUnavailable:
        waited = trio.current_time() - self.since
        return ModelUnavailable(
            f"not ready after {waited:.0f} s (bound {self.bound_s:g} s): {self.last}", retry_after_s=retry_after_s
        )
