"""A simulated OpenAI-compatible LLM server on raw trio sockets and h11.

Not ASGI on purpose: faults need control that ASGI hides (drop a connection before any response, cut a chunked
body in the middle), and the benchmarks need a fast upstream. Each connection is served by one task; while a
response is produced, a second task watches the socket so a client that goes away is noticed at once.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import msgspec
import trio

from queuegate.sim._config import FAULTS, ReceivedRequest, SimConfig, SimStats
from queuegate.sim._content import Completion, embeddings_body, prompt_tokens
from queuegate.sim._tools import ToolServerRoutes, tool_answer

JSON = [("content-type", "application/json")]
SSE = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]


class _Drop(Exception):
    """Close the connection abruptly (a fault)."""


class _Exchange:
    """One request/response on a connection: sends events through h11 and notes whether the client left."""

    def __init__(self, conn: h11.Connection, stream: trio.SocketStream) -> None:
        self.conn = conn
        self.stream = stream
        self.client_gone = False

    async def send(self, *events: Any) -> None:
        data = b"".join(self.conn.send(event) or b"" for event in events)
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.client_gone = True
            raise

    async def respond(self, status: int, body: bytes, headers: list[tuple[str, str]] = JSON) -> None:
        response = h11.Response(status_code=status, headers=[*headers, ("content-length", str(len(body)))])
        await self.send(response, h11.Data(data=body), h11.EndOfMessage())

    async def error(self, status: int, message: str, extra: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
        body = {"error": {"message": message, "type": "sim_error", "param": None, "code": status}}
        await self.respond(status, msgspec.json.encode(body), [*JSON, *extra])

    async def start_stream(self) -> None:
        await self.send(h11.Response(status_code=200, headers=SSE))

    async def event(self, doc: Any) -> None:
        payload = doc if isinstance(doc, bytes) else msgspec.json.encode(doc)
        await self.send(h11.Data(data=b"data: " + payload + b"\n\n"))


class Simulator:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.stats = SimStats()
        self._fault: str | None = None
        self._health_status: int | None = None
        self._started_at = time.monotonic()
        self._routes: dict[tuple[str, str], Callable[[_Exchange, Any], Awaitable[None]]] = {
            ("GET", "/health"): self._health,
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("POST", "/sim/fault"): self._set_fault_route,
            ("GET", "/sim/stats"): self._stats_route,
        }
        self.tools: ToolServerRoutes | None = None  # the demo tool server's routes, when it serves them
        if config.tool_server:
            self.tools = tools = ToolServerRoutes(test_tools=config.test_tools)
            self._routes[("GET", "/openapi.json")] = self._tool_document
            for name in tools.names():
                self._routes[("POST", f"/{name}")] = self._tool_route(name)

    def set_fault(self, fault: str | None, *, health_status: int | None = None) -> None:
        """Make every request fail with `fault` (None: behave), and/or force /health to answer `health_status`."""
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(sorted(FAULTS))}")
        self._fault = fault
        self._health_status = health_status

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; reports the base URL ('http://127.0.0.1:PORT/v1') once listening."""
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        port = listeners[0].socket.getsockname()[1]
        self._started_at = time.monotonic()
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._serve_connection, listeners)
            task_status.started(f"http://{self.config.host}:{port}/v1")

    # -- connections ----------------------------------------------------------------------------------------

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read_request(conn, stream)
                if request is None:
                    return
                exchange = _Exchange(conn, stream)
                await self._handle(exchange, *request)
                if exchange.client_gone or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (_Drop, h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception:
            # A bug in the simulator must cost one connection, not the server (a demo's model would be gone).
            traceback.print_exc()
            return
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _read_request(self, conn: h11.Connection, stream: trio.SocketStream) -> tuple[h11.Request, bytes] | None:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _handle(self, exchange: _Exchange, request: h11.Request, raw: bytes) -> None:
        method, path = request.method.decode(), request.target.decode().split("?")[0]
        route = self._routes.get((method, path))
        if route is None:
            await exchange.error(404, f"no route {method} {path}")
            return
        body: Any = None
        if method == "POST":
            try:
                body = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                await exchange.error(400, "malformed JSON body")
                return
        counted = path.startswith("/v1/") and method == "POST"
        if counted:
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
            self.stats.received.append(ReceivedRequest(path, headers, body))
            self.stats.requests += 1
            self.stats.active += 1
            if self.stats.first_request_at is None:
                self.stats.first_request_at = time.monotonic()
        try:
            await self._while_watching(exchange, route, body)
        finally:
            if counted:
                self.stats.active -= 1
                if exchange.client_gone:
                    self.stats.disconnects += 1
                    self.stats.disconnect_times.append(time.monotonic())
                else:
                    self.stats.completed += 1

    async def _while_watching(
        self, exchange: _Exchange, route: Callable[[_Exchange, Any], Awaitable[None]], body: Any
    ) -> None:
        """Run the route while another task reads the socket: EOF means the client left, so stop at once."""
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while True:
                    try:
                        data = await exchange.stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    if not data:
                        exchange.client_gone = True
                        nursery.cancel_scope.cancel()
                        return
                    exchange.conn.receive_data(data)  # a pipelined next request: keep it for later

            nursery.start_soon(watch)
            drop = False
            try:
                await route(exchange, body)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                exchange.client_gone = True
            except _Drop:
                drop = True  # raised after the nursery: inside it, trio would wrap it in an exception group
            nursery.cancel_scope.cancel()
        if drop:
            raise _Drop

    # -- routes ---------------------------------------------------------------------------------------------

    @property
    def healthy_at(self) -> float:
        """When its simulated load ends (time.monotonic(): comparable across processes)."""
        return self._started_at + self.config.load_time_s

    def _loading(self) -> bool:
        return time.monotonic() < self.healthy_at

    async def _health(self, exchange: _Exchange, _: Any) -> None:
        if self._health_status is not None and self._health_status != 200:
            await exchange.error(self._health_status, "Loading model" if self._health_status == 503 else "unhealthy")
        elif self._health_status is None and self._loading() and not self.config.health_ok_while_loading:
            await exchange.error(503, "Loading model")
        else:
            await exchange.respond(200, b'{"status":"ok"}')

    async def _models(self, exchange: _Exchange, _: Any) -> None:
        model = {"id": self.config.model, "object": "model", "created": int(self._started_at), "owned_by": "sim"}
        await exchange.respond(200, msgspec.json.encode({"object": "list", "data": [model]}))

    async def _chat(self, exchange: _Exchange, body: Any) -> None:
        await self._complete(exchange, body, chat=True)

    async def _completions(self, exchange: _Exchange, body: Any) -> None:
        await self._complete(exchange, body, chat=False)

    async def _complete(self, exchange: _Exchange, body: Any, *, chat: bool) -> None:
        if not isinstance(body, dict):
            await exchange.error(400, "body must be a JSON object")
            return
        fault = body.get("sim_fault") or self._fault
        if self._loading():  # like llama-server: every endpoint answers 503 until the model is loaded
            await exchange.error(503, "Loading model")
            return
        if await self._early_fault(exchange, fault):
            return
        requested = body.get("max_tokens") or body.get("max_completion_tokens")
        n_tokens = requested if isinstance(requested, int) and requested > 0 else self.config.default_max_tokens
        completion = Completion(
            chat,
            str(body.get("model", self.config.model)),
            n_tokens,
            requested is not None,
            prompt_tokens(body),
            served_by=self.config.model,
            tool_answer=tool_answer(body) if chat else None,
        )
        interval = 1.0 / self.config.tokens_per_s if self.config.tokens_per_s > 0 else 0.0
        first_delay = 30.0 if fault == "slow_first_token" else self.config.first_token_delay_s
        streamed = body.get("stream") is True
        if streamed != (fault in ("whole_answer", "stream_answer")):  # those two answer in the other shape
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            include_usage = (include_usage or fault == "stream_answer") and self.config.report_usage
            await self._stream(exchange, completion, fault, first_delay, interval, include_usage)
            return
        await trio.sleep(first_delay + interval * len(completion.tokens))
        if fault == "die_mid_stream":
            payload = msgspec.json.encode(completion.whole())
            response = h11.Response(status_code=200, headers=[*JSON, ("content-length", str(len(payload)))])
            await exchange.send(response, h11.Data(data=payload[: len(payload) // 2]))
            raise _Drop
        if fault == "hang_after_first":
            await trio.sleep_forever()
        whole = completion.whole()
        if fault == "drip":
            payload = msgspec.json.encode(whole)
            await exchange.send(h11.Response(status_code=200, headers=[*JSON, ("content-length", str(len(payload)))]))
            for i in range(len(payload)):
                await exchange.send(h11.Data(data=payload[i : i + 1]))
                await trio.sleep(0.2)
            await exchange.send(h11.EndOfMessage())
            return
        if not self.config.report_usage:
            del whole["usage"]
        await exchange.respond(200, msgspec.json.encode(whole))

    async def _stream(
        self,
        exchange: _Exchange,
        completion: Completion,
        fault: str | None,
        first_delay: float,
        interval: float,
        include_usage: bool,
    ) -> None:
        await exchange.start_stream()
        next_at = trio.current_time() + first_delay
        for index in range(len(completion.tokens)):
            if fault == "die_mid_stream" and index == 3:
                raise _Drop
            if fault == "no_done" and index == 3:
                await exchange.send(h11.EndOfMessage())
                return
            if fault == "hang_after_first" and index == 1:
                await trio.sleep_forever()
            await trio.sleep_until(next_at)
            next_at += interval
            await exchange.event(completion.chunk(index))
        for chunk in completion.call_chunks():
            await exchange.event(chunk)
        await exchange.event(completion.final_chunk())
        if include_usage:
            await exchange.event(completion.usage_chunk())
        if fault != "finish_without_done":
            await exchange.event(b"[DONE]")
        if fault == "linger_after_done":
            await trio.sleep(0.5)
        await exchange.send(h11.EndOfMessage())

    async def _early_fault(self, exchange: _Exchange, fault: str | None) -> bool:
        """Faults that answer (or don't) before any generation. True when the request is dealt with."""
        if fault is None or not (fault in ("hang", "close_before_response", "garbage") or fault.startswith("status_")):
            return False  # a fault of the answer itself
        if fault == "hang":
            await trio.sleep_forever()
        if fault == "close_before_response":
            raise _Drop
        if fault == "garbage":
            await exchange.respond(200, b"\x00not json{{{ <html>", [("content-type", "text/event-stream")])
        elif fault == "status_429":
            await exchange.error(429, "simulated rate limit", [("retry-after", "1")])
        else:
            status = int(fault.removeprefix("status_"))
            await exchange.error(status, "Loading model" if status == 503 else "simulated upstream failure")
        return True

    async def _embeddings(self, exchange: _Exchange, body: Any) -> None:
        fault = body.get("sim_fault") if isinstance(body, dict) else None
        if self._loading():
            await exchange.error(503, "Loading model")
            return
        if await self._early_fault(exchange, fault or self._fault):
            return
        raw = body.get("input") if isinstance(body, dict) else None
        if isinstance(raw, str):
            inputs = [raw]
        elif isinstance(raw, list) and raw:
            inputs = [item if isinstance(item, str) else msgspec.json.encode(item).decode() for item in raw]
        else:
            await exchange.error(400, "`input` must be a string or a non-empty array")
            return
        doc = embeddings_body(inputs, str(body.get("model", self.config.model)), self.config.embedding_dim)
        await exchange.respond(200, msgspec.json.encode(doc))

    async def _tool_document(self, exchange: _Exchange, _: Any) -> None:
        assert self.tools is not None
        await exchange.respond(200, msgspec.json.encode(self.tools.document()))

    def _tool_route(self, name: str) -> Callable[[_Exchange, Any], Awaitable[None]]:
        async def call(exchange: _Exchange, body: Any) -> None:
            assert self.tools is not None
            status, payload, content_type = await self.tools.call(name, body)
            await exchange.respond(status, payload, [("content-type", content_type)])

        return call

    async def _set_fault_route(self, exchange: _Exchange, body: Any) -> None:
        try:
            self.set_fault(body.get("fault"), health_status=body.get("health_status"))
        except (ValueError, AttributeError) as exc:
            await exchange.error(400, str(exc))
            return
        await exchange.respond(200, b'{"ok":true}')

    async def _stats_route(self, exchange: _Exchange, _: Any) -> None:
        timing = {
            "healthy_at": self.healthy_at,
            "first_request_at": self.stats.first_request_at,
        }
        await exchange.respond(200, msgspec.json.encode({**self.stats.counters(), **timing}))
