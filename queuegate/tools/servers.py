"""The tool servers: their OpenAPI documents read and kept fresh, their operations as the tools a model may call,
and the calls made.

`ToolServers` owns which tools exist and which server answers each. It reads every server's `/openapi.json` at
start (concurrently, bounded), then every `[tools].refresh_s`, sooner for a server that is down (it is picked up when
it comes back), and at once after a call answered 404 (the server changed). A server down at start is a warning,
not a failed start; two servers offering one tool name is a config error at start (rename or exclude one), and
later (a server that came back) leaves the second one's tool out with an error in the log and the status.

Results are data for the model, never acted on: a call that fails, times out or answers garbage becomes text that
says so, and every result is cut to `max_result_chars`. The API key is sent as a Bearer token and never logged.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import msgspec
import trio

from queuegate.config import ConfigError, ToolsConfig, ToolServerConfig
from queuegate.statistics import ToolServerStatistics
from queuegate.tools.openapi import Operation, ToolArgumentError, http_call, operations

log = logging.getLogger("queuegate.tools")

START_TIMEOUT_S = 10.0  # how long the start waits for the servers' documents (a slow one is picked up later)
DOWN_RETRY_S = (2.0, 60.0)  # a server that is down is tried again after this, doubling up to the last
MAX_DOCUMENT_BYTES = 8 * 2**20
KEEPALIVE_S = 2.0
READ_FACTOR = 4  # a result is read up to this many times `max_result_chars` bytes (the rest is cut unread)


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What one call gave the model: its text, and how it went (for the log and the metrics)."""

    text: str
    outcome: str  # ok | error (the server answered an error) | timeout | unreachable | invalid (bad arguments/answer)
    status: int | None = None
    duration_s: float = 0.0


@dataclass(slots=True)
class _Server:
    name: str
    config: ToolServerConfig
    tools: dict[str, Operation] = field(default_factory=dict)  # by the name the model sees
    up: bool = False
    error: str | None = "not read yet"
    refreshed_at: float | None = None  # wall clock of the last successful read
    next_read: float = 0.0  # trio clock
    failures: int = 0
    left_out: list[str] = field(default_factory=list)  # why some operations are not tools

    def url(self, path: str) -> str:
        """Where `path` (an operation's, or /openapi.json) is on this server."""
        return self.config.url.rstrip("/") + self.config.prefix + path

    def statistics(self) -> ToolServerStatistics:
        return ToolServerStatistics(
            self.name, self.config.url, self.up, sorted(self.tools), self.error, self.refreshed_at, self.left_out[:20]
        )


class ToolServers:
    """Every configured tool server and the tools they offer (see the module)."""

    def __init__(
        self, config: ToolsConfig, env: Mapping[str, str], reserved: Mapping[str, set[str]] | None = None
    ) -> None:
        """`reserved`: per server, operations for QueueGate only (chat memory's), never offered to a model."""
        self._settings = config
        self._reserved = dict(reserved or {})
        self._servers = {name: _Server(name, server) for name, server in config.servers.items()}
        self._secrets = {
            name: env.get(server.api_key_env, "") if server.api_key_env else ""
            for name, server in config.servers.items()
        }
        self._owner: dict[str, str] = {}  # tool name -> server name
        self._definitions: list[dict[str, Any]] = []  # the tools as OpenAI function tools, in a stable order
        self._refresh_now = trio.Event()
        self._client: httpx.AsyncClient | None = None

    @property
    def configured(self) -> bool:
        return bool(self._servers)

    def set_limits(self, config: ToolsConfig) -> None:
        """New bounds from a reload (the servers themselves change only with a restart)."""
        self._settings = config

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read every server's document, then keep them fresh. Raises ConfigError at start when two servers offer
        one tool name."""
        # Idle connections are dropped before the usual 5 s server keep-alive, so a socket the server is closing is
        # rarely reused (a call on it would fail).
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16, keepalive_expiry=KEEPALIVE_S)
        async with httpx.AsyncClient(limits=limits, follow_redirects=False) as client:
            self._client = client
            with trio.move_on_after(START_TIMEOUT_S):
                async with trio.open_nursery() as nursery:
                    for server in self._servers.values():
                        nursery.start_soon(self._read, server)
            for server in self._servers.values():
                if not server.up:
                    log.warning(
                        "tool server down at start; its tools are absent until it answers",
                        extra={"fields": {"server": server.name, "url": server.config.url, "error": server.error}},
                    )
            self._rebuild(at_start=True)
            task_status.started()
            while True:
                wake = min((s.next_read for s in self._servers.values()), default=math.inf)
                with trio.move_on_at(wake):
                    await self._refresh_now.wait()
                self._refresh_now = trio.Event()
                now = trio.current_time()
                due = [s for s in self._servers.values() if s.next_read <= now]
                async with trio.open_nursery() as nursery:
                    for server in due:
                        nursery.start_soon(self._read, server)
                self._rebuild(at_start=False)

    def definitions(self, leave_out: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
        """The tools to offer the model (as OpenAI function tools), but those named in `leave_out` (the client's
        own tools of the same name win)."""
        if not leave_out:
            return self._definitions
        return [d for d in self._definitions if d["function"]["name"] not in leave_out]

    def server_of(self, name: str) -> str | None:
        return self._owner.get(name)

    async def call(self, name: str, arguments: str, timeout_s: float) -> ToolResult:
        """Call tool `name` with the model's arguments (a JSON string), within `timeout_s` (the server's own
        `timeout_s` may make it shorter). Every failure is a result that says what went wrong, for the model."""
        server_name = self._owner.get(name)
        if server_name is None:
            return ToolResult(f"error: there is no tool named {name!r}", "invalid")
        return await self._call(self._servers[server_name], name, arguments, timeout_s)

    async def call_reserved(self, server_name: str, name: str, arguments: str, timeout_s: float) -> ToolResult:
        """Call one of QueueGate's own operations of a server (`reserved`: chat memory's), as `call` does."""
        return await self._call(self._servers[server_name], name, arguments, timeout_s)

    async def _call(self, server: _Server, name: str, arguments: str, timeout_s: float) -> ToolResult:
        started = trio.current_time()
        operation = server.tools.get(name)
        if self._client is None:
            return ToolResult("error: the tool servers are not running", "unreachable")
        if operation is None:
            return ToolResult(f"error: the tool {name!r} is not available right now", "unreachable")
        try:
            parsed = msgspec.json.decode(arguments or "{}")
            request = http_call(operation, parsed)
        except (msgspec.DecodeError, ToolArgumentError) as exc:
            why = exc if isinstance(exc, ToolArgumentError) else "the arguments are not valid JSON"
            return ToolResult(f"error: {why}", "invalid")
        bound = min(server.config.timeout_s or self._settings.call_timeout_s, timeout_s)
        url = server.url(request.path)
        headers = {"accept": "application/json", **self._auth(server)}
        limit = self._settings.max_result_chars
        try:
            with trio.fail_after(bound):
                async with self._client.stream(
                    request.method.upper(),
                    url,
                    params=request.query or None,
                    json=request.json,
                    headers=headers,
                    timeout=httpx.Timeout(bound),
                ) as response:
                    body, cut = await _read_at_most(response, limit * READ_FACTOR)
        except (trio.TooSlowError, httpx.TimeoutException):
            return ToolResult(
                f"error: the tool did not answer within {bound:g} s",
                "timeout",
                duration_s=trio.current_time() - started,
            )
        except httpx.HTTPError as exc:
            self._mark_down(server, f"{type(exc).__name__}: {exc}")
            self._refresh_now.set()  # its next read is sooner than the refresh loop is waiting for
            return ToolResult(
                "error: the tool server could not be reached", "unreachable", duration_s=trio.current_time() - started
            )
        took = trio.current_time() - started
        if response.status_code == 404:  # the server changed: read its document again, now
            server.next_read = trio.current_time()
            self._refresh_now.set()
        text = _result_text(body, response.headers.get("content-type", ""), cut)
        if text is None:
            return ToolResult("error: the tool answered something that is not valid JSON", "invalid", None, took)
        if response.status_code >= 400:
            text = f"error: the tool answered {response.status_code}: {text}"
            return ToolResult(_capped(text, limit, cut), "error", response.status_code, took)
        return ToolResult(_capped(text, limit, cut), "ok", response.status_code, took)

    def statistics(self) -> list[ToolServerStatistics]:
        return [server.statistics() for server in self._servers.values()]

    async def _read(self, server: _Server) -> None:
        """Read one server's OpenAPI document; on failure it is down until a later read works."""
        assert self._client is not None
        url = server.url("/openapi.json")
        headers = self._auth(server)
        try:
            with trio.fail_after(self._settings.call_timeout_s):
                async with self._client.stream("GET", url, headers=headers) as response:
                    body, cut = await _read_at_most(response, MAX_DOCUMENT_BYTES)
            if response.status_code != 200:
                raise ValueError(f"GET {url} answered {response.status_code}")
            if cut:
                raise ValueError(f"its OpenAPI document is larger than {MAX_DOCUMENT_BYTES // 2**20} MB")
            found, left_out = operations(msgspec.json.decode(body))
        except (httpx.HTTPError, trio.TooSlowError, ValueError, msgspec.DecodeError) as exc:
            self._mark_down(server, _describe(exc))
            return
        allow = set(server.config.allow)
        tools = {}
        for operation in found:
            if allow and operation.name not in allow:
                continue
            name = server.config.rename.get(operation.name, operation.name)
            tools[name] = operation if name == operation.name else replace(operation, name=name)
        for name in allow - {o.name for o in found}:
            left_out.append(f"{name}: in `allow` but the server offers no such tool")
        was_up = server.up
        server.tools, server.left_out, server.up, server.error = tools, left_out, True, None
        server.refreshed_at, server.failures = time.time(), 0
        server.next_read = trio.current_time() + self._settings.refresh_s
        if not was_up:
            log.info("tool server up", extra={"fields": {"server": server.name, "tools": len(tools)}})

    def _auth(self, server: _Server) -> dict[str, str]:
        """The server's API key as a Bearer token (no header when it has none)."""
        secret = self._secrets[server.name]
        return {"authorization": f"Bearer {secret}"} if secret else {}

    def _mark_down(self, server: _Server, error: str) -> None:
        if server.up or server.error != error:
            log.warning("tool server down", extra={"fields": {"server": server.name, "error": error}})
        server.up, server.error = False, error
        server.failures += 1
        first, most = DOWN_RETRY_S
        server.next_read = trio.current_time() + min(most, first * 2 ** min(server.failures - 1, 10))

    def _rebuild(self, *, at_start: bool) -> None:
        """Which server answers each tool name, from what the servers offer now. A name keeps the server that had
        it; a new clash (a server that came back offering a name another has) leaves the newcomer's out."""
        owner = {name: by for name, by in self._owner.items() if name in self._servers[by].tools}
        for server in self._servers.values():
            for name in sorted(set(server.tools) - self._reserved.get(server.name, set())):
                if owner.setdefault(name, server.name) == server.name:
                    continue
                why = (
                    f"tool {name!r} is offered by tool servers {owner[name]!r} and {server.name!r}: rename it on "
                    f"one ([tools.servers.{server.name}].rename) or leave it out there (`allow`)"
                )
                if at_start:
                    raise ConfigError(why)
                if server.error != why:
                    log.error("tool name clash", extra={"fields": {"server": server.name, "error": why}})
                server.error = why
        self._owner = owner
        self._definitions = [self._servers[by].tools[name].tool() for name, by in sorted(owner.items())]


async def _read_at_most(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """The body, at most `limit` bytes (and whether more was left unread)."""
    parts, size = [], 0
    async for chunk in response.aiter_bytes():
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(parts)[:limit], True
    return b"".join(parts), False


def _result_text(body: bytes, content_type: str, cut: bool) -> str | None:
    """A result as the model reads it: JSON re-encoded compactly (a JSON string as its text), anything else as
    text; None for a JSON answer that is not JSON."""
    if "json" in content_type and not cut:
        try:
            value = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return None
        return value if isinstance(value, str) else msgspec.json.encode(value).decode()
    return body.decode("utf-8", "replace")


def _capped(text: str, limit: int, cut: bool) -> str:
    """At most `limit` characters, with a note saying it was cut (`cut`: the answer was longer than was read)."""
    if len(text) <= limit and not cut:
        return text
    size = "more than that" if cut else f"{len(text)} characters"
    return text[:limit] + f"\n[cut by QueueGate: the first {limit} characters of the result are shown; it had {size}]"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "its OpenAPI document did not come in time"
    if isinstance(exc, msgspec.DecodeError):
        return "its OpenAPI document is not valid JSON"
    return f"{type(exc).__name__}: {exc}" if isinstance(exc, httpx.HTTPError) else str(exc)
